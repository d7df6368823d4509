//! The vhost-user side of the device: `impl VhostUserBackend for BlkDevice` (features,
//! config space access, memory updates, one worker per queue, `GET_VRING_BASE` quiescing and
//! event dispatch to the synchronous or io_uring dataplane).
//!
//! Separate from the device's construction and dataplane (`blk/mod.rs`) because it is the
//! protocol surface vhost-user-backend calls into; as a child module it reaches the device's
//! private state (`BlkDevice::inner`, `process_queue`) through `super::`.

use std::io::{Error as IoError, ErrorKind, Result as IoResult};
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::io::IoContext;
use super::{uring, BlkDevice, BlkVring};
use crate::backend::DirtyGuestMemory;
use crate::log::GuestDirtyBitmap;
use crate::virtio_blk::CONFIG_WCE_OFFSET;

impl VhostUserBackend for BlkDevice {
    type Bitmap = GuestDirtyBitmap;
    type Vring = BlkVring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.config.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1u64 << VIRTIO_BLK_F_MQ);
        if self.inner.disk.read_only() {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Relaxed);
        // Without CONFIG_WCE (and FLUSH) the driver cannot manage a write cache: be writethrough.
        if features & (1u64 << VIRTIO_BLK_F_FLUSH) == 0 {
            self.inner.writeback.store(false, Ordering::Relaxed);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        self.inner.writeback.store(true, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The frontend asks for as much of the config space as its feature set defines; bytes
        // past our 96-byte layout read as zero. vhost checks offset + size <= 256.
        let space = self.config_space();
        let bytes = space.as_slice();
        let (start, len) = (offset as usize, size as usize);
        let mut out = vec![0u8; len];
        if start < bytes.len() {
            let n = len.min(bytes.len() - start);
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> IoResult<()> {
        let acked = self.inner.acked_features.load(Ordering::Relaxed);
        if acked & (1u64 << VIRTIO_BLK_F_CONFIG_WCE) == 0 {
            return Err(IoError::new(
                ErrorKind::PermissionDenied,
                "config space is read-only without VIRTIO_BLK_F_CONFIG_WCE",
            ));
        }
        if offset != CONFIG_WCE_OFFSET || buf.len() != 1 {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                format!(
                    "only the wce byte (offset {CONFIG_WCE_OFFSET}, 1 byte) is writable, got offset {offset} len {}",
                    buf.len()
                ),
            ));
        }
        let wb = buf[0] != 0;
        log::info!(
            "write cache {}",
            if wb { "writeback" } else { "writethrough" }
        );
        self.inner.writeback.store(wb, Ordering::Relaxed);
        if !wb {
            self.inner.disk.flush()?;
        }
        Ok(())
    }

    fn update_memory(&self, mem: DirtyGuestMemory) -> IoResult<()> {
        *self.inner.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                use std::os::fd::AsRawFd;
                self.inner
                    .exit_fds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                log::error!("cannot create worker exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> IoResult<()> {
        let q = self
            .inner
            .queues
            .get(queue_index as usize)
            .ok_or_else(|| IoError::new(ErrorKind::InvalidInput, "no such queue"))?;
        // The synchronous worker holds this lock for as long as it touches the ring; the ring's
        // ready bit is already clear, so once we hold it no batch is running or can start.
        q.stats.lock().unwrap_or_else(|e| e.into_inner()).stops += 1;
        // The asynchronous worker pops only while the ring is ready, under the ring lock, and
        // counts what it popped before releasing it: wait for those to complete.
        if let Some(e) = &q.engine {
            let gate = e
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .vring()
                .map(|v| v.gate().clone());
            if let Some(g) = gate {
                g.wait_idle("GET_VRING_BASE");
            }
        }
        log::debug!("queue {queue_index}: stopped");
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> IoResult<()> {
        if evset != EventSet::IN {
            // Returning an error would end this queue's worker thread for good.
            log::warn!("queue {thread_id}: ignoring unexpected event set {evset:?}");
            return Ok(());
        }
        // One queue per thread: the thread index is the queue index, its only vring event 0;
        // `num_queues + 1` is the queue's io_uring completion event.
        let qidx = thread_id;
        let completion = u64::from(device_event) == u64::from(self.inner.config.num_queues) + 1;
        let vring_idx = if completion { 0 } else { device_event as usize };
        let (Some(vring), Some(q)) = (vrings.get(vring_idx), self.inner.queues.get(qidx)) else {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                format!("event {device_event} on thread {thread_id} matches no queue"),
            ));
        };
        if let (Some(engine), true) = (&q.engine, self.inner.attached.load(Ordering::Acquire)) {
            let atomic = self
                .inner
                .mem
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let limits = self.limits();
            let ctx = IoContext {
                disk: &self.inner.disk,
                log: &self.inner.log,
                serial: &self.inner.serial,
                writeback: self.inner.writeback.load(Ordering::Relaxed),
            };
            let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
            let mut e = engine.lock().unwrap_or_else(|e| e.into_inner());
            e.run(
                vring,
                &atomic,
                &ctx,
                &limits,
                uring::RunFlags {
                    event_idx,
                    completion_event: completion,
                },
                qidx,
            );
            return Ok(());
        }
        if completion {
            return Ok(());
        }
        let mut stats = q.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        let atomic = self
            .inner
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mem = &atomic;
        if self.inner.event_idx.load(Ordering::Relaxed) {
            // Process until the driver added nothing new between our last pop and re-enabling
            // notifications (the standard EVENT_IDX loop), so no kick is lost.
            loop {
                if let Err(e) = state.disable_notification() {
                    log::warn!("queue {qidx}: cannot disable notifications: {e}");
                }
                self.process_queue(&mut state, mem, &mut stats, qidx);
                match state.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        log::warn!("queue {qidx}: cannot enable notifications: {e}");
                        break;
                    }
                }
            }
        } else {
            self.process_queue(&mut state, mem, &mut stats, qidx);
        }
        Ok(())
    }
}
