//! The asynchronous dataplane: one io_uring per queue, up to the queue's depth in the disk.
//!
//! ## Shape
//! Each queue's worker thread (vhost-user-backend's `VringEpollHandler`) owns one `Engine`:
//! an io_uring whose completion eventfd is registered in the worker's epoll set as a device
//! event ([`super::BlkDevice::attach`]). A kick or a completion event runs `Engine::run`:
//! reap completions, pop new chains and turn them into SQEs, submit, and repeat until nothing
//! moves; then notify the driver once (EVENT_IDX suppression through `needs_notification`).
//! Completion order is free (virtio 1.2 §5.2.6: the device may complete requests in any order).
//!
//! ## Data and marks (DESIGN invariant 2: data before mark)
//! - Reads into guest memory go zero-copy (`IORING_OP_READ[V]` straight into the host mapping
//!   of the guest buffers) on the buffered descriptor, and on the `O_DIRECT` one when offset,
//!   length and buffers meet its alignment. The kernel writes behind vm-memory's back, so the
//!   completion path calls [`DirtyLog::mark`](crate::log::DirtyLog::mark) for every guest
//!   segment *after* the CQE arrived (the data landed), also on error (part may have landed).
//! - `O_DIRECT` reads with unaligned buffers go through an aligned bounce buffer, copied into
//!   guest memory with vm-memory (`write_slice`), which marks through the region bitmap.
//! - The status byte (`write_obj`) and the used element (virtio-queue's `add_used`) go through
//!   vm-memory and are marked by [`GuestDirtyBitmap`](crate::log::GuestDirtyBitmap).
//!
//! Every in-flight request holds an `Arc` of the guest-memory snapshot its buffers were resolved
//! in, so the mappings the kernel writes into stay alive until the completion even if the
//! frontend replaces the memory table meanwhile.
//!
//! ## FLUSH
//! `IORING_OP_FSYNC` (`fdatasync`) with `IOSQE_IO_DRAIN`: the kernel starts it only after every
//! SQE submitted before it completed, so it covers every write completed before the flush was
//! submitted (virtio 1.2 §5.2.6.1), and the writes still in flight then too. With the write
//! cache off (writethrough) every write, discard and write-zeroes gets its own fsync after its
//! data completed.
//!
//! ## Quiescing
//! Requests popped and not yet in the used ring are counted in the ring's [`Gate`](super::vring::Gate);
//! `GET_VRING_BASE` (`stop_vring`) and `SET_VRING_ENABLE(0)` (`BlkVring::set_enabled`) wait
//! for it to reach zero after the ring stopped popping, so their replies follow the last
//! mark, status byte and used element of the ring.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueOwnedT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{unsupported, AlignedBuf};
use super::io::{bounce_chunk, gather, host_iovs, scatter, DataPath, IoContext, Mem};
use super::request::{self, Limits, Request, RequestKind, SectorRange};
use super::vring::BlkVring;
use super::QueueStats;
use crate::backend::DirtyGuestMemory;
use crate::virtio_blk::ID_BYTES;
use vhost_user_backend::VringT;

/// How the device moves data between the disk and guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AioMode {
    /// io_uring when the kernel allows it, else synchronous (said once at start).
    #[default]
    Auto,
    /// io_uring, or fail at start.
    IoUring,
    /// One blocking `preadv`/`pwritev` per request, per queue (the pre-io_uring path).
    Sync,
}

impl std::str::FromStr for AioMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AioMode::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(AioMode::IoUring),
            "sync" | "threads" => Ok(AioMode::Sync),
            _ => Err(format!(
                "unknown aio mode {s:?}: expected io_uring, sync or auto"
            )),
        }
    }
}

impl std::fmt::Display for AioMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AioMode::Auto => "auto",
            AioMode::IoUring => "io_uring",
            AioMode::Sync => "sync",
        })
    }
}

