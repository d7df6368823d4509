//! A vhost-user device that does nothing: the test (or fuzz input, or benchmark) is its dataplane.

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::log::GuestDirtyBitmap;

/// The guest memory a [`NullDevice`] with bitmap `B` is given by the daemon.
pub type NullMem<B> = GuestMemoryAtomic<GuestMemoryMmap<B>>;

/// A one-queue device (256 entries, `VIRTIO_F_VERSION_1`, vhost-user protocol features as
/// given) that never processes its queue.
///
/// Generic over the guest-memory bitmap, so the same device runs under
/// [`DirtyLogBackend`](crate::backend::DirtyLogBackend) with [`GuestDirtyBitmap`] and bare under
/// the stock daemon with vhost-user-backend's `BitmapMmapRegion` (the comparison in
/// `benches/mark.rs`). The caller writes guest memory itself, through the daemon's
/// [`NullMem`], exactly as a device's dataplane would.
///
/// It remembers the exit-event fds it hands out: vhost-user-backend 0.24 registers the consumer
/// end with `into_raw_fd()` and never closes it (finding F3 in `contrib/fuzz/README.md`), one fd
/// per daemon. A harness that starts thousands of daemons closes them with
/// [`reclaim_exit_fds`](Self::reclaim_exit_fds) once the daemon is gone.
pub struct NullDevice<B = GuestDirtyBitmap> {
    protocol: VhostUserProtocolFeatures,
    exit_fds: Arc<Mutex<Vec<RawFd>>>,
    _bitmap: PhantomData<fn() -> B>,
}

impl<B> Clone for NullDevice<B> {
    fn clone(&self) -> Self {
        NullDevice {
            protocol: self.protocol,
            exit_fds: self.exit_fds.clone(),
            _bitmap: PhantomData,
        }
    }
}

impl<B> std::fmt::Debug for NullDevice<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NullDevice")
            .field("protocol", &self.protocol)
            .field("bitmap", &std::any::type_name::<B>())
            .finish()
    }
}

impl<B> Default for NullDevice<B> {
    /// `REPLY_ACK | CONFIGURE_MEM_SLOTS` (the adapter adds `LOG_SHMFD`).
    fn default() -> Self {
        Self::new(
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
    }
}

impl<B> NullDevice<B> {
    /// A device offering the vhost-user protocol features `protocol`.
    pub fn new(protocol: VhostUserProtocolFeatures) -> Self {
        NullDevice {
            protocol,
            exit_fds: Arc::default(),
            _bitmap: PhantomData,
        }
    }

    /// Closes the exit-event consumer fds that vhost-user-backend leaked for this device (and
    /// its clones) so far. Each number is checked to still name an eventfd first (a cheap
    /// guard, not a proof).
    ///
    /// # Safety
    /// Every `VhostUserDaemon` that served this device (or a clone) must have been dropped,
    /// with its handler and worker threads: then nothing else owns these fds, and this is their
    /// only close.
    pub unsafe fn reclaim_exit_fds(&self) {
        let fds = std::mem::take(&mut *self.exit_fds.lock().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            if link.is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]") {
                // SAFETY: vhost-user-backend took this fd with `into_raw_fd()` and never closes
                // it; the caller guarantees its daemon, workers and their epoll sets are gone.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
}

impl<B> VhostUserBackend for NullDevice<B>
where
    B: Bitmap + Send + Sync + 'static,
{
    type Bitmap = B;
    type Vring = VringRwLock<NullMem<B>>;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the handler cannot stop its worker thread when the daemon is dropped.
        let pair =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pair.0.as_raw_fd());
        Some(pair)
    }
    fn update_memory(&self, _mem: NullMem<B>) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}
