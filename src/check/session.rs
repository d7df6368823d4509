//! A check run: set-up, disk preparation, the workload threads, pre-copy rounds with faults,
//! the final stop and the verdict.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};

use super::dest::{vmm_err, Vmm};
use super::pattern::{self, BLOCK};
use super::plan::{plan, MemPlan};
use super::report::{BackendInfo, FaultRecord, LostPage, Report, StopStats};
use super::worker::{Cmd, Worker, WorkerCfg, WorkerFinal, WorkerStats};
use super::{CheckError, CheckOptions, Fault, Workload};
use crate::backend::VHOST_F_LOG_ALL;
use crate::driver::blk::{BlkConfigInfo, BlkOp, BlkStatus};
use crate::driver::{BlkQueue, Connection, DriverError, GuestRam};
use crate::log::{log_size_for, LogRegion};
use crate::vmm::{MigrationBitmap, SharedLog, MAX_GPA_END};

/// What the VMM thread and the workers share.
pub(crate) struct Shared {
    pub ram: Arc<GuestRam>,
    conn: Mutex<Option<Connection>>,
    /// Pages the device wrote while logging was on (derived from completed requests).
    pub written: MigrationBitmap,
    /// Logging is on: workers record device-written pages.
    pub logging: AtomicBool,
    /// A worker failed: the VMM thread stops the run.
    pub abort: AtomicBool,
}

impl Shared {
    /// The connection (locked).
    pub fn conn(&self) -> ConnGuard<'_> {
        ConnGuard(self.conn.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The locked connection; dereferences to it (it is present except during a reconnect).
pub(crate) struct ConnGuard<'a>(MutexGuard<'a, Option<Connection>>);

impl ConnGuard<'_> {
    /// Runs a frontend operation on the connection.
    pub fn start_queue(
        &mut self,
        index: usize,
        q: &crate::driver::SplitQueue,
    ) -> Result<(), DriverError> {
        self.get()?.start_queue(index, q)
    }

    /// Runs `f` on the connection.
    pub fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, DriverError>,
    ) -> Result<T, CheckError> {
        let c = self.get()?;
        f(c).map_err(CheckError::from)
    }

    fn get(&mut self) -> Result<&mut Connection, DriverError> {
        self.0
            .as_mut()
            .ok_or_else(|| DriverError::Invalid("not connected".into()))
    }
}

/// Everything set up before the workload starts.
pub(crate) struct Setup {
    pub shared: Arc<Shared>,
    pub plan: MemPlan,
    pub queues: Vec<BlkQueue>,
    pub backend: BackendInfo,
    pub kvm: Arc<LogRegion>,
    pub depth: usize,
    pub max_segs: usize,
    pub max_seg_len: u64,
    /// Largest request the backend's segment limits allow (a multiple of 4 KiB).
    pub max_req: u64,
    pub salt: u64,
}

/// Data slot size for a largest request of `max_io` bytes.
pub(crate) fn slot_size(max_io: u64) -> u64 {
    max_io.max(4096)
}

fn proto(context: &str, e: impl std::fmt::Display) -> CheckError {
    CheckError::Protocol(format!("{context}: {e}"))
}

