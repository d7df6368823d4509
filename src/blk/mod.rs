//! The vhost-user-blk device: a virtio-blk dataplane whose guest writes are all dirty-logged.
//!
//! This is the real backend the project migrates: a raw image file or block device served over
//! vhost-user, built on `virtio-queue` (ring handling), `vm-memory` (guest memory) and
//! `vhost-user-backend` (the protocol), and wrapped by [`DirtyLogBackend`] so the frontend can
//! live-migrate the guest. Its pieces:
//!
//! - [`request`]: the pure descriptor-chain parser (fuzzed).
//! - [`disk`]: the backing store and its positional / `O_DIRECT` I/O.
//! - [`io`]: executing a request synchronously, including the explicit dirty-log marks for
//!   `--direct` reads that bypass vm-memory.
//! - [`uring`]: the asynchronous dataplane (one io_uring per queue, up to the queue's depth in
//!   the disk), and [`vring`]: the vring type whose disable waits for those requests.
//! - [`BlkDevice`]: the [`VhostUserBackend`] (features, config space, one worker thread per
//!   queue, EVENT_IDX, quiescing on `GET_VRING_BASE`); its construction and synchronous
//!   dataplane live here, its `VhostUserBackend` impl in `blk/backend.rs`, its settings
//!   ([`BlkConfig`], `MAX_*`) in `blk/config.rs` and its counters ([`QueueStats`]) in
//!   `blk/stats.rs`, all re-exported from this module.
//! - [`daemon`]: the accept loop the `vhost-dirtylog-blk` program runs.
//!
//! ## Why every guest write is logged
//! Guest memory is `GuestMemoryMmap<GuestDirtyBitmap>`: the data copied in by vm-memory, the
//! status byte and virtio-queue's used-ring updates mark their pages through the region bitmap.
//! The only writes that bypass vm-memory are `--direct` zero-copy reads, which [`io`] marks
//! explicitly after `preadv` returns.
//!
//! ## Quiescing (`GET_VRING_BASE`)
//! vhost-user-backend clears the ring's `ready` bit (under the vring lock) and then calls
//! [`VhostUserBackend::stop_vring`]. Each queue's worker processes the ring while holding that
//! queue's quiesce mutex, and checks `ready`/`enabled` under it before touching the ring. So
//! `stop_vring`, which takes the mutex, returns only after the batch in flight completed — data
//! written, marked, used ring updated — and no later batch can start until the frontend restarts
//! the ring (`SET_VRING_KICK` sets `ready` again). The reply to `GET_VRING_BASE` therefore
//! follows the last guest write and the last mark for that ring.
//!
//! With the io_uring dataplane ([`uring`], the default when the kernel allows it and the device
//! was [attached](BlkDevice::attach)) requests stay in the disk after the worker released the
//! ring. The worker still pops only while the ring is ready and enabled, under the ring lock,
//! and counts what it popped in the ring's [`vring::Gate`] before releasing the lock;
//! `stop_vring` and `SET_VRING_ENABLE(0)` ([`BlkVring`]'s `set_enabled`) wait until that count
//! is zero, i.e. until every popped request completed, was marked and is in the used ring.

mod backend;
mod config;
pub mod daemon;
pub mod disk;
pub mod io;
pub mod request;
mod stats;
pub mod uring;
pub mod vring;

use std::io::{Error as IoError, ErrorKind, Result as IoResult};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringState};
use virtio_bindings::virtio_blk::*;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{DirtyGuestMemory, DirtyLogBackend};
use crate::log::DirtyLog;
use crate::virtio_blk::{BlkConfigSpace, ID_BYTES};
use disk::Disk;
use io::{DataPath, IoContext, Mem};
use request::Limits;
use uring::Engine;

pub use config::{
    parse_serial, BlkConfig, ConfigError, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_QUEUES,
    MAX_QUEUE_SIZE,
};
pub use stats::QueueStats;
pub use uring::{io_uring_available, AioMode};
pub use vring::BlkVring;