/// Whether this process can use io_uring for the dataplane: a ring can be set up and it
/// supports every opcode the engine uses. Probed once per process; a failure (old kernel:
/// `ENOSYS`, seccomp or `kernel.io_uring_disabled`: `EPERM`) is logged once.
pub fn io_uring_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let r = probe();
            match &r {
                Ok(()) => log::info!("dataplane: io_uring"),
                Err(e) => log::warn!(
                    "io_uring is not available ({e}); serving requests synchronously \
                     (preadv/pwritev, one at a time per queue)"
                ),
            }
            r
        })
        .clone()
}

fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    for (name, code) in [
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("READV", opcode::Readv::CODE),
        ("WRITEV", opcode::Writev::CODE),
        ("FSYNC", opcode::Fsync::CODE),
        ("FALLOCATE", opcode::Fallocate::CODE),
    ] {
        if !p.is_supported(code) {
            return Err(format!("the kernel lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}

/// Most iovecs in one `READV`/`WRITEV` (`IOV_MAX`).
const MAX_IOV: usize = 1024;

/// The step a request is at.
enum Step {
    /// Zero-copy transfer over the host addresses of the guest buffers; `next` is the first
    /// iovec not yet fully transferred, `offset` the disk offset it starts at.
    Vectored {
        fd: RawFd,
        write: bool,
        iovs: Vec<libc::iovec>,
        next: usize,
        offset: u64,
        /// Reads: mark every guest segment after the completion (the kernel wrote it).
        mark: bool,
    },
    /// `O_DIRECT` through an aligned bounce buffer, `BOUNCE_CHUNK` at a time: stream position
    /// `pos`, current chunk `n` bytes.
    Bounce {
        fd: RawFd,
        write: bool,
        buf: AlignedBuf,
        pos: u64,
        n: usize,
    },
    /// `fdatasync` behind every earlier SQE (`IO_DRAIN`).
    Flush,
    /// One `fallocate` per range, all at once.
    Ranges {
        ranges: Vec<SectorRange>,
        discard: bool,
    },
    /// Writethrough: `fdatasync` after the data completed.
    Sync,
}

/// One request in the disk.
struct InFlight {
    head: u16,
    /// The guest-memory snapshot the buffers were resolved in (keeps the mappings alive).
    mem: Arc<Mem>,
    req: Request,
    step: Step,
    path: DataPath,
    err: Option<io::Error>,
    /// SQEs of this request not yet completed.
    pending: u32,
    synced: bool,
}

// SAFETY: the raw pointers in `Step::Vectored` point into the guest mappings kept alive by
// `mem` (an `Arc`, Send + Sync); they are only handed to the kernel and never dereferenced by
// Rust code, so moving the struct to another thread (under the engine's mutex) is sound.
unsafe impl Send for InFlight {}

/// What starting a request produced.
enum Started {
    /// Completed without the disk (parse error, GET_ID): the used length.
    Now(u32),
    /// In the disk.
    InFlight,
}

/// Why [`Engine::run`] runs and how the ring was negotiated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunFlags {
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub(crate) event_idx: bool,
    /// Woken by the ring's completion eventfd (not a kick).
    pub(crate) completion_event: bool,
}

/// One queue's io_uring and its requests in flight.
pub(crate) struct Engine {
    ring: IoUring,
    event: EventFd,
    slots: Vec<Option<Box<InFlight>>>,
    free: Vec<usize>,
    /// Built SQEs not yet in the submission queue.
    sqes: Vec<squeue::Entry>,
    /// Test hook: while set, SQEs are kept back (the requests stay "in the disk").
    hold: Arc<AtomicBool>,
    vring: Option<BlkVring>,
    cqes: Vec<(u64, i32)>,
    done: Vec<(u16, u32)>,
    need_signal: bool,
    pub(crate) stats: QueueStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("in_flight", &self.in_flight())
            .field("held_sqes", &self.sqes.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A ring for a queue of up to `queue_size` requests; completions signal `event_fd()`.
    pub(crate) fn new(queue_size: u16, hold: Arc<AtomicBool>) -> io::Result<Engine> {
        let entries = u32::from(queue_size).next_power_of_two().max(8);
        let ring = IoUring::builder().build(entries)?;
        let event = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let n = usize::from(queue_size);
        Ok(Engine {
            ring,
            event,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            sqes: Vec::with_capacity(n),
            hold,
            vring: None,
            cqes: Vec::with_capacity(2 * n),
            done: Vec::with_capacity(n),
            need_signal: false,
            stats: QueueStats::default(),
        })
    }

    /// The eventfd the ring signals on every completion.
    pub(crate) fn event(&self) -> &EventFd {
        &self.event
    }

    /// Requests popped and not yet completed.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The ring this engine serves, once it has run.
    pub(crate) fn vring(&self) -> Option<&BlkVring> {
        self.vring.as_ref()
    }

    /// Reaps completions, starts new requests and submits, until nothing moves; then notifies
    /// the driver if it asked for it.
    pub(crate) fn run(
        &mut self,
        vring: &BlkVring,
        atomic: &DirtyGuestMemory,
        ctx: &IoContext<'_>,
        limits: &Limits,
        how: RunFlags,
        qidx: usize,
    ) {
        let event_idx = how.event_idx;
        if how.completion_event {
            // Consume the event first: a CQE posted after the reap below re-signals.
            let _ = self.event.read();
        }
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        // Completions that arrive while this loop runs (most page-cache reads complete inside
        // the submit call) are reaped by it: no eventfd wake-up for them (Linux 5.8+).
        self.ring.completion().disable_eventfd();
        loop {
            let mut progress = self.reap(vring, ctx, qidx);
            progress |= self.pop(vring, atomic, ctx, limits, event_idx, qidx);
            self.submit(qidx);
            if !progress {
                self.ring.completion().enable_eventfd();
                // A CQE posted before the enable did not signal: look once more (the kernel
                // posts, then reads the flag; full barrier between our flag store and tail load).
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                if self.ring.completion().is_empty() {
                    break;
                }
                self.ring.completion().disable_eventfd();
            }
        }
        self.signal(vring, qidx);
    }

    /// Waits for every request in the disk and completes it (data, marks, status, used ring).
    /// For teardown: the worker thread is gone, nothing else touches the ring.
    pub(crate) fn drain(&mut self, ctx: &IoContext<'_>, qidx: usize) {
        self.hold.store(false, Ordering::Relaxed);
        let Some(vring) = self.vring.clone() else {
            return;
        };
        while self.in_flight() > 0 {
            self.submit(qidx);
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("queue {qidx}: cannot wait for completions: {e}");
                    return;
                }
            }
            self.reap(&vring, ctx, qidx);
        }
        self.signal(&vring, qidx);
    }

    fn signal(&mut self, vring: &BlkVring, qidx: usize) {
        if !self.need_signal {
            return;
        }
        self.need_signal = false;
        let mut state = vring.get_mut();
        // EVENT_IDX: only when used_event was crossed; an unreadable used_event signals.
        if state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("queue {qidx}: cannot signal the used queue: {e}");
            }
        }
    }

    /// Processes every available completion; true if any request finished or moved on.
    fn reap(&mut self, vring: &BlkVring, ctx: &IoContext<'_>, qidx: usize) -> bool {
        self.cqes.clear();
        for c in self.ring.completion() {
            self.cqes.push((c.user_data(), c.result()));
        }
        if self.cqes.is_empty() {
            return false;
        }
        let cqes = std::mem::take(&mut self.cqes);
        for &(ud, res) in &cqes {
            self.on_cqe(ud, res, ctx, qidx);
        }
        self.cqes = cqes;
        if !self.done.is_empty() {
            let mut state = vring.get_mut();
            for &(head, len) in &self.done {
                if let Err(e) = state.add_used(head, len) {
                    log::error!("queue {qidx}: cannot add used entry for descriptor {head}: {e}");
                }
            }
            drop(state);
            vring.gate().sub(self.done.len());
            self.done.clear();
            self.need_signal = true;
        }
        true
    }

    /// Pops and starts new requests while the ring is ready, enabled and slots are free.
    fn pop(
        &mut self,
        vring: &BlkVring,
        atomic: &DirtyGuestMemory,
        ctx: &IoContext<'_>,
        limits: &Limits,
        event_idx: bool,
        qidx: usize,
    ) -> bool {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() || self.free.is_empty() {
            return false;
        }
        let mut mem = atomic.memory().into_inner();
        let mut started = 0usize;
        let mut popped = false;
        'notify: loop {
            if event_idx {
                if let Err(e) = state.disable_notification() {
                    log::warn!("queue {qidx}: cannot disable notifications: {e}");
                }
            }
            loop {
                if self.free.is_empty() {
                    // Full: leave notifications off; completions run this again.
                    break 'notify;
                }
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                    break;
                };
                // Hot-added memory: see BlkDevice::process_queue.
                let now = atomic.memory();
                if !std::ptr::eq::<Mem>(&*now, &*mem) {
                    state.get_queue_mut().go_to_previous_position();
                    mem = now.into_inner();
                    continue;
                }
                popped = true;
                let head = chain.head_index();
                let parsed = request::parse_chain(chain, limits);
                match self.start(head, parsed, &mem, ctx, qidx) {
                    Started::Now(len) => {
                        self.stats.completed += 1;
                        if let Err(e) = state.add_used(head, len) {
                            log::error!(
                                "queue {qidx}: cannot add used entry for descriptor {head}: {e}"
                            );
                            break 'notify;
                        }
                        self.need_signal = true;
                    }
                    Started::InFlight => started += 1,
                }
            }
            if !event_idx {
                break;
            }
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("queue {qidx}: cannot enable notifications: {e}");
                    break;
                }
            }
        }
        // Counted before the ring lock is released: a quiesce that takes the lock after this
        // batch sees them.
        vring.gate().add(started);
        popped
    }

    fn start(
        &mut self,
        head: u16,
        parsed: Result<Request, request::RequestError>,
        mem: &Arc<Mem>,
        ctx: &IoContext<'_>,
        qidx: usize,
    ) -> Started {
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                self.stats.errors += 1;
                if self.stats.errors <= 16 {
                    log::warn!("queue {qidx}: bad request: {e}");
                } else {
                    log::debug!("queue {qidx}: bad request: {e}");
                }
                return Started::Now(match e.status {
                    Some(addr) if mem.write_obj(e.status_code(), addr).is_ok() => 1,
                    _ => 0,
                });
            }
        };
        let (step, path) = match &req.kind {
            RequestKind::GetId => {
                let ok = scatter(mem, &req.data, 0, ctx.serial).is_ok();
                return Started::Now(finish_status(mem, &req, ok, ID_BYTES as u32, qidx));
            }
            RequestKind::Flush => (Step::Flush, DataPath::None),
            RequestKind::Discard(r) => (
                Step::Ranges {
                    ranges: r.clone(),
                    discard: true,
                },
                DataPath::None,
            ),
            RequestKind::WriteZeroes(r) => (
                Step::Ranges {
                    ranges: r.clone(),
                    discard: false,
                },
                DataPath::None,
            ),
            RequestKind::Read | RequestKind::Write if req.data_len == 0 => {
                return Started::Now(finish_status(mem, &req, true, 0, qidx));
            }
            RequestKind::Read | RequestKind::Write => match transfer_step(&req, mem, ctx) {
                Ok(s) => s,
                Err(e) => {
                    self.stats.errors += 1;
                    log::warn!(
                        "queue {qidx}: {:?} at sector {} failed: {e}",
                        req.kind,
                        req.sector
                    );
                    return Started::Now(finish_status(mem, &req, false, 0, qidx));
                }
            },
        };
        let Some(slot) = self.free.pop() else {
            // Unreachable: pop() checks for a free slot first.
            return Started::Now(finish_status(mem, &req, false, 0, qidx));
        };
        self.slots[slot] = Some(Box::new(InFlight {
            head,
            mem: mem.clone(),
            req,
            step,
            path,
            err: None,
            pending: 0,
            synced: false,
        }));
        self.push_step(slot, ctx);
        Started::InFlight
    }

    /// Builds the SQEs of the slot's current step.
    fn push_step(&mut self, slot: usize, ctx: &IoContext<'_>) {
        let Some(f) = self.slots[slot].as_deref_mut() else {
            return;
        };
        let ud = slot as u64;
        let buffered = types::Fd(ctx.disk.file().as_raw_fd());
        match &mut f.step {
            Step::Vectored {
                fd,
                write,
                iovs,
                next,
                offset,
                ..
            } => {
                let rest = &iovs[*next..];
                let e = if rest.len() == 1 {
                    let v = rest[0];
                    let len = u32::try_from(v.iov_len).unwrap_or(!4095);
                    if *write {
                        opcode::Write::new(types::Fd(*fd), v.iov_base.cast(), len)
                            .offset(*offset)
                            .build()
                    } else {
                        opcode::Read::new(types::Fd(*fd), v.iov_base.cast(), len)
                            .offset(*offset)
                            .build()
                    }
                } else {
                    let n = rest.len().min(MAX_IOV) as u32;
                    if *write {
                        opcode::Writev::new(types::Fd(*fd), rest.as_ptr(), n)
                            .offset(*offset)
                            .build()
                    } else {
                        opcode::Readv::new(types::Fd(*fd), rest.as_ptr(), n)
                            .offset(*offset)
                            .build()
                    }
                };
                f.pending += 1;
                self.sqes.push(e.user_data(ud));
            }
            Step::Bounce {
                fd,
                write,
                buf,
                pos,
                n,
            } => {
                let off = f.req.offset() + *pos;
                let b = &mut buf.as_mut_slice()[..*n];
                let e = if *write {
                    opcode::Write::new(types::Fd(*fd), b.as_ptr(), *n as u32)
                        .offset(off)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(*fd), b.as_mut_ptr(), *n as u32)
                        .offset(off)
                        .build()
                };
                f.pending += 1;
                self.sqes.push(e.user_data(ud));
            }
            Step::Flush => {
                f.pending += 1;
                self.sqes.push(
                    opcode::Fsync::new(buffered)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .flags(squeue::Flags::IO_DRAIN)
                        .user_data(ud),
                );
            }
            Step::Sync => {
                f.pending += 1;
                self.sqes.push(
                    opcode::Fsync::new(buffered)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(ud),
                );
            }
            Step::Ranges { ranges, discard } => {
                for (i, r) in ranges.iter().enumerate() {
                    let punch = *discard || r.unmap;
                    let mode = libc::FALLOC_FL_KEEP_SIZE
                        | if punch {
                            libc::FALLOC_FL_PUNCH_HOLE
                        } else {
                            libc::FALLOC_FL_ZERO_RANGE
                        };
                    f.pending += 1;
                    self.sqes.push(
                        opcode::Fallocate::new(buffered, r.len_bytes())
                            .offset(r.offset())
                            .mode(mode)
                            .build()
                            .user_data(ud | ((i as u64) << 32)),
                    );
                }
            }
        }
    }

    /// Moves the built SQEs into the submission queue and submits them (unless held).
    fn submit(&mut self, qidx: usize) {
        if self.sqes.is_empty() || self.hold.load(Ordering::Relaxed) {
            return;
        }
        let mut i = 0;
        loop {
            {
                let mut sq = self.ring.submission();
                while i < self.sqes.len() {
                    // SAFETY: every buffer an SQE points to (guest mappings kept alive by the
                    // request's `mem` snapshot, bounce buffers and iovec arrays owned by the
                    // request's boxed slot) stays valid and unmoved until its CQE is reaped:
                    // slots are only freed in `on_cqe` after the last CQE of the request, and
                    // `drain` waits for all of them before the engine is dropped.
                    if unsafe { sq.push(&self.sqes[i]) }.is_err() {
                        break;
                    }
                    i += 1;
                }
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) => {
                    // EBUSY / EAGAIN: the completion queue is backed up; the next run reaps
                    // first and the SQEs already in the ring are submitted then.
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
                    ) {
                        log::error!("queue {qidx}: io_uring submit failed: {e}");
                    }
                    break;
                }
            }
            if i == self.sqes.len() {
                break;
            }
        }
        self.sqes.drain(..i);
    }

    fn on_cqe(&mut self, ud: u64, res: i32, ctx: &IoContext<'_>, qidx: usize) {
        let slot = (ud & 0xffff_ffff) as usize;
        let sub = (ud >> 32) as usize;
        let Some(f) = self.slots.get_mut(slot).and_then(|s| s.as_deref_mut()) else {
            log::error!("queue {qidx}: completion for unknown slot {slot}");
            return;
        };
        f.pending = f.pending.saturating_sub(1);
        let data_len = f.req.data_len;
        let mut again = false;
        match &mut f.step {
            Step::Vectored {
                write,
                iovs,
                next,
                offset,
                ..
            } => {
                if res < 0 {
                    f.err.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if res == 0 {
                    f.err.get_or_insert(io::Error::from(if *write {
                        io::ErrorKind::WriteZero
                    } else {
                        io::ErrorKind::UnexpectedEof
                    }));
                } else {
                    // Short transfer: resume after the bytes that moved.
                    let mut n = res as usize;
                    *offset += n as u64;
                    while n > 0 && *next < iovs.len() {
                        let v = &mut iovs[*next];
                        if n >= v.iov_len {
                            n -= v.iov_len;
                            *next += 1;
                        } else {
                            // SAFETY: `n < iov_len`: the pointer stays inside the same buffer.
                            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                            v.iov_len -= n;
                            n = 0;
                        }
                    }
                    again = *next < iovs.len();
                }
            }
            Step::Bounce {
                write, buf, pos, n, ..
            } => {
                if res <= 0 {
                    f.err.get_or_insert(if res < 0 {
                        io::Error::from_raw_os_error(-res)
                    } else {
                        io::ErrorKind::UnexpectedEof.into()
                    });
                } else {
                    let got = (res as usize).min(*n);
                    let r = if *write {
                        Ok(())
                    } else {
                        // Through vm-memory: marked by the region bitmap.
                        scatter(&f.mem, &f.req.data, *pos, &buf.as_slice()[..got])
                    };
                    match r {
                        Err(e) => {
                            f.err.get_or_insert(e);
                        }
                        Ok(()) => {
                            *pos += got as u64;
                            if *pos < data_len {
                                let chunk = buf.as_slice().len() as u64;
                                *n = (data_len - *pos).min(chunk) as usize;
                                if *write {
                                    if let Err(e) = gather(
                                        &f.mem,
                                        &f.req.data,
                                        *pos,
                                        &mut buf.as_mut_slice()[..*n],
                                    ) {
                                        f.err.get_or_insert(e);
                                    } else {
                                        again = true;
                                    }
                                } else {
                                    again = true;
                                }
                            }
                        }
                    }
                }
            }
            Step::Flush | Step::Sync => {
                if res < 0 {
                    f.err.get_or_insert(io::Error::from_raw_os_error(-res));
                }
            }
            Step::Ranges { ranges, discard } => {
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    if !unsupported(&e) {
                        f.err.get_or_insert(e);
                    } else if !*discard {
                        // No fallocate mode for this file system: the synchronous fallback
                        // (zero range, else written zeroes). Discard is a hint: done.
                        if let Some(r) = ranges.get(sub) {
                            if let Err(e) = ctx.disk.write_zeroes(r.offset(), r.len_bytes(), false)
                            {
                                f.err.get_or_insert(e);
                            }
                        }
                    }
                }
            }
        }
        if again {
            self.push_step(slot, ctx);
            return;
        }
        if f.pending > 0 {
            return;
        }
        let writes = matches!(
            f.req.kind,
            RequestKind::Write | RequestKind::Discard(_) | RequestKind::WriteZeroes(_)
        );
        if writes && !ctx.writeback && !f.synced && f.err.is_none() {
            f.synced = true;
            f.step = Step::Sync;
            self.push_step(slot, ctx);
            return;
        }
        self.finish(slot, ctx, qidx);
    }

    fn finish(&mut self, slot: usize, ctx: &IoContext<'_>, qidx: usize) {
        let Some(f) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        let f = *f;
        if let Step::Vectored { mark: true, .. } = f.step {
            // The kernel wrote these guest bytes behind vm-memory: mark them now that the
            // completion arrived, also on error (part of the data may have landed).
            for seg in &f.req.data {
                ctx.log.mark(seg.addr.0, u64::from(seg.len));
            }
        }
        self.stats.completed += 1;
        match f.path {
            DataPath::DirectZeroCopy => self.stats.direct_zero_copy += 1,
            DataPath::DirectBounce => self.stats.direct_bounce += 1,
            _ => {}
        }
        let ok = match &f.err {
            None => true,
            Some(e) => {
                self.stats.errors += 1;
                log::warn!(
                    "queue {qidx}: {:?} at sector {} failed: {e}",
                    f.req.kind,
                    f.req.sector
                );
                false
            }
        };
        self.stats.account(&f.req, ok, ctx.log.is_logging());
        let written = match f.req.kind {
            RequestKind::Read => u32::try_from(f.req.data_len).unwrap_or(u32::MAX),
            _ => 0,
        };
        let len = finish_status(&f.mem, &f.req, ok, written, qidx);
        self.done.push((f.head, len));
    }
}