/// Connects, negotiates, checks that the backend can log, plans memory and starts the rings.
pub(crate) fn setup(opts: &CheckOptions, slot: u64) -> Result<Setup, CheckError> {
    opts.validate()?;
    let sock = opts.socket.display().to_string();
    let mut conn = Connection::connect(&opts.socket, opts.timeout)
        .map_err(|e| proto(&format!("cannot connect to {sock}"), e))?;
    conn.set_timeout(Some(opts.timeout))
        .map_err(|e| CheckError::Setup(format!("watchdog: {e}")))?;
    conn.negotiate_blk()
        .map_err(|e| proto("feature negotiation", e))?;
    let offered = conn.offered_features();
    if offered & VHOST_F_LOG_ALL == 0 {
        return Err(CheckError::Unsupported(
            "it does not offer VHOST_F_LOG_ALL".into(),
        ));
    }
    if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0
        || !conn
            .offered_protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
    {
        return Err(CheckError::Unsupported(
            "it does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD, so it cannot map a shared-memory log"
                .into(),
        ));
    }
    let acked = conn.acked_features();
    let protocol = conn.protocol_features();
    let cfg = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        let raw = conn
            .get_config(0, BlkConfigInfo::LEN as u32)
            .map_err(|e| proto("GET_CONFIG", e))?;
        Some(BlkConfigInfo::parse(&raw))
    } else {
        None
    };
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
        conn.queue_num()
    } else {
        1
    };
    if has(VIRTIO_BLK_F_MQ) {
        if let Some(c) = &cfg {
            queue_num = queue_num.min(u64::from(c.num_queues.max(1)));
        }
    }
    let nq = opts.queues.unwrap_or(queue_num.clamp(1, 2) as u16);
    if u64::from(nq) > queue_num {
        return Err(CheckError::Invalid(format!(
            "the backend supports {queue_num} queue(s), {nq} requested"
        )));
    }
    let capacity = cfg.map_or(0, |c| c.capacity.saturating_mul(512));
    let span = if capacity > 0 {
        opts.disk_span.min(capacity)
    } else {
        opts.disk_span
    } / BLOCK
        * BLOCK;
    let per_queue = if opts.workload == Workload::Read {
        span
    } else {
        span / u64::from(nq) / BLOCK * BLOCK
    };
    if per_queue < opts.min_io {
        return Err(CheckError::Invalid(format!(
            "the disk span ({span} bytes) is too small for {nq} queue(s) and requests of at least {} bytes",
            opts.min_io
        )));
    }
    let read_only = has(VIRTIO_BLK_F_RO);
    if read_only && opts.workload != Workload::Read {
        return Err(CheckError::Invalid(
            "the device is read-only: use --workload read".into(),
        ));
    }
    if read_only && opts.prepare.unwrap_or(true) {
        return Err(CheckError::Invalid(
            "the device is read-only, so the checker cannot write its pattern: create the image with \
             `vhost-dirtylog-check --write-image PATH` (same --seed and --disk-span) and pass --no-prepare"
                .into(),
        ));
    }
    let seg_max = match &cfg {
        Some(c) if has(VIRTIO_BLK_F_SEG_MAX) => c.seg_max.max(1) as usize,
        _ => 4,
    };
    let max_segs = seg_max.min(4);
    let size_max = match &cfg {
        Some(c) if has(VIRTIO_BLK_F_SIZE_MAX) && c.size_max >= 512 => u64::from(c.size_max),
        _ => u64::MAX,
    };
    let max_seg_len = slot.min(size_max) / 512 * 512;
    if max_seg_len * max_segs as u64 / BLOCK * BLOCK < opts.min_io {
        return Err(CheckError::Invalid(format!(
            "the backend's limits (size_max {size_max}, seg_max {seg_max}) cannot carry requests of {} bytes",
            opts.min_io
        )));
    }
    let depth = usize::from(opts.depth).min(usize::from(opts.queue_size) / (max_segs + 2));
    if depth == 0 {
        return Err(CheckError::Invalid(format!(
            "a queue of {} entries cannot hold a request of {} descriptors",
            opts.queue_size,
            max_segs + 2
        )));
    }
    let plan = plan(
        &opts.layout,
        nq,
        opts.queue_size,
        opts.isolate_avail_event,
        slot,
        &opts.faults,
    )?;
    let per_queue_slots = plan.slots.len() / usize::from(nq);
    if per_queue_slots < depth * max_segs {
        return Err(CheckError::Invalid(format!(
            "not enough guest memory: {per_queue_slots} buffer slots of {} KiB per queue, {} needed for {depth} requests in flight",
            slot >> 10,
            depth * max_segs
        )));
    }
    let ram = Arc::new(GuestRam::new(&plan.regions).map_err(|e| CheckError::Setup(e.to_string()))?);
    let kvm_size = log_size_for(plan.max_gpa_end())
        .ok_or_else(|| CheckError::Invalid("guest memory too large".into()))?;
    let kvm = Arc::new(
        LogRegion::anonymous(kvm_size as usize)
            .map_err(|e| CheckError::Setup(format!("guest dirty log: {e}")))?,
    );
    ram.track_writes(Some(kvm.clone()));
    conn.set_mem_table(&ram)
        .map_err(|e| proto("SET_MEM_TABLE", e))?;
    let mut queues = Vec::new();
    for i in 0..usize::from(nq) {
        let q = BlkQueue::new(
            ram.clone(),
            plan.queues[i],
            plan.scratch[i],
            conn.event_idx(),
        )
        .map_err(|e| CheckError::Setup(e.to_string()))?;
        conn.start_queue(i, q.queue())
            .map_err(|e| proto(&format!("starting queue {i}"), e))?;
        queues.push(q);
    }
    let backend = BackendInfo {
        socket: sock,
        features: format!("{offered:#x}"),
        protocol_features: format!("{:#x}", conn.offered_protocol_features().bits()),
        queue_num,
        capacity,
        span,
        read_only,
        event_idx: conn.event_idx(),
        mem_slots: protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
    };
    let written = MigrationBitmap::new(plan.max_gpa_end().div_ceil(4096)).map_err(vmm_err)?;
    Ok(Setup {
        shared: Arc::new(Shared {
            ram,
            conn: Mutex::new(Some(conn)),
            written,
            logging: AtomicBool::new(false),
            abort: AtomicBool::new(false),
        }),
        plan,
        queues,
        backend,
        kvm,
        depth,
        max_segs,
        max_seg_len,
        max_req: (max_seg_len * max_segs as u64 / BLOCK * BLOCK).min(opts.max_io),
        salt: pattern::salt_for(opts.seed),
    })
}

