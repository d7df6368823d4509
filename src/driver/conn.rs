//! The vhost-user connection, frontend side: `vhost`'s [`Frontend`] plus the bookkeeping a VMM
//! does around it.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::{DriverError, GuestRam, RemovedRegion, SplitQueue};
use crate::backend::VHOST_F_LOG_ALL;

/// Queues assumed before `GET_QUEUE_NUM` (or when the backend lacks `MQ`).
const DEFAULT_MAX_QUEUES: u64 = 64;

/// A vhost-user frontend connection (see the module docs).
pub struct Connection {
    fe: Frontend,
    offered: u64,
    acked: u64,
    offered_protocol: VhostUserProtocolFeatures,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("protocol", &self.protocol)
            .field("queue_num", &self.queue_num)
            .finish()
    }
}

impl Connection {
    /// Connects to the backend's socket at `path`, retrying until `timeout` while the socket
    /// does not exist yet or refuses (the daemon may still be starting).
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, DriverError> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ok(Self::from_stream(s)),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Wraps a connected stream (e.g. one end of a `socketpair`).
    pub fn from_stream(stream: UnixStream) -> Self {
        Connection {
            fe: Frontend::from_stream(stream, DEFAULT_MAX_QUEUES),
            offered: 0,
            acked: 0,
            offered_protocol: VhostUserProtocolFeatures::empty(),
            protocol: VhostUserProtocolFeatures::empty(),
            queue_num: DEFAULT_MAX_QUEUES,
        }
    }

