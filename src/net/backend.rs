//! The vhost-user side of the device: `impl VhostUserBackend for NetDevice` (features, config
//! space, memory updates, one worker per queue pair, quiescing, event dispatch to the RX and
//! TX paths).

use std::io::{Error as IoError, ErrorKind, Result as IoResult};
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::{lock, NetDevice};
use crate::backend::DirtyGuestMemory;
use crate::log::GuestDirtyBitmap;
use crate::virtio_net::NetConfigSpace;

/// Offloads a port with a virtio-net header (a TAP with `IFF_VNET_HDR`) can carry.
const OFFLOADS: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6);

impl NetDevice {
    /// The config space as the guest sees it: MAC, link up, queue pairs, MTU.
    pub fn config_space(&self) -> NetConfigSpace {
        let c = &self.inner.config;
        NetConfigSpace(virtio_net_config {
            mac: c.mac,
            status: (VIRTIO_NET_S_LINK_UP as u16).to_le(),
            max_virtqueue_pairs: c.queue_pairs.to_le(),
            mtu: c.mtu.unwrap_or(0).to_le(),
            ..Default::default()
        })
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = GuestDirtyBitmap;
    type Vring = VringRwLock<DirtyGuestMemory>;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.inner.config.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.config.queue_size)
    }

    fn features(&self) -> u64 {
        let c = &self.inner.config;
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
            | (1u64 << VIRTIO_NET_F_MAC)
            | (1u64 << VIRTIO_NET_F_STATUS);
        // MQ needs a control queue (virtio 1.2, 5.1.3.1), which the frontend supplies (QEMU's
        // virtio-net does): offered only when there is more than one pair to steer to.
        if c.queue_pairs > 1 {
            f |= 1u64 << VIRTIO_NET_F_MQ;
        }
        if c.mtu.is_some() {
            f |= 1u64 << VIRTIO_NET_F_MTU;
        }
        if self.inner.ports.iter().all(|p| p.vnet_hdr()) {
            f |= OFFLOADS;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Relaxed);
        let hdr_len = self.hdr_len();
        for (i, port) in self.inner.ports.iter().enumerate() {
            if let Err(e) = port.configure(features, hdr_len) {
                log::warn!("pair {i}: cannot configure the port for the guest's features: {e}");
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Bytes past our 24-byte layout read as zero; vhost checks offset + size <= 256.
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

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> IoResult<()> {
        // virtio 1.2, 5.1.4: the virtio-net config space is read-only for the driver (the MAC
        // is changed through the control queue, which the frontend owns).
        Err(IoError::new(
            ErrorKind::PermissionDenied,
            "the virtio-net config space is read-only",
        ))
    }

    fn update_memory(&self, mem: DirtyGuestMemory) -> IoResult<()> {
        *self.inner.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.config.queue_pairs)
            .map(|p| 0b11u64 << (2 * p))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                use std::os::fd::AsRawFd;
                lock(&self.inner.exit_fds).push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                log::error!("cannot create worker exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> IoResult<()> {
        let pair = self
            .inner
            .pairs
            .get(queue_index as usize / 2)
            .ok_or_else(|| IoError::new(ErrorKind::InvalidInput, "no such queue"))?;
        // The worker holds this lock (and the ring's) for a whole burst and checks `ready`
        // under them; the ring's ready bit is already clear, so once we hold it no burst is
        // running or can start.
        lock(pair).stats.stops += 1;
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
        if !evset.contains(EventSet::IN) {
            // Returning an error would end this pair's worker thread for good. A port error
            // (ERR/HUP) is seen by the next read, counted and logged there.
            log::debug!("pair {thread_id}: event {device_event} with {evset:?}");
        }
        // Each worker sees only its own pair's rings: `vrings[0]` is the RX queue (event 0),
        // `vrings[1]` the TX queue (event 1); vhost-user-backend numbers a thread's vring
        // events by their position in its queue mask.
        let pair = thread_id;
        let (rx, tx) = (0usize, 1usize);
        let (Some(rx_ring), Some(tx_ring)) = (vrings.get(rx), vrings.get(tx)) else {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                format!(
                    "thread {thread_id} has {} rings, not a queue pair",
                    vrings.len()
                ),
            ));
        };
        let ev = u64::from(device_event);
        if ev == self.resume_event() {
            self.take_resume(pair);
            self.rx_process(pair, rx_ring);
            self.tx_process(pair, tx_ring);
        } else if ev == self.port_event() || ev == rx as u64 {
            self.rx_process(pair, rx_ring);
        } else if ev == tx as u64 {
            self.tx_process(pair, tx_ring);
        } else {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                format!("event {device_event} on thread {thread_id} matches no queue"),
            ));
        }
        Ok(())
    }
}
