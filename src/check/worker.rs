//! The guest workload: one thread per queue. [`Runner`] is the loop every device shares; a
//! [`QueueWork`] is what one queue of a device does. This file has the blk one ([`Worker`]):
//! many virtio-blk requests in flight, each landing different disk data in different guest
//! buffers, every completed read checked against the disk pattern. The net ones (RX buffers,
//! TX frames) are in `netq.rs`.
//!
//! A worker owns its ring and talks to the VMM thread only through [`Cmd`]s, so the VMM can
//! stop a ring (`GET_VRING_BASE`) while work is in flight and the worker sees exactly what a
//! guest driver would: completions that arrive before, and maybe after, the stop. Spawning,
//! commanding and joining the workers is the pool's job (`pool.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::CheckError;
use super::options::Workload;
use super::pattern::{self, Rng, BLOCK};
use super::rig::Shared;
use crate::driver::blk::{BlkOp, BlkStatus, Completion};
use crate::driver::{BlkQueue, DriverError, SplitQueue};
use crate::log::LOG_PAGE_SHIFT;

/// Longest a worker blocks in one wait, so it answers commands promptly.
pub(super) const POLL: Duration = Duration::from_millis(5);
/// Samples of each kind of problem kept for the report.
pub(super) const MAX_SAMPLES: usize = 8;
/// Generation value of a block whose contents are unknown (a failed write).
const UNKNOWN: u32 = u32::MAX;

/// Counters of one worker, readable by the VMM thread while it runs.
#[derive(Debug, Default)]
pub(super) struct WorkerStats {
    pub completed: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes: AtomicU64,
    pub io_errors: AtomicU64,
    pub data_errors: AtomicU64,
    pub device_page_writes: AtomicU64,
    /// net: frames received in the RX queue.
    pub rx_frames: AtomicU64,
    /// net: frame bytes received (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// net: RX buffers the received frames used.
    pub rx_buffers: AtomicU64,
    /// net: frames spread over more than one RX buffer.
    pub rx_merged: AtomicU64,
    /// net: gaps in the sequence numbers of received frames (frames dropped on the way).
    pub rx_seq_gaps: AtomicU64,
    /// net: frames of an earlier run (still queued in the backend's port), not checked.
    pub rx_foreign: AtomicU64,
    /// net: frames sent through the TX queue (completed).
    pub tx_frames: AtomicU64,
}

/// A worker's settings.
#[derive(Debug, Clone)]
pub(super) struct WorkerCfg {
    pub index: usize,
    pub workload: Workload,
    pub depth: usize,
    /// Request size range (multiples of [`BLOCK`]).
    pub min_io: u64,
    pub max_io: u64,
    /// Data segments per request (>= 1) and their largest length (multiple of 512).
    pub max_segs: usize,
    pub max_seg_len: u64,
    /// Alignment of a segment inside its slot (512 or 4096).
    pub align: u64,
    pub slot: u64,
    /// Disk bytes this worker uses, `[disk_first, disk_first + disk_len)`, block aligned.
    pub disk_first: u64,
    pub disk_len: u64,
    pub salt: u64,
    pub seed: u64,
    pub verify: bool,
    pub track: bool,
}

/// What the VMM thread tells a worker.
pub(super) enum Cmd {
    /// More data slots (a hot-added region).
    AddSlots(Vec<u64>),
    /// The ring was stopped with `GET_VRING_BASE`, which returned `base`. Stop submitting and
    /// collect what completed; with `wait`, keep collecting until everything the backend took
    /// has completed (needed before the ring can be restarted from `base`).
    Stopped {
        base: u16,
        wait: bool,
        reply: Sender<Result<u16, CheckError>>,
    },
    /// Start the ring again on the (possibly new) connection and resume.
    Restart {
        reply: Sender<Result<(), CheckError>>,
    },
    /// Collect late completions and exit.
    Finish,
}

/// A worker's result.
#[derive(Debug, Default)]
pub(super) struct WorkerFinal {
    pub samples: Vec<String>,
}

struct Req {
    write: bool,
    disk_off: u64,
    segs: Vec<(u64, u32)>,
    slots: Vec<u64>,
    gen: u32,
}