/// Writes the generation-0 pattern over the disk span through queue 0.
pub(crate) fn prepare(s: &mut Setup, opts: &CheckOptions) -> Result<(), CheckError> {
    let span = s.backend.span;
    let chunk = s.max_req.min(128 << 10);
    let ram = s.shared.ram.clone();
    let q = &mut s.queues[0];
    let depth = s.depth.min(s.plan.slots.len() / s.max_segs).max(1);
    let mut free: Vec<usize> = (0..depth).collect();
    let mut buf = vec![0u8; s.max_seg_len as usize];
    let mut off = 0u64;
    let mut done = 0u64;
    let deadline_each = opts.timeout;
    while done < span {
        while off < span {
            let Some(k) = free.pop() else { break };
            let len = chunk.min(span - off);
            let mut segs = Vec::new();
            let mut at = 0;
            for j in 0..s.max_segs {
                if at >= len {
                    break;
                }
                let l = s.max_seg_len.min(len - at);
                let gpa = s.plan.slots[k * s.max_segs + j];
                pattern::fill(&mut buf[..l as usize], off + at, 0, s.salt);
                ram.write(gpa, &buf[..l as usize])?;
                segs.push((gpa, l as u32));
                at += l;
            }
            q.submit(
                BlkOp::Write {
                    sector: off / 512,
                    data: &segs,
                },
                k as u64,
            )?;
            off += len;
        }
        q.kick()?;
        let c = q
            .wait(deadline_each)
            .map_err(|e| proto("preparing the disk", e))?;
        if c.blk_status() != BlkStatus::Ok {
            return Err(CheckError::Protocol(format!(
                "preparing the disk: a write completed with status {:?}",
                c.blk_status()
            )));
        }
        free.push(c.token as usize);
        done += chunk;
    }
    // Everything completed (one completion per chunk); flush so the pattern is durable.
    let c = q.flush(opts.timeout).map_err(|e| proto("flush", e))?;
    if !c.is_ok() && c.blk_status() != BlkStatus::Unsupp {
        return Err(CheckError::Protocol(format!(
            "flush after preparing the disk: status {:?}",
            c.blk_status()
        )));
    }
    Ok(())
}

/// The workload threads.
pub(crate) struct Workers {
    tx: Vec<Sender<Cmd>>,
    handles: Vec<Option<JoinHandle<Result<WorkerFinal, CheckError>>>>,
    pub stats: Vec<Arc<WorkerStats>>,
}