/// One queue's state in the device.
struct Queue {
    /// Counters; in synchronous mode also the quiesce lock (the worker holds it while it
    /// processes the ring).
    stats: Mutex<QueueStats>,
    /// The io_uring dataplane, when in use.
    engine: Option<Mutex<Engine>>,
    /// Test hook: keep this queue's SQEs back (requests stay in the disk).
    hold: Arc<AtomicBool>,
    /// Test hook: a slow disk (see [`BlkDevice::delay_submissions_for_tests`]).
    #[cfg_attr(not(feature = "test-utils"), allow(dead_code))]
    delay_ms: Arc<AtomicU64>,
    /// A duplicate of the engine's completion eventfd, to wake the worker.
    wake: Option<EventFd>,
    /// Requests the synchronous path took from the avail ring and has not put in the used
    /// ring yet (read without the queue lock, so statistics never wait for a batch).
    sync_in_flight: AtomicU64,
}

struct Inner {
    disk: Arc<Disk>,
    config: BlkConfig,
    serial: [u8; ID_BYTES],
    log: DirtyLog,
    mem: RwLock<DirtyGuestMemory>,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    acked_features: AtomicU64,
    /// Per queue: counters, quiesce lock (sync) and io_uring engine (async).
    queues: Vec<Queue>,
    /// The engines' completion eventfds are in the workers' epoll sets ([`BlkDevice::attach`]);
    /// until then the device serves synchronously.
    attached: AtomicBool,
    /// Exit-event fds handed to vhost-user-backend, which takes them with `into_raw_fd()` and
    /// never closes them (0.24); [`BlkDevice::reclaim_exit_fds`] closes them after the daemon
    /// is gone, so a long-running daemon does not leak one fd per worker per connection.
    exit_fds: Mutex<Vec<std::os::fd::RawFd>>,
}

