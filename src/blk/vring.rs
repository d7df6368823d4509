//! [`BlkVring`]: the device's vring type, a `VringRwLock` that also counts the requests of its
//! ring that are in the disk, so that disabling the ring waits for them.
//!
//! vhost-user-backend 0.24 handles `SET_VRING_ENABLE(0)` (and `RESET_DEVICE`) by calling
//! [`VringT::set_enabled`]`(false)` on the ring and nothing else: the device is not told. With a
//! synchronous dataplane that is enough, because the worker holds the ring's lock for a whole
//! batch. With requests in the disk (the io_uring dataplane, [`super::uring`]) it is not: the
//! completions would be written after the reply. So this wrapper's `set_enabled(false)` first
//! disables the ring (under its lock: the worker checks `enabled` under the same lock before it
//! pops, so no new request starts) and then waits on the ring's [`Gate`] until every request
//! already popped has completed, been marked and been put in the used ring. `GET_VRING_BASE`
//! waits on the same gate from [`VhostUserBackend::stop_vring`](vhost_user_backend::VhostUserBackend::stop_vring).
//! Everything else is delegated unchanged.

use std::fs::File;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;

use crate::backend::DirtyGuestMemory;

/// Requests of one ring that were popped and have not yet been put in the used ring.
#[derive(Debug, Default)]
pub struct Gate {
    count: Mutex<usize>,
    idle: Condvar,
    /// Test hook (negative control): quiescing does not wait.
    skip: std::sync::atomic::AtomicBool,
}

impl Gate {
    /// `n` more requests are in flight.
    pub(crate) fn add(&self, n: usize) {
        if n > 0 {
            *self.count.lock().unwrap_or_else(|e| e.into_inner()) += n;
        }
    }

    /// `n` requests were put in the used ring.
    pub(crate) fn sub(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    /// Test hook (negative control): makes quiescing return without waiting.
    #[cfg(feature = "test-utils")]
    pub fn skip_wait_for_tests(&self, on: bool) {
        self.skip.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until no request is in flight. Logs every 5 s while it waits (a disk that never
    /// completes a request holds the frontend's message, as QEMU's own drain does).
    pub(crate) fn wait_idle(&self, what: &str) {
        if self.skip.load(std::sync::atomic::Ordering::SeqCst) {
            log::warn!("{what}: TEST MODE: not waiting for requests in the disk");
            return;
        }
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let mut waited = 0u64;
        while *c > 0 {
            let (g, t) = self
                .idle
                .wait_timeout(c, Duration::from_secs(5))
                .unwrap_or_else(|e| e.into_inner());
            c = g;
            if t.timed_out() && *c > 0 {
                waited += 5;
                log::warn!(
                    "{what}: still waiting for {} request(s) in the disk ({waited} s)",
                    *c
                );
            }
        }
    }
}

/// The device's vring: `VringRwLock` plus the [`Gate`] of its requests in the disk.
#[derive(Clone)]
pub struct BlkVring {
    inner: VringRwLock<DirtyGuestMemory>,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for BlkVring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkVring")
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl BlkVring {
    /// The requests of this ring in the disk.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The wrapped ring.
    pub fn inner(&self) -> &VringRwLock<DirtyGuestMemory> {
        &self.inner
    }
}

impl<'a> VringStateGuard<'a, DirtyGuestMemory> for BlkVring {
    type G = <VringRwLock<DirtyGuestMemory> as VringStateGuard<'a, DirtyGuestMemory>>::G;
}

impl<'a> VringStateMutGuard<'a, DirtyGuestMemory> for BlkVring {
    type G = <VringRwLock<DirtyGuestMemory> as VringStateMutGuard<'a, DirtyGuestMemory>>::G;
}

impl VringT<DirtyGuestMemory> for BlkVring {
    fn new(mem: DirtyGuestMemory, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(BlkVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            gate: Arc::default(),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, DirtyGuestMemory>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, DirtyGuestMemory>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        if !enabled {
            // Disabled under the ring lock above: nothing new is popped. Wait for what was.
            self.gate.wait_idle("SET_VRING_ENABLE(0)");
        }
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}
