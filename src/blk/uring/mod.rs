//! The asynchronous dataplane: one io_uring per queue, up to the queue's depth in the disk.
//!
//! ## Shape
//! Each queue's worker thread (vhost-user-backend's `VringEpollHandler`) owns one `Engine`:
//! an io_uring whose completion eventfd is registered in the worker's epoll set as a device
//! event ([`super::BlkDevice::attach`]). A kick or a completion event runs `Engine::run`:
//! reap completions, pop new chains and turn them into SQEs, submit, and repeat until nothing
//! moves; then notify the driver (EVENT_IDX suppression through `needs_notification`): once
//! per run for page-cache completions, as each is reaped for device ones (below).
//! `O_DIRECT` requests are submitted one by one as they are popped (the device starts each at
//! once); buffered ones once per batch (they mostly complete inside the submit call).
//! Completion order is free (virtio 1.2 §5.2.6: the device may complete requests in any order).
//! A request that went to the device is put in the used ring, and the driver notified (subject
//! to EVENT_IDX), as soon as its completion is reaped, before the rest of the reaped batch: the
//! driver starts refilling while the worker finishes the batch.
//!
//! ## Deferred task work (Linux 6.1+)
//! Where the kernel has them, the ring is set up with `IORING_SETUP_SINGLE_ISSUER |
//! IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG`: a device completion does not
//! interrupt the worker with task work (which on a sleeping worker costs an `epoll_wait`
//! that returns `EINTR`, the task work, and a second `epoll_wait`); it signals the eventfd once
//! and waits until the worker's next `io_uring_enter(GETEVENTS)` posts the pending CQEs. With
//! the per-completion notification above, on this project's reference VM that cut the time
//! from a burst of device completions to the first re-submitted request from a median of
//! 112 µs to 94 µs (perf traces; qemu-storage-daemon: 109 µs; throughput in README). The ring
//! is created disabled (`IORING_SETUP_R_DISABLED`) and enabled by the worker thread on its
//! first run, which makes that thread its single issuer. The price is
//! at teardown: only that thread can run the deferred completions, so a request still in the
//! disk when the worker exits never gets its CQE. The daemon therefore waits for the workers to
//! finish (`BlkDevice::wait_idle`) before stopping them; the teardown drain, on another thread,
//! submits what never reached the kernel (held SQEs, follow-up steps) through a fresh ordinary
//! ring and abandons what is left in the old one, leaking its buffers rather than freeing memory
//! the kernel may still write. Older kernels get an ordinary ring (the setup flags are
//! rejected with `EINVAL`) and the same loop.
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
//!
//! ## Layout
//! This file holds the engine's state (`Engine`, the per-request `InFlight` and its `Step`)
//! and its run loop; `aio.rs` chooses the dataplane ([`AioMode`], [`io_uring_available`]);
//! `submit.rs` pops requests and builds SQEs; `complete.rs` reaps CQEs, marks and completes.

mod aio;
mod complete;
mod submit;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;

use io_uring::{squeue, types, IoUring};
use vhost_user_backend::VringT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::AlignedBuf;
use super::io::{DataPath, IoContext, Mem};
use super::request::{Limits, Request, SectorRange};
use super::vring::BlkVring;
use super::QueueStats;
use crate::backend::DirtyGuestMemory;