/// The vhost-user-blk device (wrap it in [`DirtyLogBackend`] to serve it; see [`BlkDevice::into_backend`]).
#[derive(Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("disk", &self.inner.disk.path())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl BlkDevice {
    /// A device serving `disk`, marking bypassing writes through `log` and reading guest memory
    /// through `mem` (the same `GuestMemoryAtomic` handed to the `VhostUserDaemon`).
    pub fn new(
        disk: Arc<Disk>,
        config: BlkConfig,
        log: DirtyLog,
        mem: DirtyGuestMemory,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut serial = [0u8; ID_BYTES];
        serial[..config.serial.len()].copy_from_slice(&config.serial);
        let mut queues = Vec::with_capacity(usize::from(config.num_queues));
        let want_uring = match config.aio {
            AioMode::Sync => false,
            AioMode::IoUring => true,
            AioMode::Auto => io_uring_available().is_ok(),
        };
        for q in 0..config.num_queues {
            let hold = Arc::new(AtomicBool::new(false));
            let delay_ms = Arc::new(AtomicU64::new(0));
            let engine = if want_uring {
                match Engine::new(config.queue_size, hold.clone(), delay_ms.clone()) {
                    Ok(e) => Some(e),
                    Err(e) if config.aio == AioMode::IoUring => {
                        return Err(ConfigError::Aio(format!(
                            "queue {q}: cannot set up io_uring: {e}"
                        )))
                    }
                    Err(e) => {
                        log::warn!(
                            "queue {q}: cannot set up io_uring ({e}); serving it synchronously"
                        );
                        None
                    }
                }
            } else {
                None
            };
            let wake = engine.as_ref().and_then(|e| e.event().try_clone().ok());
            queues.push(Queue {
                stats: Mutex::new(QueueStats::default()),
                engine: engine.map(Mutex::new),
                hold,
                delay_ms,
                wake,
                sync_in_flight: AtomicU64::new(0),
            });
        }
        Ok(BlkDevice {
            inner: Arc::new(Inner {
                disk,
                config,
                serial,
                log,
                mem: RwLock::new(mem),
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(true),
                acked_features: AtomicU64::new(0),
                queues,
                attached: AtomicBool::new(false),
                exit_fds: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Wraps a new device for `disk` in the dirty-logging adapter, sharing one log handle.
    pub fn into_backend(
        disk: Arc<Disk>,
        config: BlkConfig,
        mem: DirtyGuestMemory,
    ) -> Result<DirtyLogBackend<BlkDevice>, ConfigError> {
        let log = DirtyLog::new();
        let dev = BlkDevice::new(disk, config, log.clone(), mem)?;
        Ok(DirtyLogBackend::with_log(dev, log))
    }

    /// The request limits derived from the disk and the settings.
    pub fn limits(&self) -> Limits {
        let ro = self.inner.disk.read_only();
        Limits {
            capacity: self.inner.disk.capacity(),
            seg_max: u32::from(self.inner.config.queue_size)
                .saturating_sub(2)
                .max(1),
            read_only: ro,
            discard: !ro,
            write_zeroes: !ro,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        }
    }

    /// The config space as the guest sees it.
    pub fn config_space(&self) -> BlkConfigSpace {
        let l = self.limits();
        let blk_size = self
            .inner
            .disk
            .direct()
            .map(|d| d.align().io.clamp(512, 4096) as u32)
            .unwrap_or(512);
        let c = virtio_blk_config {
            capacity: l.capacity.to_le(),
            seg_max: l.seg_max.to_le(),
            blk_size: blk_size.to_le(),
            wce: u8::from(self.inner.writeback.load(Ordering::Relaxed)),
            num_queues: self.inner.config.num_queues.to_le(),
            max_discard_sectors: l.max_discard_sectors.to_le(),
            max_discard_seg: l.max_discard_seg.to_le(),
            discard_sector_alignment: (4096u32 >> 9).to_le(),
            max_write_zeroes_sectors: l.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: l.max_write_zeroes_seg.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        BlkConfigSpace(c)
    }

    /// Counters of queue `index`.
    pub fn queue_stats(&self, index: usize) -> Option<QueueStats> {
        let q = self.inner.queues.get(index)?;
        let mut s = *q.stats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &q.engine {
            s.add(&e.lock().unwrap_or_else(|e| e.into_inner()).stats);
        }
        Some(s)
    }

    /// Whether queue `index` is served by io_uring (set up, and [attached](Self::attach)).
    pub fn is_async(&self, index: usize) -> bool {
        self.inner.attached.load(Ordering::Acquire)
            && self
                .inner
                .queues
                .get(index)
                .is_some_and(|q| q.engine.is_some())
    }

    /// Requests of queue `index` popped from the ring and not yet in the used ring (always 0
    /// in synchronous mode between batches).
    pub fn in_flight(&self, index: usize) -> usize {
        self.inner.queues.get(index).map_or(0, |q| match &q.engine {
            Some(e) => e.lock().unwrap_or_else(|e| e.into_inner()).in_flight(),
            None => 0,
        })
    }

    /// Registers each queue's io_uring completion eventfd in its worker's epoll set, as the
    /// device event `num_queues + 1` (`VringEpollHandler::register_listener`), which turns the
    /// asynchronous dataplane on. Call once, after `VhostUserDaemon::new` and before `start`.
    /// Without it (or if it fails) the device serves requests synchronously.
    pub fn attach<B>(&self, daemon: &VhostUserDaemon<B>) -> IoResult<()>
    where
        B: VhostUserBackend + Clone + 'static,
        B::Bitmap: vhost_user_backend::bitmap::BitmapReplace
            + vm_memory::bitmap::NewBitmap
            + Clone
            + Send
            + Sync,
        B::Vring: Clone + Send + Sync,
    {
        let handlers = daemon.get_epoll_handlers();
        let id = u64::from(self.inner.config.num_queues) + 1;
        let mut any = false;
        for (i, q) in self.inner.queues.iter().enumerate() {
            let Some(wake) = &q.wake else { continue };
            let h = handlers.get(i).ok_or_else(|| {
                IoError::new(
                    ErrorKind::InvalidInput,
                    format!("no worker thread for queue {i}"),
                )
            })?;
            h.register_listener(wake.as_raw_fd(), EventSet::IN, id)?;
            any = true;
        }
        self.inner.attached.store(any, Ordering::Release);
        Ok(())
    }

    /// Test hook: while `on`, queue `index` keeps its requests' SQEs back, so popped requests
    /// stay "in the disk" (no data moves) until it is turned off again.
    #[cfg(feature = "test-utils")]
    pub fn hold_submissions_for_tests(&self, index: usize, on: bool) {
        if let Some(q) = self.inner.queues.get(index) {
            q.hold.store(on, Ordering::SeqCst);
            if !on {
                if let Some(w) = &q.wake {
                    let _ = w.write(1);
                }
            }
        }
    }

    /// Test hook: every request of queue `index` submitted from now on waits `delay` in the
    /// kernel (a linked `IORING_OP_TIMEOUT`) before it starts, like a slow disk: the request is
    /// in the io_uring, not held back in the device. `Duration::ZERO` turns it off.
    #[cfg(feature = "test-utils")]
    pub fn delay_submissions_for_tests(&self, index: usize, delay: std::time::Duration) {
        if let Some(q) = self.inner.queues.get(index) {
            let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            q.delay_ms.store(ms, Ordering::SeqCst);
        }
    }

    /// Test hook (negative control): the teardown drain of queue `index`, run on a thread
    /// other than the queue's worker, no longer moves what is left to submit to a fresh ring,
    /// so requests held when the worker exited are abandoned (see [`uring`]). Returns whether
    /// the queue's ring uses deferred task work (without it the drain needs no fresh ring and
    /// the hook changes nothing).
    #[cfg(feature = "test-utils")]
    pub fn skip_teardown_ring_for_tests(&self, index: usize, on: bool) -> bool {
        let Some(Some(e)) = self.inner.queues.get(index).map(|q| q.engine.as_ref()) else {
            return false;
        };
        e.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_fresh_ring_at_teardown(!on)
    }

    /// Test hook (negative control): `GET_VRING_BASE` and `SET_VRING_ENABLE(0)` on queue
    /// `index` stop waiting for its requests in the disk. Takes effect once the queue has run
    /// (its ring is bound); returns whether it did.
    #[cfg(feature = "test-utils")]
    pub fn skip_quiesce_for_tests(&self, index: usize, on: bool) -> bool {
        let Some(Some(e)) = self.inner.queues.get(index).map(|q| q.engine.as_ref()) else {
            return false;
        };
        let e = e.lock().unwrap_or_else(|e| e.into_inner());
        match e.vring() {
            Some(v) => {
                v.gate().skip_wait_for_tests(on);
                true
            }
            None => false,
        }
    }

    /// Waits up to `timeout` until no queue has a request in the disk; true if none is left.
    ///
    /// Call after the frontend disconnected and *before* dropping the `VhostUserDaemon`: the
    /// worker threads are still alive then and complete their requests themselves (each
    /// io_uring is entered only by its worker, see [`uring`]'s deferred task work); after they
    /// exit, [`drain_in_flight`](Self::drain_in_flight) can only finish what was not yet in the
    /// kernel and abandons the rest. `vhost-dirtylog-blk` waits without a limit (logging every
    /// 5 s), as QEMU's drain does.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if (0..self.inner.queues.len()).all(|q| self.in_flight(q) == 0) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Completes every request still in the disk (data, marks, status, used ring). For
    /// teardown, after the `VhostUserDaemon` was dropped (its workers joined); also done by
    /// [`reclaim_exit_fds`](Self::reclaim_exit_fds) and when the device is dropped.
    pub fn drain_in_flight(&self) {
        self.inner.drain_in_flight();
    }

    /// Requests of queue `index` taken from the avail ring and not yet completed: those the
    /// synchronous path is executing (lock-free) plus those in the io_uring engine.
    pub fn queue_in_flight(&self, index: usize) -> Option<u64> {
        let q = self.inner.queues.get(index)?;
        Some(q.sync_in_flight.load(Ordering::Relaxed) + self.in_flight(index) as u64)
    }

    /// The log handle the device marks through.
    pub fn dirty_log(&self) -> &DirtyLog {
        &self.inner.log
    }

    /// The disk being served.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.inner.disk
    }

    /// Closes the worker exit-event fds vhost-user-backend leaked. Call only after the
    /// `VhostUserDaemon` serving this device has been dropped (its workers joined, their epoll
    /// sets closed): then nothing refers to these fds any more.
    pub fn reclaim_exit_fds(&self) {
        self.inner.drain_in_flight();
        let fds = std::mem::take(
            &mut *self
                .inner
                .exit_fds
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for fd in fds {
            // Only close what is still the eventfd we created (defensive: never another fd).
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            if link.is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]") {
                // SAFETY: vhost-user-backend took this fd with `into_raw_fd()`, registered it in
                // a worker's epoll set and never closes it; the daemon (and so the worker and
                // its epoll set) is gone, so this is the only owner and the only close.
                drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
    }

    fn process_queue(
        &self,
        state: &mut VringState<DirtyGuestMemory>,
        atomic: &DirtyGuestMemory,
        stats: &mut QueueStats,
        qidx: usize,
    ) {
        let limits = self.limits();
        let ctx = IoContext {
            disk: &self.inner.disk,
            log: &self.inner.log,
            serial: &self.inner.serial,
            writeback: self.inner.writeback.load(Ordering::Relaxed),
        };
        let mut used_any = false;
        let mut guard = atomic.memory();
        loop {
            let mem: &Mem = &guard;
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            // The frontend may hot-add memory (ADD_MEM_REG / SET_MEM_TABLE) and use it in the
            // very next request. vhost-user-backend publishes the new memory before it acks,
            // and the chain was published after the ack, so memory loaded *after* the pop is
            // at least as new as the chain: if it changed, un-pop and read the chain again.
            let now = atomic.memory();
            if !std::ptr::eq::<Mem>(&*now, mem) {
                // `chain` (it only borrows the old memory) is left unprocessed.
                state.get_queue_mut().go_to_previous_position();
                guard = now;
                continue;
            }
            let head = chain.head_index();
            let in_flight = &self.inner.queues[qidx].sync_in_flight;
            in_flight.fetch_add(1, Ordering::Relaxed);
            let used_len = self.process_chain(chain, mem, &limits, &ctx, stats, qidx);
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = state.add_used(head, used_len) {
                // Only a corrupt ring address gets here; nothing more can be done for the ring.
                log::error!("queue {qidx}: cannot add used entry for descriptor {head}: {e}");
                return;
            }
            used_any = true;
        }
        // Interrupt the driver if it asked for it (EVENT_IDX: used_event crossed; otherwise
        // always). An unreadable used_event errs on the side of signalling.
        if used_any && state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("queue {qidx}: cannot signal the used queue: {e}");
            }
        }
    }

    fn process_chain(
        &self,
        chain: virtio_queue::DescriptorChain<&Mem>,
        mem: &Mem,
        limits: &Limits,
        ctx: &IoContext<'_>,
        stats: &mut QueueStats,
        qidx: usize,
    ) -> u32 {
        stats.completed += 1;
        let req = match request::parse_chain(chain, limits) {
            Ok(r) => r,
            Err(e) => {
                stats.errors += 1;
                if stats.errors <= 16 {
                    log::warn!("queue {qidx}: bad request: {e}");
                } else {
                    log::debug!("queue {qidx}: bad request: {e}");
                }
                return match e.status {
                    Some(addr) if mem.write_obj(e.status_code(), addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, written) = match io::execute(&req, mem, ctx) {
            Ok((written, path)) => {
                match path {
                    DataPath::DirectZeroCopy => stats.direct_zero_copy += 1,
                    DataPath::DirectBounce => stats.direct_bounce += 1,
                    _ => {}
                }
                (VIRTIO_BLK_S_OK as u8, written)
            }
            Err(e) => {
                stats.errors += 1;
                log::warn!(
                    "queue {qidx}: {:?} at sector {} failed: {e}",
                    req.kind,
                    req.sector
                );
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        stats.account(
            &req,
            status == VIRTIO_BLK_S_OK as u8,
            self.inner.log.is_logging(),
        );
        // The status byte goes through vm-memory, so it is marked like the data.
        if let Err(e) = mem.write_obj(status, req.status) {
            log::warn!("queue {qidx}: cannot write status byte: {e}");
            return written;
        }
        written.saturating_add(1)
    }
}

impl Inner {
    fn drain_in_flight(&self) {
        let ctx = IoContext {
            disk: &self.disk,
            log: &self.log,
            serial: &self.serial,
            writeback: self.writeback.load(Ordering::Relaxed),
        };
        for (i, q) in self.queues.iter().enumerate() {
            if let Some(e) = &q.engine {
                e.lock().unwrap_or_else(|e| e.into_inner()).drain(&ctx, i);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No request may outlive the buffers and mappings it writes into.
        self.drain_in_flight();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    #[test]
    fn config_layout_is_byte_exact() {
        assert_eq!(std::mem::size_of::<BlkConfigSpace>(), 96);
        let c = virtio_blk_config {
            capacity: 0x0102_0304_0506_0708u64.to_le(),
            num_queues: 3u16.to_le(),
            max_discard_sectors: 7u32.to_le(),
            write_zeroes_may_unmap: 1,
            wce: 1,
            ..Default::default()
        };
        let s = BlkConfigSpace(c);
        let b = s.as_slice();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[32], 1); // wce
        assert_eq!(&b[34..36], &3u16.to_le_bytes()); // num_queues
        assert_eq!(&b[36..40], &7u32.to_le_bytes()); // max_discard_sectors
        assert_eq!(b[56], 1); // write_zeroes_may_unmap
    }
}