impl Workers {
    /// Starts one worker per queue of `s`.
    pub fn spawn(
        s: &mut Setup,
        opts: &CheckOptions,
        align: u64,
        verify: bool,
        track: bool,
    ) -> Result<Workers, CheckError> {
        let nq = s.queues.len();
        let span = s.backend.span;
        let slice = span / nq as u64 / BLOCK * BLOCK;
        let mut w = Workers {
            tx: Vec::new(),
            handles: Vec::new(),
            stats: Vec::new(),
        };
        for (i, q) in std::mem::take(&mut s.queues).into_iter().enumerate() {
            let (disk_first, disk_len) = if opts.workload == Workload::Read {
                (0, span)
            } else {
                (i as u64 * slice, slice)
            };
            let cfg = WorkerCfg {
                index: i,
                workload: opts.workload,
                depth: s.depth,
                min_io: opts.min_io,
                max_io: s.max_req.min(disk_len),
                max_segs: s.max_segs,
                max_seg_len: s.max_seg_len,
                align,
                slot: s.plan.slot,
                disk_first,
                disk_len,
                salt: s.salt,
                seed: opts.seed,
                verify,
                track,
                timeout: opts.timeout,
            };
            let slots: Vec<u64> = s.plan.slots.iter().skip(i).step_by(nq).copied().collect();
            let (tx, rx) = channel();
            let stats = Arc::new(WorkerStats::default());
            let worker = Worker::new(cfg, q, slots, s.shared.clone(), rx, stats.clone());
            let h = std::thread::Builder::new()
                .name(format!("check-queue-{i}"))
                .spawn(move || worker.run())
                .map_err(|e| CheckError::Setup(format!("cannot start a worker thread: {e}")))?;
            w.tx.push(tx);
            w.handles.push(Some(h));
            w.stats.push(stats);
        }
        Ok(w)
    }

    pub fn len(&self) -> usize {
        self.tx.len()
    }

    pub fn send(&self, i: usize, cmd: Cmd) -> Result<(), CheckError> {
        self.tx[i]
            .send(cmd)
            .map_err(|_| CheckError::Protocol(format!("queue {i}: worker has stopped")))
    }

