//! The net workload of one ring: [`RxWork`] (an RX queue with mergeable buffers) and
//! [`TxWork`] (a TX queue), each a [`QueueWork`] the shared loop drives.
//!
//! ## RX
//! The RX queue keeps every descriptor posted: one device-writable buffer of
//! [`NetOptions::rx_buf`] bytes each (mergeable RX buffers, virtio spec 5.1.6.3.1, as Linux
//! posts them), at a random 8-byte-aligned place in a random free data slot, so buffers land
//! in every region and some straddle a page boundary. Before it is posted each buffer is
//! filled with a **unique poison pattern** (every word names its guest-physical address and
//! the buffer's posting generation): a buffer page the backend wrote and did not mark differs
//! on the destination whatever the frame bytes were. A received frame is reassembled from its
//! `num_buffers` used elements (all of which must be in the used ring once the first is, as
//! Linux's `receive_mergeable` requires), its lengths checked, its contents and sequence
//! number checked when the checker made it (`--traffic socket:PATH`), and its buffers go back
//! to the free slots; [`QueueWork::fill`] posts fresh ones (only while the ring runs).
//!
//! Pages the device wrote while logging was on — the buffers' bytes up to the used length and
//! the used ring — are recorded in [`Shared::written`], for the report.
//!
//! ## TX
//! The TX queue sends the guest's own frames (the [`traffic`](super::traffic) format, direction
//! TX) from slots in the ring's scratch area, one descriptor with the 12-byte header and the
//! frame, at the injection rate, keeping at most half the ring in flight. The device writes only
//! the used ring.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::CheckError;
use super::options::NetOptions;
use super::pattern::{self, Rng};
use super::rig::Shared;
use super::traffic::{self, Expect, Origin, Parsed, PortStats, DIR_RX, DIR_TX};
use super::worker::{queue_err, QueueWork, WorkerStats, MAX_SAMPLES};
use crate::driver::{Buf, DriverError, GuestRam, SplitQueue, UsedElem};
use crate::log::LOG_PAGE_SHIFT;
use crate::virtio_net::NET_HDR_SIZE;

/// Salt of the RX poison pattern (mixed with the run's salt).
const POISON_SALT: u64 = 0x706f_6973_6f6e_0000;

/// Settings of one net ring.
#[derive(Debug, Clone)]
pub(super) struct NetRingCfg {
    /// The ring's vhost-user index (`2 * pair` RX, `2 * pair + 1` TX).
    pub index: usize,
    pub net: NetOptions,
    /// Bytes per data slot.
    pub slot: u64,
    pub salt: u64,
    /// Whose frames are this run's.
    pub origin: Origin,
    pub seed: u64,
    /// Frames come from the checker: check their contents and sequence numbers.
    pub verify: bool,
    /// The frames each RX queue gets name its own pair (a socket port per pair); else any
    /// pair, and other frames are foreign (a TAP).
    pub per_pair: bool,
    /// Queue pairs of the run.
    pub pairs: u16,
    /// Record the pages the device writes while logging is on.
    pub track: bool,
}

impl NetRingCfg {
    fn pair(&self) -> u16 {
        (self.index / 2) as u16
    }
}

/// A posted RX buffer.
#[derive(Debug, Clone, Copy)]
struct Posted {
    gpa: u64,
    slot: u64,
}

/// The RX queue of one pair (see the module docs).
pub(super) struct RxWork {
    cfg: NetRingCfg,
    q: SplitQueue,
    ram: Arc<GuestRam>,
    shared: Arc<Shared>,
    stats: Arc<WorkerStats>,
    /// The injector's counters of this pair (frames the port accepted), if it injects.
    port: Option<Arc<PortStats>>,
    /// Frames the port had accepted at the last frame received (hang detection).
    port_mark: u64,
    rng: Rng,
    free_slots: Vec<u64>,
    posted: Vec<Option<Posted>>,
    free_tokens: Vec<usize>,
    generation: u64,
    /// Next sequence number expected per pair.
    next_seq: Vec<u64>,
    buf: Vec<u8>,
    word: Vec<u8>,
    samples: Vec<String>,
}