    /// The standard start of a session: `SET_OWNER`, `GET_FEATURES`, and if the backend offers
    /// `VHOST_USER_F_PROTOCOL_FEATURES`: `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES`
    /// (offered ∩ `want_protocol`), `GET_QUEUE_NUM` (with `MQ`); then `SET_FEATURES` with
    /// offered ∩ `want` (plus `PROTOCOL_FEATURES` when offered). With `REPLY_ACK` negotiated
    /// every later message waits for the backend's ack, so each call returns after the backend
    /// processed it. Returns the acked virtio features.
    pub fn negotiate(
        &mut self,
        want: u64,
        want_protocol: VhostUserProtocolFeatures,
    ) -> Result<u64, DriverError> {
        self.fe.set_owner()?;
        self.offered = self.fe.get_features()?;
        let has_protocol = self.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if has_protocol {
            self.offered_protocol = self.fe.get_protocol_features()?;
            self.protocol = self.offered_protocol & want_protocol;
            self.fe.set_protocol_features(self.protocol)?;
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
                self.queue_num = self.fe.get_queue_num()?;
            }
        }
        let mut features = self.offered & want;
        if has_protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.set_features(features)?;
        Ok(self.acked)
    }

    /// [`negotiate`](Self::negotiate) with everything a virtio-blk driver of this toolkit
    /// handles: all offered virtio-blk and ring features except `LOG_ALL` (turned on later
    /// with [`set_log_all`](Self::set_log_all)), and the protocol features `MQ`, `LOG_SHMFD`,
    /// `REPLY_ACK`, `CONFIG` and `CONFIGURE_MEM_SLOTS`.
    pub fn negotiate_blk(&mut self) -> Result<u64, DriverError> {
        self.negotiate(
            !VHOST_F_LOG_ALL,
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
    }

    /// Features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }
    /// Features acked with the last `SET_FEATURES`.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }
    /// Protocol features the backend offered.
    pub fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.offered_protocol
    }
    /// Protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }
    /// Queues the backend supports (`GET_QUEUE_NUM`, or 64 without `MQ`).
    pub fn queue_num(&self) -> u64 {
        self.queue_num
    }
    /// `VIRTIO_RING_F_EVENT_IDX` acked.
    pub fn event_idx(&self) -> bool {
        self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }
    /// `VIRTIO_F_VERSION_1` acked.
    pub fn version_1(&self) -> bool {
        self.acked & (1 << VIRTIO_F_VERSION_1) != 0
    }
    /// `VHOST_F_LOG_ALL` currently acked.
    pub fn log_all(&self) -> bool {
        self.acked & VHOST_F_LOG_ALL != 0
    }

    /// `SET_FEATURES`.
    pub fn set_features(&mut self, features: u64) -> Result<(), DriverError> {
        self.fe.set_features(features)?;
        self.acked = features;
        Ok(())
    }

    /// Turns dirty logging on or off: `SET_FEATURES` with or without `VHOST_F_LOG_ALL`.
    pub fn set_log_all(&mut self, on: bool) -> Result<(), DriverError> {
        if on && self.offered & VHOST_F_LOG_ALL == 0 {
            return Err(DriverError::Feature("VHOST_F_LOG_ALL"));
        }
        let f = if on {
            self.acked | VHOST_F_LOG_ALL
        } else {
            self.acked & !VHOST_F_LOG_ALL
        };
        self.set_features(f)
    }

    /// `SET_LOG_BASE` with a shared-memory log (`LOG_SHMFD`): fd, size and offset.
    pub fn set_log_base(&mut self, log: VhostUserDirtyLogRegion) -> Result<(), DriverError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(DriverError::Feature("VHOST_USER_PROTOCOL_F_LOG_SHMFD"));
        }
        self.fe.set_log_base(0, Some(log))?;
        Ok(())
    }

    /// `SET_MEM_TABLE` with every region of `ram`.
    pub fn set_mem_table(&mut self, ram: &GuestRam) -> Result<(), DriverError> {
        let regions = ram.region_infos()?;
        self.fe.set_mem_table(&regions)?;
        Ok(())
    }

    /// `ADD_MEM_REG` for the region of `ram` containing `gpa` (needs `CONFIGURE_MEM_SLOTS`).
    pub fn add_mem_region(&mut self, ram: &GuestRam, gpa: u64) -> Result<(), DriverError> {
        let info = ram.region_info(gpa)?;
        self.fe.add_mem_region(&info)?;
        Ok(())
    }

    /// `REM_MEM_REG` for a region taken out of the RAM.
    pub fn remove_mem_region(&mut self, region: &RemovedRegion) -> Result<(), DriverError> {
        self.fe.remove_mem_region(&region.info()?)?;
        Ok(())
    }

    /// Starts queue `index` on `q`: `SET_VRING_NUM`, `SET_VRING_ADDR` (host virtual addresses,
    /// `VHOST_VRING_F_LOG` with the used ring's guest address while logging is on),
    /// `SET_VRING_BASE` ([`SplitQueue::device_base`]), `SET_VRING_CALL`, `SET_VRING_KICK` and,
    /// with protocol features, `SET_VRING_ENABLE`.
    pub fn start_queue(&mut self, index: usize, q: &SplitQueue) -> Result<(), DriverError> {
        self.fe.set_vring_num(index, q.size())?;
        self.set_vring_addr(index, q)?;
        self.fe.set_vring_base(index, q.device_base())?;
        self.fe.set_vring_call(index, q.call_fd())?;
        self.fe.set_vring_kick(index, q.kick_fd())?;
        if self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.fe.set_vring_enable(index, true)?;
        }
        Ok(())
    }

    /// `SET_VRING_ADDR` for queue `index` on `q`: host virtual addresses of the three parts,
    /// and `VHOST_VRING_F_LOG` with the used ring's guest-physical address while `LOG_ALL` is
    /// acked (QEMU re-sends this when it turns logging on or off).
    pub fn set_vring_addr(&mut self, index: usize, q: &SplitQueue) -> Result<(), DriverError> {
        let l = q.layout();
        let ram = q.ram();
        let cfg = VringConfigData {
            queue_max_size: l.size,
            queue_size: l.size,
            flags: u32::from(self.log_all()),
            desc_table_addr: ram.gpa_to_hva(l.desc)?,
            used_ring_addr: ram.gpa_to_hva(l.used)?,
            avail_ring_addr: ram.gpa_to_hva(l.avail)?,
            log_addr: Some(l.used),
        };
        self.fe.set_vring_addr(index, &cfg)?;
        Ok(())
    }

    /// Stops queue `index` (`GET_VRING_BASE`) and returns the backend's next avail index.
    /// After this returns the backend must not touch the ring or its buffers.
    pub fn stop_queue(&mut self, index: usize) -> Result<u16, DriverError> {
        let base = self.fe.get_vring_base(index)?;
        u16::try_from(base)
            .map_err(|_| DriverError::Backend(format!("GET_VRING_BASE returned {base:#x}")))
    }

    /// `SET_VRING_ENABLE` (needs protocol features).
    pub fn set_vring_enable(&mut self, index: usize, on: bool) -> Result<(), DriverError> {
        self.fe.set_vring_enable(index, on)?;
        Ok(())
    }

    /// `GET_CONFIG`: `size` bytes of the device config space from `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, DriverError> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .fe
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)?;
        if data.len() != size as usize {
            return Err(DriverError::Backend(format!(
                "GET_CONFIG returned {} bytes, asked for {size}",
                data.len()
            )));
        }
        Ok(data)
    }

    /// `SET_CONFIG`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), DriverError> {
        self.fe
            .set_config(offset, VhostUserConfigFlags::empty(), data)?;
        Ok(())
    }

    /// A round trip (`GET_FEATURES`): every message sent before has been processed when it
    /// returns, with or without `REPLY_ACK`.
    pub fn barrier(&mut self) -> Result<(), DriverError> {
        self.fe.get_features()?;
        Ok(())
    }

    /// The underlying `vhost` frontend, for messages this wrapper does not cover.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }
}