pub use aio::{io_uring_available, AioMode};

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
    /// In the disk; `submit_now`: its SQEs go to the kernel before the next chain is popped
    /// (see [`Engine::pop`]).
    InFlight { submit_now: bool },
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
    /// Test hook: milliseconds each SQE waits in the kernel (a linked `IORING_OP_TIMEOUT`)
    /// before it starts, a slow disk on demand; 0: off.
    delay_ms: Arc<AtomicU64>,
    delay_ts: Box<types::Timespec>,
    /// `DEFER_TASKRUN` ring (see the module docs), and the thread that enabled it (its only
    /// submitter); `None` until the first run.
    deferred: bool,
    owner: Option<ThreadId>,
    /// Teardown on a thread that may not submit to `ring`: the old ring, still reaped.
    retired: Option<IoUring>,
    /// SQEs handed to `ring` whose CQEs were not reaped yet.
    submitted: usize,
    /// A request that went to the device just completed: publish it and notify now.
    publish_now: bool,
    /// Teardown on a foreign thread moves what is left to submit to a fresh ring (off only as
    /// a test's negative control).
    fresh_ring_at_teardown: bool,
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
    pub(crate) fn new(
        queue_size: u16,
        hold: Arc<AtomicBool>,
        delay_ms: Arc<AtomicU64>,
    ) -> io::Result<Engine> {
        let entries = u32::from(queue_size).next_power_of_two().max(8);
        let (ring, deferred) = match aio::deferred_ring(entries) {
            Ok(r) => (r, true),
            // Before Linux 6.1 (DEFER_TASKRUN) the flags are rejected with EINVAL.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!("io_uring: no DEFER_TASKRUN here ({e}); using an ordinary ring");
                (IoUring::builder().build(entries)?, false)
            }
            Err(e) => return Err(e),
        };
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
            delay_ms,
            delay_ts: Box::new(types::Timespec::new()),
            deferred,
            owner: None,
            retired: None,
            submitted: 0,
            publish_now: false,
            fresh_ring_at_teardown: true,
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

    /// Test hook (negative control): see [`super::BlkDevice::skip_teardown_ring_for_tests`].
    #[cfg(feature = "test-utils")]
    pub(crate) fn set_fresh_ring_at_teardown(&mut self, on: bool) -> bool {
        self.fresh_ring_at_teardown = on;
        self.deferred
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
        if self.owner.is_none() {
            self.bind(qidx);
        }
        // Completions that arrive while this loop runs (most page-cache reads complete inside
        // the submit call) are reaped by it: no eventfd wake-up for them (Linux 5.8+).
        self.ring.completion().disable_eventfd();
        loop {
            if self.ring.submission().taskrun() {
                // Deferred completions are pending: an enter with GETEVENTS posts them (the
                // crate adds the flag when IORING_SQ_TASKRUN is set).
                self.enter(qidx);
            }
            let mut progress = self.reap(vring, ctx, qidx);
            progress |= self.pop(vring, atomic, ctx, limits, event_idx, qidx);
            self.submit(qidx);
            if !progress {
                self.ring.completion().enable_eventfd();
                // A CQE posted (or, deferred, task work queued) before the enable did not signal:
                // look once more. The kernel publishes the CQE tail or sets IORING_SQ_TASKRUN,
                // then reads the flag; full barrier between our flag store and those loads.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                if self.ring.completion().is_empty() && !self.ring.submission().taskrun() {
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
        if self.in_flight() == 0 {
            return;
        }
        let foreign = self.deferred && self.owner.is_some_and(|t| t != std::thread::current().id());
        if foreign && self.fresh_ring_at_teardown {
            // Only the worker may enter the deferred ring, and it is gone. CQEs it posted are
            // in the mapped CQ, which any thread can reap; what is left to submit (held SQEs,
            // follow-up steps) goes to an ordinary ring this thread owns.
            match IoUring::new(self.ring.params().sq_entries()) {
                Ok(fresh) => {
                    self.retired = Some(std::mem::replace(&mut self.ring, fresh));
                    self.submitted = 0;
                    self.deferred = false;
                }
                Err(e) => log::error!("queue {qidx}: cannot set up a ring for teardown: {e}"),
            }
        }
        // Still the exited worker's deferred ring (no fresh one): this thread may not enter it.
        let may_enter = !(foreign && self.deferred);
        while self.in_flight() > 0 {
            if may_enter {
                self.submit(qidx);
            }
            if self.reap(&vring, ctx, qidx) {
                continue;
            }
            if self.submitted > 0 && may_enter {
                if let Err(e) = self.ring.submit_and_wait(1) {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        log::error!("queue {qidx}: cannot wait for completions: {e}");
                        self.abandon(qidx);
                    }
                }
                continue;
            }
            // Only requests of the deferred ring are left, and their completions are queued as
            // task work that only its exited submitter could run.
            self.abandon(qidx);
        }
        self.signal(&vring, qidx);
    }

    /// Gives up on the requests still in flight at teardown (see [`Engine::drain`]) without
    /// ever freeing what the kernel may still write: their slots (with the guest-memory
    /// snapshot and the bounce buffers their transfers point into) are leaked, not dropped.
    /// The frontend is gone by then; the daemon avoids this by waiting for its workers first
    /// ([`super::BlkDevice::wait_idle`]).
    fn abandon(&mut self, qidx: usize) {
        let n = self.in_flight();
        log::warn!(
            "queue {qidx}: {n} request(s) still in the disk when the worker exited; \
             left unfinished, their buffers stay allocated"
        );
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(f) = s.take() {
                std::mem::forget(f);
                self.free.push(i);
            }
        }
        self.sqes.clear();
        // The rings themselves may go: closing one does not free what its requests write to.
        self.retired = None;
    }

    /// Enables a deferred ring from this (the worker) thread, which becomes its only
    /// submitter. If that fails, falls back to an ordinary ring (nothing is in flight yet).
    fn bind(&mut self, qidx: usize) {
        self.owner = Some(std::thread::current().id());
        if !self.deferred {
            return;
        }
        if let Err(e) = self.ring.submitter().register_enable_rings() {
            log::warn!("queue {qidx}: cannot enable the io_uring ({e}); using an ordinary ring");
            let entries = self.ring.params().sq_entries();
            match IoUring::new(entries).and_then(|r| {
                r.submitter().register_eventfd(self.event.as_raw_fd())?;
                Ok(r)
            }) {
                Ok(r) => self.ring = r,
                Err(e) => log::error!("queue {qidx}: cannot set up io_uring: {e}"),
            }
            self.deferred = false;
        }
    }

    /// One `io_uring_enter` (GETEVENTS when deferred task work is pending), for its side
    /// effect of posting completions.
    fn enter(&mut self, qidx: usize) {
        if let Err(e) = self.ring.submit() {
            if !matches!(
                e.raw_os_error(),
                Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
            ) {
                log::error!("queue {qidx}: io_uring_enter failed: {e}");
            }
        }
    }

    pub(super) fn signal(&mut self, vring: &BlkVring, qidx: usize) {
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
}