impl RxWork {
    pub fn new(
        cfg: NetRingCfg,
        q: SplitQueue,
        slots: Vec<u64>,
        shared: Arc<Shared>,
        stats: Arc<WorkerStats>,
        port: Option<Arc<PortStats>>,
    ) -> Self {
        let rng = Rng::new(pattern::splitmix64(cfg.seed ^ (cfg.index as u64 + 101)));
        RxWork {
            ram: q.ram().clone(),
            q,
            shared,
            stats,
            port,
            port_mark: 0,
            rng,
            free_slots: slots,
            posted: Vec::new(),
            free_tokens: Vec::new(),
            generation: 0,
            next_seq: vec![0; usize::from(cfg.pairs.max(1))],
            buf: Vec::new(),
            word: Vec::new(),
            samples: Vec::new(),
            cfg,
        }
    }

    fn push_sample(&mut self, s: String) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(s);
        }
    }

    /// Posts one fresh buffer: a random place in a random free slot, poisoned. `false`: no
    /// free slot.
    fn post_one(&mut self) -> Result<bool, CheckError> {
        if self.free_slots.is_empty() {
            return Ok(false);
        }
        let len = u64::from(self.cfg.net.rx_buf);
        let i = self.rng.below(self.free_slots.len() as u64) as usize;
        let slot = self.free_slots.swap_remove(i);
        let room = (self.cfg.slot - len) / 8;
        let gpa = slot + self.rng.below(room + 1) * 8;
        self.generation += 1;
        let salt = self.cfg.salt ^ POISON_SALT ^ (self.cfg.index as u64) << 40;
        self.word.resize(len as usize, 0);
        // Offsets of guest-physical addresses and a 16-bit generation: unique per posting.
        pattern::fill(&mut self.word, gpa, self.generation as u16, salt);
        let idx = self.cfg.index;
        if let Err(e) = self.ram.write(gpa, &self.word) {
            self.free_slots.push(slot);
            return Err(queue_err(idx, e));
        }
        let token = self.free_tokens.pop().unwrap_or_else(|| {
            self.posted.push(None);
            self.posted.len() - 1
        });
        match self
            .q
            .add_chain(&[Buf::writable(gpa, len as u32)], token as u64)
        {
            Ok(_) => {
                self.posted[token] = Some(Posted { gpa, slot });
                Ok(true)
            }
            Err(e) => {
                self.free_slots.push(slot);
                self.free_tokens.push(token);
                Err(queue_err(idx, e))
            }
        }
    }

    /// Takes a used element's buffer back (its slot becomes free): `(gpa, used length)`.
    fn take(&mut self, e: &UsedElem) -> Result<(u64, u32), CheckError> {
        let p = usize::try_from(e.token)
            .ok()
            .and_then(|t| self.posted.get_mut(t))
            .and_then(Option::take)
            .ok_or_else(|| {
                CheckError::Protocol(format!(
                    "queue {}: used element for unknown RX buffer {}",
                    self.cfg.index, e.token
                ))
            })?;
        self.free_tokens.push(e.token as usize);
        self.free_slots.push(p.slot);
        if e.len > self.cfg.net.rx_buf {
            return Err(CheckError::Protocol(format!(
                "queue {}: RX used length {} exceeds the {}-byte buffer at GPA {:#x}",
                self.cfg.index, e.len, self.cfg.net.rx_buf, p.gpa
            )));
        }
        Ok((p.gpa, e.len))
    }

    /// Handles a frame whose first used element is `first`.
    fn frame(&mut self, first: UsedElem) -> Result<(), CheckError> {
        let idx = self.cfg.index;
        let (gpa, len) = self.take(&first)?;
        if (len as usize) < NET_HDR_SIZE {
            return Err(CheckError::Protocol(format!(
                "queue {idx}: RX used length {len} is shorter than the {NET_HDR_SIZE}-byte header"
            )));
        }
        // virtio_net_hdr_v1: num_buffers is the last field (bytes 10..12).
        let mut hdr = [0u8; NET_HDR_SIZE];
        self.ram
            .read(gpa, &mut hdr)
            .map_err(|e| queue_err(idx, e))?;
        let n = u16::from_le_bytes([hdr[10], hdr[11]]);
        if n == 0 || n > self.q.size() {
            return Err(CheckError::Protocol(format!(
                "queue {idx}: RX header says num_buffers {n}"
            )));
        }
        let mut bufs = vec![(gpa, len)];
        for k in 1..n {
            let e = self
                .q
                .pop_used()
                .map_err(|e| queue_err(idx, e))?
                .ok_or_else(|| {
                    CheckError::Protocol(format!(
                        "queue {idx}: a frame of {n} RX buffers was published with only {k} in the used ring"
                    ))
                })?;
            bufs.push(self.take(&e)?);
        }
        let bytes: u64 = bufs.iter().map(|b| u64::from(b.1)).sum::<u64>() - NET_HDR_SIZE as u64;
        let st = self.stats.clone();
        st.completed.fetch_add(1, Ordering::Relaxed);
        st.rx_frames.fetch_add(1, Ordering::Relaxed);
        st.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        st.bytes.fetch_add(bytes, Ordering::Relaxed);
        st.rx_buffers.fetch_add(u64::from(n), Ordering::Relaxed);
        if n > 1 {
            st.rx_merged.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(p) = &self.port {
            self.port_mark = p.sent.load(Ordering::Relaxed);
        }
        if self.cfg.verify {
            self.buf.clear();
            for (k, &(g, l)) in bufs.iter().enumerate() {
                let skip = if k == 0 { NET_HDR_SIZE as u64 } else { 0 };
                let at = self.buf.len();
                self.buf.resize(at + (u64::from(l) - skip) as usize, 0);
                self.ram
                    .read(g + skip, &mut self.buf[at..])
                    .map_err(|e| queue_err(idx, e))?;
            }
            let expect = Expect {
                dir: DIR_RX,
                pair: self.cfg.per_pair.then(|| self.cfg.pair()),
                pairs: self.cfg.pairs,
                lenient: !self.cfg.per_pair,
            };
            match traffic::parse_frame(&self.buf, expect, self.cfg.origin) {
                Parsed::Foreign => {
                    self.stats.rx_foreign.fetch_add(1, Ordering::Relaxed);
                }
                Parsed::Seq(p, seq) if seq >= self.next_seq[usize::from(p)] => {
                    let next = &mut self.next_seq[usize::from(p)];
                    if seq > *next {
                        self.stats.rx_seq_gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    *next = seq + 1;
                }
                Parsed::Seq(p, seq) => {
                    self.stats.data_errors.fetch_add(1, Ordering::Relaxed);
                    let s = format!(
                        "queue {idx}: frame {seq} of pair {p} received after frame {} (duplicate or reordered)",
                        self.next_seq[usize::from(p)] - 1
                    );
                    self.push_sample(s);
                }
                Parsed::Bad(e) => {
                    self.stats.data_errors.fetch_add(1, Ordering::Relaxed);
                    let s = format!(
                        "queue {idx}: frame in {n} buffer(s) at GPA {:#x}: {e}",
                        bufs[0].0
                    );
                    self.push_sample(s);
                }
            }
        }
        if self.cfg.track && self.shared.logging.load(Ordering::Relaxed) {
            let w = &self.shared.written;
            let mut pages = 0;
            for &(g, l) in &bufs {
                if l == 0 {
                    continue;
                }
                let (p0, p1) = (
                    g >> LOG_PAGE_SHIFT,
                    (g + u64::from(l) - 1) >> LOG_PAGE_SHIFT,
                );
                w.set_range(p0, p1 - p0 + 1);
                pages += p1 - p0 + 1;
            }
            let used = self.q.layout().used_pages();
            w.set_range(*used.start(), used.end() - used.start() + 1);
            st.device_page_writes.fetch_add(pages, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl QueueWork for RxWork {
    fn index(&self) -> usize {
        self.cfg.index
    }
    fn queue(&self) -> &SplitQueue {
        &self.q
    }
    fn kick(&mut self) -> Result<(), DriverError> {
        self.q.kick()
    }
    fn add_slots(&mut self, slots: Vec<u64>) {
        self.free_slots.extend(slots);
    }
    fn fill(&mut self) -> Result<(), CheckError> {
        let mut n = 0;
        while self.q.num_free() > 0 && self.post_one()? {
            n += 1;
        }
        if n > 0 {
            self.q
                .kick_if_needed()
                .map_err(|e| queue_err(self.cfg.index, e))?;
        }
        Ok(())
    }
    fn wait_one(&mut self, timeout: Duration) -> Result<bool, CheckError> {
        match self.q.poll_used(timeout) {
            Ok(e) => {
                self.frame(e)?;
                Ok(true)
            }
            Err(DriverError::Timeout(..)) => Ok(false),
            Err(e) => Err(queue_err(self.cfg.index, e)),
        }
    }
    fn drain(&mut self) -> Result<usize, CheckError> {
        let mut n = 0;
        while let Some(e) = self
            .q
            .pop_used()
            .map_err(|e| queue_err(self.cfg.index, e))?
        {
            self.frame(e)?;
            n += 1;
        }
        Ok(n)
    }
    fn stalled(&self, idle: Duration) -> Option<String> {
        let sent = self.port.as_ref()?.sent.load(Ordering::Relaxed);
        (sent > self.port_mark && self.q.in_flight() > 0).then(|| {
            format!(
                "{} RX buffer(s) posted and {} frame(s) handed to the backend's port since the last one arrived, none received for {idle:?}",
                self.q.in_flight(),
                sent - self.port_mark
            )
        })
    }
    fn restarted(&mut self) {
        if let Some(p) = &self.port {
            self.port_mark = p.sent.load(Ordering::Relaxed);
        }
    }
    fn sample(&mut self, s: String) {
        self.push_sample(s)
    }
    fn take_samples(&mut self) -> Vec<String> {
        std::mem::take(&mut self.samples)
    }
}

/// The TX queue of one pair (see the module docs).
pub(super) struct TxWork {
    cfg: NetRingCfg,
    q: SplitQueue,
    ram: Arc<GuestRam>,
    shared: Arc<Shared>,
    stats: Arc<WorkerStats>,
    /// The first slot's guest-physical address; slot `i` is `TX_SLOT` bytes further each.
    base: u64,
    slot_len: u32,
    free: Vec<u16>,
    rng: Rng,
    seq: u64,
    start: Instant,
    frame: Vec<u8>,
    samples: Vec<String>,
}

impl TxWork {
    pub fn new(
        cfg: NetRingCfg,
        q: SplitQueue,
        base: u64,
        slot_len: u32,
        shared: Arc<Shared>,
        stats: Arc<WorkerStats>,
    ) -> Self {
        let rng = Rng::new(pattern::splitmix64(cfg.seed ^ (cfg.index as u64 + 202)));
        TxWork {
            ram: q.ram().clone(),
            free: (0..q.size() / 2).rev().collect(),
            q,
            shared,
            stats,
            base,
            slot_len,
            rng,
            seq: 0,
            start: Instant::now(),
            frame: Vec::new(),
            samples: Vec::new(),
            cfg,
        }
    }

    fn complete(&mut self, e: UsedElem) -> Result<(), CheckError> {
        let idx = self.cfg.index;
        let slot = u16::try_from(e.token)
            .ok()
            .filter(|&s| s < self.q.size() / 2 && !self.free.contains(&s))
            .ok_or_else(|| {
                CheckError::Protocol(format!(
                    "queue {idx}: used element for unknown TX slot {}",
                    e.token
                ))
            })?;
        self.free.push(slot);
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
        if e.len != 0 && self.samples.len() < MAX_SAMPLES {
            // The device writes nothing into TX buffers (virtio spec 2.7.8: the used length
            // is the bytes written); reported, not fatal.
            self.samples.push(format!(
                "queue {idx}: TX used length {} (the device writes nothing into TX buffers)",
                e.len
            ));
        }
        if self.cfg.track && self.shared.logging.load(Ordering::Relaxed) {
            let used = self.q.layout().used_pages();
            self.shared
                .written
                .set_range(*used.start(), used.end() - used.start() + 1);
        }
        Ok(())
    }
}

impl QueueWork for TxWork {
    fn index(&self) -> usize {
        self.cfg.index
    }
    fn queue(&self) -> &SplitQueue {
        &self.q
    }
    fn kick(&mut self) -> Result<(), DriverError> {
        self.q.kick()
    }
    fn add_slots(&mut self, _slots: Vec<u64>) {}
    fn fill(&mut self) -> Result<(), CheckError> {
        if !self.cfg.net.tx {
            return Ok(());
        }
        let idx = self.cfg.index;
        let due = if self.cfg.net.rate == 0 {
            u64::MAX
        } else {
            (self.start.elapsed().as_secs_f64() * self.cfg.net.rate as f64) as u64
        };
        let max = (self.slot_len as usize - NET_HDR_SIZE) as u64;
        let (lo, hi) = (
            u64::from(self.cfg.net.frame_min).min(max),
            u64::from(self.cfg.net.frame_max).min(max),
        );
        let mut n = 0;
        while self.seq < due {
            let Some(slot) = self.free.pop() else { break };
            let len = self.rng.range(lo, hi) as usize;
            traffic::make_frame(
                &mut self.frame,
                DIR_TX,
                self.cfg.pair(),
                self.seq,
                len,
                self.cfg.origin,
            );
            let gpa = self.base + u64::from(slot) * u64::from(self.slot_len);
            let hdr = [0u8; NET_HDR_SIZE];
            let w = self
                .ram
                .write(gpa, &hdr)
                .and_then(|()| self.ram.write(gpa + NET_HDR_SIZE as u64, &self.frame));
            let r = w.and_then(|()| {
                self.q.add_chain(
                    &[Buf::readable(gpa, (NET_HDR_SIZE + len) as u32)],
                    u64::from(slot),
                )
            });
            if let Err(e) = r {
                self.free.push(slot);
                return Err(queue_err(idx, e));
            }
            self.seq += 1;
            n += 1;
        }
        if n > 0 {
            self.q.kick_if_needed().map_err(|e| queue_err(idx, e))?;
        }
        Ok(())
    }
    fn wait_one(&mut self, timeout: Duration) -> Result<bool, CheckError> {
        match self.q.poll_used(timeout) {
            Ok(e) => {
                self.complete(e)?;
                Ok(true)
            }
            Err(DriverError::Timeout(..)) => Ok(false),
            Err(e) => Err(queue_err(self.cfg.index, e)),
        }
    }
    fn drain(&mut self) -> Result<usize, CheckError> {
        let mut n = 0;
        while let Some(e) = self
            .q
            .pop_used()
            .map_err(|e| queue_err(self.cfg.index, e))?
        {
            self.complete(e)?;
            n += 1;
        }
        Ok(n)
    }
    fn stalled(&self, idle: Duration) -> Option<String> {
        (self.q.in_flight() > 0).then(|| {
            format!(
                "{} TX frame(s) in flight (used index {}), none completed for {idle:?}",
                self.q.in_flight(),
                self.q.last_used()
            )
        })
    }
    fn sample(&mut self, s: String) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(s);
        }
    }
    fn take_samples(&mut self) -> Vec<String> {
        std::mem::take(&mut self.samples)
    }
}