    /// Sum of a counter over all workers.
    pub fn sum(&self, f: impl Fn(&WorkerStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        self.stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Tells every worker to finish and collects their results; the first worker error wins.
    pub fn finish(&mut self) -> Result<Vec<WorkerFinal>, CheckError> {
        for tx in &self.tx {
            let _ = tx.send(Cmd::Finish);
        }
        let mut out = Vec::new();
        let mut err = None;
        for h in self.handles.iter_mut().filter_map(Option::take) {
            match h.join() {
                Ok(Ok(f)) => out.push(f),
                Ok(Err(e)) => {
                    err.get_or_insert(e);
                }
                Err(_) => {
                    err.get_or_insert(CheckError::Setup("a worker thread panicked".into()));
                }
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.tx.clear();
        for h in self.handles.iter_mut().filter_map(Option::take) {
            let _ = h.join();
        }
    }
}

fn recv<T>(
    rx: &Receiver<Result<T, CheckError>>,
    timeout: Duration,
    what: &str,
) -> Result<T, CheckError> {
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => Err(CheckError::Protocol(format!(
            "{what}: the worker did not answer"
        ))),
    }
}

/// Runs the check described by `opts` against the backend and returns its report.
///
/// `Err` means no verdict could be reached (the backend cannot log, broke the protocol,
/// stalled); a completed run with lost pages is an `Ok` report whose
/// [`exit_code`](super::Report::exit_code) is [`EXIT_LOST`](super::EXIT_LOST).
pub fn run(opts: &CheckOptions) -> Result<super::Report, CheckError> {
    let slot = slot_size(opts.max_io);
    let mut s = setup(opts, slot)?;
    if opts.prepare.unwrap_or(!s.backend.read_only) {
        prepare(&mut s, opts)?;
    }
    let log = SharedLog::new(s.shared.ram.gpa_end()).map_err(vmm_err)?;
    let vmm = Vmm::new(
        s.shared.ram.clone(),
        log,
        s.kvm.clone(),
        opts.deferred,
        opts.clear_chunk,
    )?;
    let workers = Workers::spawn(&mut s, opts, 512, true, true)?;
    let mut r = Run {
        opts,
        shared: s.shared.clone(),
        plan: s.plan.clone(),
        backend: s.backend.clone(),
        depth: s.depth,
        vmm,
        workers,
        fault_log: Vec::new(),
        start: Instant::now(),
        round: 0,
        progress: opts.progress && std::io::stderr().is_terminal(),
    };
    let res = r.migrate();
    if res.is_err() {
        r.shared.logging.store(false, Ordering::Relaxed);
        // The workers' own error, if one failed, explains more than ours.
        r.workers.finish()?;
    }
    res
}

struct Run<'a> {
    opts: &'a CheckOptions,
    shared: Arc<Shared>,
    plan: MemPlan,
    backend: BackendInfo,
    depth: usize,
    vmm: Vmm,
    workers: Workers,
    fault_log: Vec<FaultRecord>,
    start: Instant,
    round: u64,
    progress: bool,
}

impl Run<'_> {
    fn conn<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Connection) -> Result<T, DriverError>,
    ) -> Result<T, CheckError> {
        let mut g = self.shared.conn();
        let c = g.get().map_err(|e| proto(what, e))?;
        f(c).map_err(|e| proto(what, e))
    }

    fn check_abort(&self) -> Result<(), CheckError> {
        if self.shared.abort.load(Ordering::SeqCst) {
            return Err(CheckError::Protocol("a queue worker failed".into()));
        }
        Ok(())
    }

    /// `SET_LOG_BASE`, `LOG_ALL` on, and the ring addresses again with the log flag (QEMU's
    /// order when a migration starts).
    fn start_logging(&mut self) -> Result<(), CheckError> {
        let region = self.vmm.log().dirty_log_region();
        self.conn("SET_LOG_BASE", |c| c.set_log_base(region))?;
        self.set_log_all(true)?;
        self.shared.logging.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn set_log_all(&self, on: bool) -> Result<(), CheckError> {
        let ram = self.shared.ram.clone();
        let queues = self.plan.queues.clone();
        self.conn("SET_FEATURES (LOG_ALL)", |c| {
            c.set_log_all(on)?;
            for (i, l) in queues.iter().enumerate() {
                c.set_vring_addr_at(i, &ram, *l)?;
            }
            Ok(())
        })
    }

    fn migrate(&mut self) -> Result<Report, CheckError> {
        // Let the workload run before the migration starts, as a guest's would.
        std::thread::sleep(Duration::from_millis(50));
        self.check_abort()?;
        let completed_before = self.workers.sum(|s| &s.completed);
        let bytes_before = self.workers.sum(|s| &s.bytes);
        let reads_before = self.workers.sum(|s| &s.reads);
        let writes_before = self.workers.sum(|s| &s.writes);
        self.start = Instant::now();
        self.start_logging()?;
        self.vmm.first_round()?;
        let faults = self.opts.faults.clone();
        let m = faults.len() as u64;
        let mut next_fault = 0usize;
        loop {
            self.round += 1;
            let next = self.start + self.opts.round_interval * self.round as u32;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            self.check_abort()?;
            self.vmm.round()?;
            let elapsed = self.start.elapsed();
            while (next_fault as u64) < m {
                let k = next_fault as u64 + 1;
                let due = match self.opts.rounds {
                    Some(n) => self.round * (m + 1) >= n * k,
                    None => {
                        elapsed.as_secs_f64() * (m + 1) as f64
                            >= self.opts.duration.as_secs_f64() * k as f64
                    }
                };
                if !due {
                    break;
                }
                let f = faults[next_fault];
                let at_s = elapsed.as_secs_f64();
                let detail = self.fault(f)?;
                self.fault_log.push(FaultRecord {
                    fault: f,
                    at_s,
                    round: self.round,
                    detail,
                });
                next_fault += 1;
            }
            self.show_progress();
            let done = match self.opts.rounds {
                Some(n) => self.round >= n,
                None => self.start.elapsed() >= self.opts.duration,
            };
            if done && next_fault == faults.len() {
                break;
            }
        }
        let stop = self.final_stop()?;
        let elapsed = self.start.elapsed().as_secs_f64() - self.opts.settle.as_secs_f64();
        if self.progress {
            eprint!("\r\x1b[K");
        }
        self.vmm.stats.rounds = self.vmm.stats.rounds.max(1);
        let finals = self.workers.finish()?;
        self.vmm.final_guest_sync()?;
        let lost = self.vmm.compare();
        let requests = self.workers.sum(|s| &s.completed) - completed_before;
        let bytes = self.workers.sum(|s| &s.bytes) - bytes_before;
        let elapsed = elapsed.max(1e-3);
        let mut report = Report {
            backend: self.backend.clone(),
            layout: self.plan.regions.iter().map(|r| (r.gpa, r.size)).collect(),
            queues: self.workers.len() as u16,
            queue_size: self.opts.queue_size,
            depth: self.depth as u16,
            workload: self.opts.workload,
            faults: self.opts.faults.clone(),
            deferred: self.opts.deferred,
            seed: self.opts.seed,
            elapsed_s: elapsed,
            requests,
            reads: self.workers.sum(|s| &s.reads) - reads_before,
            writes: self.workers.sum(|s| &s.writes) - writes_before,
            bytes,
            iops: requests as f64 / elapsed,
            mib_s: bytes as f64 / elapsed / f64::from(1 << 20),
            io_errors: self.workers.sum(|s| &s.io_errors),
            data_errors: self.workers.sum(|s| &s.data_errors),
            device_pages_written: self.shared.written.count_dirty(),
            device_page_writes: self.workers.sum(|s| &s.device_page_writes),
            ram_pages: self.vmm.ram_pages(),
            vmm: self.vmm.stats.clone(),
            log_bytes: self.vmm.log().size(),
            lost_pages: lost.len() as u64,
            lost_unmarked: 0,
            lost_late: 0,
            lost_data: 0,
            lost_status: 0,
            lost_used_ring: 0,
            lost_samples: Vec::new(),
            stop,
            fault_log: std::mem::take(&mut self.fault_log),
            samples: finals.into_iter().flat_map(|f| f.samples).collect(),
            verdict: String::new(),
            exit_code: 0,
        };
        for &p in &lost {
            let late = self.vmm.log_has(p);
            let kind = self.page_kind(p);
            if late {
                report.lost_late += 1;
            } else {
                report.lost_unmarked += 1;
            }
            match kind {
                "data" => report.lost_data += 1,
                "status" => report.lost_status += 1,
                "used-ring" => report.lost_used_ring += 1,
                _ => {}
            }
            if report.lost_samples.len() < 16 {
                report.lost_samples.push(LostPage {
                    gpa: format!("{:#x}", p << 12),
                    kind,
                    marked_late: late,
                });
            }
        }
        report.conclude();
        Ok(report)
    }

    fn page_kind(&self, page: u64) -> &'static str {
        if self
            .plan
            .queues
            .iter()
            .any(|l| l.used_pages().contains(&page))
        {
            return "used-ring";
        }
        let scratch = BlkQueue::scratch_bytes(self.opts.queue_size);
        if self
            .plan
            .scratch
            .iter()
            .any(|&s| (s >> 12..=(s + scratch - 1) >> 12).contains(&page))
        {
            return "status";
        }
        if self.shared.written.test(page) {
            return "data";
        }
        "other"
    }

    fn show_progress(&self) {
        if !self.progress {
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        let total = match self.opts.rounds {
            Some(n) => format!("round {}/{n}", self.round),
            None => format!(
                "{t:.1}/{:.1} s, round {}",
                self.opts.duration.as_secs_f64(),
                self.round
            ),
        };
        let req = self.workers.sum(|s| &s.completed);
        let bytes = self.workers.sum(|s| &s.bytes);
        eprint!(
            "\r\x1b[K  migrating: {total} | {req} requests, {:.0} MiB | {} pages marked, {} copied",
            bytes as f64 / f64::from(1 << 20),
            self.vmm.stats.pages_marked,
            self.vmm.stats.pages_copied
        );
    }

    fn fault(&mut self, f: Fault) -> Result<String, CheckError> {
        match f {
            Fault::LogResize => self.log_resize(),
            Fault::MemTable => self.mem_table(),
            Fault::LogToggle => self.log_toggle(),
            Fault::Reconnect => self.reconnect(),
        }
    }

    fn log_resize(&mut self) -> Result<String, CheckError> {
        let old_size = self.vmm.log().size();
        let end = (self.vmm.log().gpa_end().saturating_mul(2)).min(MAX_GPA_END);
        let new = SharedLog::new(end).map_err(vmm_err)?;
        let new_size = new.size();
        self.vmm.grow_for(&new)?;
        let region = new.dirty_log_region();
        self.conn("SET_LOG_BASE (resize)", |c| c.set_log_base(region))?;
        let before = self.vmm.stats.drained_pages;
        drop(self.vmm.switch_log(new));
        Ok(format!(
            "log {old_size} -> {new_size} bytes, {} page(s) drained from the old log",
            self.vmm.stats.drained_pages - before
        ))
    }

    fn mem_table(&mut self) -> Result<String, CheckError> {
        let (Some(hot), Some(spare)) = (self.plan.hot, self.plan.spare) else {
            return Ok("no regions planned".into());
        };
        let ram = self.shared.ram.clone();
        let slots = self.backend.mem_slots;
        ram.add_region(hot)
            .map_err(|e| CheckError::Setup(e.to_string()))?;
        if slots {
            self.conn("ADD_MEM_REG", |c| c.add_mem_region(&ram, hot.gpa))?;
        } else {
            self.conn("SET_MEM_TABLE (region added)", |c| c.set_mem_table(&ram))?;
        }
        self.vmm.add_region(hot)?;
        let n = self.workers.len();
        for i in 0..n {
            let s: Vec<u64> = self
                .plan
                .hot_slots
                .iter()
                .skip(i)
                .step_by(n)
                .copied()
                .collect();
            self.workers.send(i, Cmd::AddSlots(s))?;
        }
        let removed = ram
            .remove_region(spare.gpa)
            .map_err(|e| CheckError::Setup(e.to_string()))?;
        if slots {
            self.conn("REM_MEM_REG", |c| c.remove_mem_region(&removed))?;
        } else {
            self.conn("SET_MEM_TABLE (region removed)", |c| c.set_mem_table(&ram))?;
        }
        self.vmm.remove_region(spare.gpa);
        drop(removed);
        let how = if slots {
            self.conn("SET_MEM_TABLE (re-send)", |c| c.set_mem_table(&ram))?;
            "ADD_MEM_REG, REM_MEM_REG, then the whole table again with SET_MEM_TABLE"
        } else {
            "SET_MEM_TABLE twice (no CONFIGURE_MEM_SLOTS)"
        };
        Ok(format!(
            "added {} KiB at {:#x} (used by later requests), removed {} KiB at {:#x}: {how}",
            hot.size >> 10,
            hot.gpa,
            spare.size >> 10,
            spare.gpa
        ))
    }

    fn log_toggle(&mut self) -> Result<String, CheckError> {
        self.shared.logging.store(false, Ordering::Relaxed);
        self.set_log_all(false)?;
        let before = self.workers.sum(|s| &s.completed);
        let off = self.opts.round_interval.max(Duration::from_millis(20));
        std::thread::sleep(off);
        let during = self.workers.sum(|s| &s.completed) - before;
        self.set_log_all(true)?;
        self.shared.logging.store(true, Ordering::Relaxed);
        // Whatever the device wrote while logging was off is unknown: resend everything.
        self.vmm.mark_all_ram();
        Ok(format!(
            "LOG_ALL off for {} ms ({during} requests completed unlogged), on again; all RAM marked dirty",
            off.as_millis()
        ))
    }

    /// Stops every ring and waits until everything the backend took has completed (before a
    /// restart); returns `(base, used index at the reply)` per ring.
    fn stop_rings(&mut self) -> Result<Vec<(u16, u16)>, CheckError> {
        let mut out = Vec::new();
        let mut replies = Vec::new();
        for i in 0..self.workers.len() {
            let base = self.conn("GET_VRING_BASE", |c| c.stop_queue(i))?;
            out.push((base, self.used_idx(i)?));
            let (tx, rx) = channel();
            self.workers.send(
                i,
                Cmd::Stopped {
                    base,
                    wait: true,
                    reply: tx,
                },
            )?;
            replies.push(rx);
        }
        let t = self.opts.timeout * 2;
        for rx in replies {
            recv(&rx, t, "stopping a ring")?;
        }
        Ok(out)
    }

    fn reconnect(&mut self) -> Result<String, CheckError> {
        let bases = self.stop_rings()?;
        // Disconnect: the backend sees the socket close.
        *self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let opts = self.opts;
        let mut conn =
            Connection::connect(&opts.socket, opts.timeout).map_err(|e| proto("reconnect", e))?;
        conn.set_timeout(Some(opts.timeout))
            .map_err(|e| CheckError::Setup(format!("watchdog: {e}")))?;
        conn.negotiate_blk()
            .map_err(|e| proto("reconnect: feature negotiation", e))?;
        conn.set_mem_table(&self.shared.ram)
            .map_err(|e| proto("reconnect: SET_MEM_TABLE", e))?;
        conn.set_log_base(self.vmm.log().dirty_log_region())
            .map_err(|e| proto("reconnect: SET_LOG_BASE", e))?;
        conn.set_log_all(true)
            .map_err(|e| proto("reconnect: LOG_ALL", e))?;
        *self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        let mut replies = Vec::new();
        for i in 0..self.workers.len() {
            let (tx, rx) = channel();
            self.workers.send(i, Cmd::Restart { reply: tx })?;
            replies.push(rx);
        }
        for rx in replies {
            recv(&rx, self.opts.timeout * 2, "restarting a ring")?;
        }
        Ok(format!(
            "rings stopped at {:?}, disconnected, reconnected with the same log and LOG_ALL on, rings resumed",
            bases.iter().map(|b| b.0).collect::<Vec<_>>()
        ))
    }

    /// `GET_VRING_BASE` on every ring, the last sync and copy, then a settle time.
    ///
    /// A backend that fails here (drops the connection after the first ring stopped, say)
    /// does not end the run: the rings it did stop are accounted for, the error is recorded,
    /// and the comparison still shows what its late writes did to guest memory.
    fn final_stop(&mut self) -> Result<StopStats, CheckError> {
        let mut st = StopStats::default();
        let mut stops = Vec::new();
        let mut replies = Vec::new();
        for i in 0..self.workers.len() {
            match self.conn("GET_VRING_BASE", |c| c.stop_queue(i)) {
                Ok(base) => {
                    let used = self.used_idx(i)?;
                    stops.push(Some((base, used)));
                }
                Err(e) => {
                    st.error.get_or_insert_with(|| format!("queue {i}: {e}"));
                    stops.push(None);
                }
            }
            let (tx, rx) = channel();
            self.workers.send(
                i,
                Cmd::Stopped {
                    base: 0,
                    wait: false,
                    reply: tx,
                },
            )?;
            replies.push(rx);
        }
        for rx in replies {
            recv(&rx, self.opts.timeout * 2, "stopping a ring")?;
        }
        self.vmm.round()?;
        std::thread::sleep(self.opts.settle);
        for (i, stop) in stops.iter().enumerate() {
            let Some((base, used)) = *stop else { continue };
            st.inflight_at_stop += u64::from(base.wrapping_sub(used));
            let after = self.used_idx(i)?.wrapping_sub(used);
            let allowed = base.wrapping_sub(used);
            st.completed_after_stop += u64::from(after.min(allowed));
            st.processed_after_stop += u64::from(after.saturating_sub(allowed));
        }
        Ok(st)
    }

    /// The used index queue `i`'s device has published.
    fn used_idx(&self, i: usize) -> Result<u16, CheckError> {
        self.shared
            .ram
            .load(self.plan.queues[i].used + 2, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| CheckError::Setup(e.to_string()))
    }
}