/// One queue's side of the guest workload, as the generic loop ([`Runner`]) drives it: the
/// seam between what every device shares (commands from the VMM thread, stopping, waiting
/// for what the backend took, restarting on a new connection, hang detection) and what a
/// device's driver does (blk requests, net RX buffers, net TX frames).
pub(super) trait QueueWork: Send {
    /// The ring's index (vhost-user queue index).
    fn index(&self) -> usize;
    /// The ring.
    fn queue(&self) -> &SplitQueue;
    /// Notifies the device unconditionally.
    fn kick(&mut self) -> Result<(), DriverError>;
    /// More guest memory for buffers (a hot-added region's slots).
    fn add_slots(&mut self, slots: Vec<u64>);
    /// Puts new work on the ring (requests, RX buffers, TX frames) and kicks if the device
    /// asks. Called only while the ring runs.
    fn fill(&mut self) -> Result<(), CheckError>;
    /// Waits up to `timeout` for the next completion and handles it; `Ok(false)`: none came.
    fn wait_one(&mut self, timeout: Duration) -> Result<bool, CheckError>;
    /// Handles every completion in the used ring now; returns how many.
    fn drain(&mut self) -> Result<usize, CheckError>;
    /// `Some(why)` if the device owes work (requests in flight, frames handed to its port)
    /// and nothing completed for `idle`: the queue hung.
    fn stalled(&self, idle: Duration) -> Option<String>;
    /// Called when the ring (re)starts: the work owed so far is forgotten.
    fn restarted(&mut self) {}
    /// Records a problem for the report.
    fn sample(&mut self, s: String);
    /// The samples recorded so far.
    fn take_samples(&mut self) -> Vec<String>;
}

/// The command loop around a [`QueueWork`], on its own thread.
pub(super) struct Runner<W: QueueWork> {
    work: W,
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    timeout: Duration,
    stall_timeout: Duration,
    /// The ring went bad after a stop: stop reading it.
    broken: bool,
}

impl<W: QueueWork> Runner<W> {
    /// `work` commanded through `rx`; `timeout` bounds waits for the backend, `stall_timeout`
    /// is the hang detection of [`QueueWork::stalled`].
    pub fn new(
        work: W,
        shared: Arc<Shared>,
        rx: Receiver<Cmd>,
        timeout: Duration,
        stall_timeout: Duration,
    ) -> Self {
        Runner {
            work,
            shared,
            rx,
            timeout,
            stall_timeout,
            broken: false,
        }
    }

    /// Runs until [`Cmd::Finish`] (or the VMM thread goes away). An error ends the worker and
    /// raises the shared abort flag.
    pub fn run(mut self) -> Result<WorkerFinal, CheckError> {
        let res = self.run_inner();
        if res.is_err() {
            self.shared.abort.store(true, Ordering::SeqCst);
        }
        res
    }