/// Writes the status byte (through vm-memory: marked) and returns the used length.
fn finish_status(mem: &Mem, req: &Request, ok: bool, written: u32, qidx: usize) -> u32 {
    let (status, written) = if ok {
        (VIRTIO_BLK_S_OK as u8, written)
    } else {
        (VIRTIO_BLK_S_IOERR as u8, 0)
    };
    if let Err(e) = mem.write_obj(status, req.status) {
        log::warn!("queue {qidx}: cannot write status byte: {e}");
        return written;
    }
    written.saturating_add(1)
}

/// The first step of a read or write, and the path it takes (same choice as the synchronous
/// [`super::io::execute`]).
fn transfer_step(req: &Request, mem: &Mem, ctx: &IoContext<'_>) -> io::Result<(Step, DataPath)> {
    let write = req.kind == RequestKind::Write;
    let offset = req.offset();
    let to_iovecs = |iovs: Vec<super::disk::HostIov>| -> Vec<libc::iovec> {
        iovs.into_iter()
            .filter(|v| v.len > 0)
            .map(|v| libc::iovec {
                iov_base: v.ptr.cast(),
                iov_len: v.len,
            })
            .collect()
    };
    if let Some(direct) = ctx.disk.direct() {
        let align = direct.align();
        if offset.is_multiple_of(align.io) && req.data_len.is_multiple_of(align.io) {
            let fd = direct.file().as_raw_fd();
            if let Some(iovs) = host_iovs(mem, &req.data, align.mem, align.io)? {
                return Ok((
                    Step::Vectored {
                        fd,
                        write,
                        iovs: to_iovecs(iovs),
                        next: 0,
                        offset,
                        mark: !write,
                    },
                    DataPath::DirectZeroCopy,
                ));
            }
            let chunk = bounce_chunk(align.io);
            let n = chunk.min(req.data_len as usize);
            let mut buf = AlignedBuf::new(n, align.mem);
            if write {
                gather(mem, &req.data, 0, buf.as_mut_slice())?;
            }
            return Ok((
                Step::Bounce {
                    fd,
                    write,
                    buf,
                    pos: 0,
                    n,
                },
                DataPath::DirectBounce,
            ));
        }
    }
    let iovs = host_iovs(mem, &req.data, 1, 1)?.unwrap_or_default();
    Ok((
        Step::Vectored {
            fd: ctx.disk.file().as_raw_fd(),
            write,
            iovs: to_iovecs(iovs),
            next: 0,
            offset,
            mark: !write,
        },
        DataPath::Buffered,
    ))
}