    fn run_inner(&mut self) -> Result<WorkerFinal, CheckError> {
        let mut running = true;
        let mut last_progress = Instant::now();
        loop {
            // Commands first; block on them only while the ring is stopped.
            loop {
                let cmd = if running {
                    match self.rx.try_recv() {
                        Ok(c) => c,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return Ok(self.finish()),
                    }
                } else {
                    match self.rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(c) => c,
                        Err(RecvTimeoutError::Timeout) => {
                            // Keep collecting (and checking) late completions while stopped;
                            // a ring the backend broke after its stop is only reported.
                            self.drain_stopped();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return Ok(self.finish()),
                    }
                };
                match cmd {
                    Cmd::AddSlots(s) => self.work.add_slots(s),
                    Cmd::Stopped { base, wait, reply } => {
                        running = false;
                        match self.stopped(base, wait) {
                            Ok(b) => {
                                let _ = reply.send(Ok(b));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(again(&e)));
                                return Err(e);
                            }
                        }
                    }
                    Cmd::Restart { reply } => {
                        if let Err(e) = self.restart() {
                            let _ = reply.send(Err(again(&e)));
                            return Err(e);
                        }
                        let _ = reply.send(Ok(()));
                        running = true;
                        last_progress = Instant::now();
                    }
                    Cmd::Finish => return Ok(self.finish()),
                }
            }
            if !running {
                continue;
            }
            self.work.fill()?;
            if self.work.wait_one(POLL)? {
                last_progress = Instant::now();
            } else {
                let stall = self.stall_timeout.min(self.timeout);
                if last_progress.elapsed() > stall {
                    if let Some(why) = self.work.stalled(last_progress.elapsed()) {
                        return Err(CheckError::Protocol(format!(
                            "queue {} hung: {why} (--stall-timeout)",
                            self.work.index()
                        )));
                    }
                }
            }
            if self.work.drain()? > 0 {
                last_progress = Instant::now();
            }
        }
    }

    fn drain_stopped(&mut self) {
        if self.broken {
            return;
        }
        if let Err(e) = self.work.drain() {
            self.broken = true;
            let i = self.work.index();
            self.work.sample(format!("queue {i}: after the stop: {e}"));
        }
    }

    fn finish(&mut self) -> WorkerFinal {
        self.drain_stopped();
        WorkerFinal {
            samples: self.work.take_samples(),
        }
    }

    fn stopped(&mut self, base: u16, wait: bool) -> Result<u16, CheckError> {
        if !wait {
            self.drain_stopped();
            return Ok(self.work.queue().last_used());
        }
        self.work.drain()?;
        let deadline = Instant::now() + self.timeout;
        while self.work.queue().last_used() != base {
            if Instant::now() >= deadline {
                return Err(CheckError::Protocol(format!(
                    "queue {}: GET_VRING_BASE returned {base}, but only {} chain(s) completed within {:?}",
                    self.work.index(),
                    self.work.queue().last_used(),
                    self.timeout
                )));
            }
            // Polls the used ring at least every POLL, so a backend that no longer signals
            // (its call fd was dropped with the stop) is still heard.
            self.work.wait_one(POLL)?;
        }
        Ok(self.work.queue().last_used())
    }

    fn restart(&mut self) -> Result<(), CheckError> {
        let i = self.work.index();
        {
            let mut conn = self.shared.conn();
            conn.start_queue(i, self.work.queue())
                .map_err(|e| queue_err(i, e))?;
        }
        self.work.restarted();
        // Chains published while the ring was stopped are waiting: tell the device.
        self.work.kick().map_err(|e| queue_err(i, e))
    }
}

impl QueueWork for Worker {
    fn index(&self) -> usize {
        self.cfg.index
    }
    fn queue(&self) -> &SplitQueue {
        self.q.queue()
    }
    fn kick(&mut self) -> Result<(), DriverError> {
        self.q.kick()
    }
    fn add_slots(&mut self, slots: Vec<u64>) {
        self.free_slots.extend(slots);
    }
    fn fill(&mut self) -> Result<(), CheckError> {
        Worker::fill(self)
    }
    fn wait_one(&mut self, timeout: Duration) -> Result<bool, CheckError> {
        match self.q.wait(timeout) {
            Ok(c) => {
                self.complete(c)?;
                Ok(true)
            }
            Err(DriverError::Timeout(..)) => Ok(false),
            Err(e) => Err(queue_err(self.cfg.index, e)),
        }
    }
    fn drain(&mut self) -> Result<usize, CheckError> {
        Worker::drain(self)
    }
    fn stalled(&self, idle: Duration) -> Option<String> {
        (self.q.in_flight() > 0).then(|| {
            format!(
                "{} request(s) in flight (used index {}), none completed for {idle:?}",
                self.q.in_flight(),
                self.q.queue().last_used()
            )
        })
    }
    fn sample(&mut self, s: String) {
        Worker::sample(self, s)
    }
    fn take_samples(&mut self) -> Vec<String> {
        std::mem::take(&mut self.samples)
    }
}

/// The blk workload of one queue.
pub(super) struct Worker {
    cfg: WorkerCfg,
    q: BlkQueue,
    shared: Arc<Shared>,
    stats: Arc<WorkerStats>,
    rng: Rng,
    free_slots: Vec<u64>,
    reqs: Vec<Option<Req>>,
    free_tokens: Vec<usize>,
    gens: Vec<u32>,
    busy_r: Vec<u16>,
    busy_w: Vec<bool>,
    next_gen: u32,
    buf: Vec<u8>,
    samples: Vec<String>,
    io_samples: usize,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: WorkerCfg,
        q: BlkQueue,
        slots: Vec<u64>,
        shared: Arc<Shared>,
        stats: Arc<WorkerStats>,
    ) -> Self {
        let blocks = (cfg.disk_len / BLOCK) as usize;
        let conflicts = cfg.workload != Workload::Read;
        let rng = Rng::new(pattern::splitmix64(cfg.seed ^ (cfg.index as u64 + 1)));
        Worker {
            q,
            shared,
            stats,
            rng,
            free_slots: slots,
            reqs: Vec::new(),
            free_tokens: Vec::new(),
            gens: vec![0; blocks],
            busy_r: if conflicts {
                vec![0; blocks]
            } else {
                Vec::new()
            },
            busy_w: if conflicts {
                vec![false; blocks]
            } else {
                Vec::new()
            },
            next_gen: 1,
            buf: Vec::new(),
            samples: Vec::new(),
            io_samples: 0,
            cfg,
        }
    }

    fn drain(&mut self) -> Result<usize, CheckError> {
        let mut n = 0;
        while let Some(c) = self
            .q
            .try_complete()
            .map_err(|e| queue_err(self.cfg.index, e))?
        {
            self.complete(c)?;
            n += 1;
        }
        Ok(n)
    }

    fn sample(&mut self, s: String) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(s);
        }
    }

    /// Submits requests until `depth` are in flight (or no slot / disk range is free).
    fn fill(&mut self) -> Result<(), CheckError> {
        let mut submitted = 0;
        while self.q.in_flight() < self.cfg.depth {
            let Some(req) = self.make_request()? else {
                break;
            };
            let token = self.free_tokens.pop().unwrap_or_else(|| {
                self.reqs.push(None);
                self.reqs.len() - 1
            });
            let op = if req.write {
                BlkOp::Write {
                    sector: req.disk_off / 512,
                    data: &req.segs,
                }
            } else {
                BlkOp::Read {
                    sector: req.disk_off / 512,
                    data: &req.segs,
                }
            };
            if let Err(e) = self.q.submit(op, token as u64) {
                self.release(&req);
                self.free_tokens.push(token);
                return Err(queue_err(self.cfg.index, e));
            }
            self.reqs[token] = Some(req);
            submitted += 1;
        }
        if submitted > 0 {
            self.q
                .queue_mut()
                .kick_if_needed()
                .map_err(|e| queue_err(self.cfg.index, e))?;
        }
        Ok(())
    }

    /// Segment lengths (multiples of 512, each at most `max_seg_len`) adding up to `total`.
    fn split(&mut self, total: u64) -> Vec<u64> {
        let unit = 512;
        let units = total / unit;
        let max_units = (self.cfg.max_seg_len / unit).max(1);
        let min_n = units.div_ceil(max_units) as usize;
        let max_n = (self.cfg.max_segs).min(units as usize).max(min_n);
        let n = self.rng.range(min_n as u64, max_n as u64) as usize;
        for _ in 0..8 {
            let mut cuts: Vec<u64> = (0..n - 1).map(|_| self.rng.range(1, units - 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            if cuts.len() != n - 1 {
                continue;
            }
            let mut parts = Vec::with_capacity(n);
            let mut prev = 0;
            for c in cuts.into_iter().chain(std::iter::once(units)) {
                parts.push(c - prev);
                prev = c;
            }
            if parts.iter().all(|&p| p >= 1 && p <= max_units) {
                return parts.into_iter().map(|p| p * unit).collect();
            }
        }
        // Even split (always within the limits).
        let base = units / n as u64;
        let extra = units % n as u64;
        (0..n as u64)
            .map(|i| (base + u64::from(i < extra)) * unit)
            .collect()
    }

    fn make_request(&mut self) -> Result<Option<Req>, CheckError> {
        let c = &self.cfg;
        let write = match c.workload {
            Workload::Read => false,
            Workload::Write => true,
            Workload::Mixed => self.rng.below(2) == 0,
        };
        let blocks = c.disk_len / BLOCK;
        let (lo, hi) = (c.min_io / BLOCK, (c.max_io / BLOCK).min(blocks));
        let nblk = self.rng.range(lo.min(hi), hi);
        let mut first = None;
        for _ in 0..4 {
            let f = self.rng.below(blocks - nblk + 1) as usize;
            let range = f..f + nblk as usize;
            let ok = if c.workload == Workload::Read {
                true
            } else if write {
                self.busy_r[range.clone()].iter().all(|&r| r == 0)
                    && self.busy_w[range.clone()].iter().all(|&w| !w)
            } else {
                self.busy_w[range.clone()].iter().all(|&w| !w)
                    && self.gens[range].iter().all(|&g| g != UNKNOWN)
            };
            if ok {
                first = Some(f);
                break;
            }
        }
        let Some(first) = first else {
            return Ok(None);
        };
        let lens = self.split(nblk * BLOCK);
        if self.free_slots.len() < lens.len() {
            return Ok(None);
        }
        let disk_off = self.cfg.disk_first + first as u64 * BLOCK;
        let gen = if write {
            let g = self.next_gen;
            self.next_gen = (self.next_gen + 1) & 0xffff;
            g
        } else {
            0
        };
        let mut segs = Vec::with_capacity(lens.len());
        let mut slots = Vec::with_capacity(lens.len());
        let mut at = disk_off;
        for len in lens {
            let i = self.rng.below(self.free_slots.len() as u64) as usize;
            let slot = self.free_slots.swap_remove(i);
            let room = (self.cfg.slot - len) / self.cfg.align;
            let gpa = slot + self.rng.below(room + 1) * self.cfg.align;
            if write {
                self.buf.resize(len as usize, 0);
                pattern::fill(&mut self.buf, at, gen as u16, self.cfg.salt);
                if let Err(e) = self.shared.ram.write(gpa, &self.buf) {
                    self.free_slots.push(slot);
                    self.free_slots.extend(slots);
                    return Err(queue_err(self.cfg.index, e));
                }
            }
            segs.push((gpa, len as u32));
            slots.push(slot);
            at += len;
        }
        let req = Req {
            write,
            disk_off,
            segs,
            slots,
            gen,
        };
        if self.cfg.workload != Workload::Read {
            for b in first..first + nblk as usize {
                if write {
                    self.busy_w[b] = true;
                } else {
                    self.busy_r[b] += 1;
                }
            }
        }
        Ok(Some(req))
    }

    /// Returns a request's slots and disk blocks.
    fn release(&mut self, req: &Req) {
        self.free_slots.extend(req.slots.iter().copied());
        if self.cfg.workload == Workload::Read {
            return;
        }
        let len: u64 = req.segs.iter().map(|s| u64::from(s.1)).sum();
        let first = ((req.disk_off - self.cfg.disk_first) / BLOCK) as usize;
        for b in first..first + (len / BLOCK) as usize {
            if req.write {
                self.busy_w[b] = false;
            } else {
                self.busy_r[b] -= 1;
            }
        }
    }

    fn complete(&mut self, c: Completion) -> Result<(), CheckError> {
        let req = usize::try_from(c.token)
            .ok()
            .and_then(|t| self.reqs.get_mut(t))
            .and_then(Option::take)
            .ok_or_else(|| {
                CheckError::Protocol(format!(
                    "queue {}: completion for unknown request {}",
                    self.cfg.index, c.token
                ))
            })?;
        self.free_tokens.push(c.token as usize);
        self.release(&req);
        let len: u64 = req.segs.iter().map(|s| u64::from(s.1)).sum();
        let st = &self.stats;
        st.completed.fetch_add(1, Ordering::Relaxed);
        st.bytes.fetch_add(len, Ordering::Relaxed);
        if req.write {
            st.writes.fetch_add(1, Ordering::Relaxed);
        } else {
            st.reads.fetch_add(1, Ordering::Relaxed);
        }
        let ok = c.blk_status() == BlkStatus::Ok;
        let first_block = ((req.disk_off - self.cfg.disk_first) / BLOCK) as usize;
        let nblocks = (len / BLOCK) as usize;
        if !ok {
            st.io_errors.fetch_add(1, Ordering::Relaxed);
            self.io_samples += 1;
            if self.io_samples <= 2 {
                self.sample(format!(
                    "queue {}: {} of {len} bytes at disk offset {:#x} completed with status {:?}",
                    self.cfg.index,
                    if req.write { "write" } else { "read" },
                    req.disk_off,
                    c.blk_status()
                ));
            }
            if req.write {
                self.gens[first_block..first_block + nblocks].fill(UNKNOWN);
            }
        } else if req.write {
            self.gens[first_block..first_block + nblocks].fill(req.gen);
        } else if self.cfg.verify {
            self.verify(&req)?;
        }
        if self.cfg.track && self.shared.logging.load(Ordering::Relaxed) {
            let w = &self.shared.written;
            let mut pages = 0;
            if !req.write && ok {
                for &(gpa, l) in &req.segs {
                    let (p0, p1) = (
                        gpa >> LOG_PAGE_SHIFT,
                        (gpa + u64::from(l) - 1) >> LOG_PAGE_SHIFT,
                    );
                    w.set_range(p0, p1 - p0 + 1);
                    pages += p1 - p0 + 1;
                }
            }
            if let Some(g) = c.status_gpa {
                w.set_range(g >> LOG_PAGE_SHIFT, 1);
                pages += 1;
            }
            let used = self.q.queue().layout().used_pages();
            w.set_range(*used.start(), used.end() - used.start() + 1);
            self.stats
                .device_page_writes
                .fetch_add(pages, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Checks a completed read against the pattern of the blocks' current generations.
    fn verify(&mut self, req: &Req) -> Result<(), CheckError> {
        let salt = self.cfg.salt;
        let mut at = req.disk_off;
        let mut bad: Option<String> = None;
        for &(gpa, len) in &req.segs {
            self.buf.resize(len as usize, 0);
            self.shared
                .ram
                .read(gpa, &mut self.buf)
                .map_err(|e| queue_err(self.cfg.index, e))?;
            if bad.is_none() {
                for (j, w) in self.buf.chunks_exact(8).enumerate() {
                    let off = at + j as u64 * 8;
                    let g = self.gens[((off - self.cfg.disk_first) / BLOCK) as usize];
                    let want = pattern::word(off, g as u16, salt);
                    let got = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                    if got != want {
                        let (o, gg) = pattern::decode(got, salt);
                        let what = if got == 0 {
                            "zeroes".to_string()
                        } else if o == off {
                            format!("generation {gg} (stale data)")
                        } else if o < (1 << 44) {
                            format!("data of disk offset {o:#x} generation {gg} (misplaced)")
                        } else {
                            format!("{got:#018x} (not pattern data)")
                        };
                        bad = Some(format!(
                            "queue {}: read of disk offset {:#x}: buffer GPA {:#x} (disk offset {off:#x}) should hold generation {g}, holds {what}",
                            self.cfg.index,
                            req.disk_off,
                            gpa + j as u64 * 8
                        ));
                        break;
                    }
                }
            }
            at += u64::from(len);
        }
        if let Some(b) = bad {
            self.stats.data_errors.fetch_add(1, Ordering::Relaxed);
            self.sample(b);
        }
        Ok(())
    }
}

/// A copy of `e` (for the reply to the VMM thread; the worker returns the original).
fn again(e: &CheckError) -> CheckError {
    match e {
        CheckError::Unsupported(m) => CheckError::Unsupported(m.clone()),
        CheckError::Protocol(m) => CheckError::Protocol(m.clone()),
        CheckError::Setup(m) => CheckError::Setup(m.clone()),
        CheckError::Invalid(m) => CheckError::Invalid(m.clone()),
    }
}

pub(super) fn queue_err(index: usize, e: DriverError) -> CheckError {
    CheckError::Protocol(format!("queue {index}: {e}"))
}
