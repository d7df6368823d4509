//! The vhost-user connection, frontend side: `vhost`'s [`Frontend`] plus the bookkeeping a VMM
//! does around it.
//!
//! ## Timeouts on the control plane
//! `vhost`'s frontend reads replies with blocking socket reads and retries on `EAGAIN`, so a
//! backend that never answers, or answers with a shorter body than expected, would block the
//! frontend forever (a socket read timeout would only turn that into a busy retry loop). With
//! [`Connection::set_timeout`] every message method of [`Connection`] runs under a watchdog:
//! if the call has not returned when the deadline passes, the watchdog shuts the socket down,
//! the pending read sees end-of-file, and the call fails with [`DriverError::Timeout`]. The
//! connection is unusable afterwards, which is the right outcome for a hung backend.
//!
//! ## `SET_LOG_BASE` is sent by hand
//! With `LOG_SHMFD` the back-end replies to `SET_LOG_BASE` once it has mapped the log. The
//! specification leaves the reply's payload open and implementations differ: `vhost`'s backend
//! echoes the 16-byte log description, QEMU's libvhost-user (qemu-storage-daemon, the QEMU
//! vhost-user daemons) sends an 8-byte `u64`. `vhost` 0.18's frontend insists on 16 bytes and
//! would wait forever for the missing 8 from libvhost-user. QEMU's own frontend reads the
//! header and whatever payload it announces; [`Connection::set_log_base`] does the same on the
//! raw socket, so the toolkit works against both.

use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{FrontendReq, VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{DriverError, GuestRam, QueueLayout, RemovedRegion, SplitQueue};

/// `VHOST_F_LOG_ALL` as a feature-word bit.
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// Queues assumed before `GET_QUEUE_NUM` (or when the backend lacks `MQ`).
const DEFAULT_MAX_QUEUES: u64 = 64;

/// The protocol version in a message header's flags (`VhostUserHeaderFlag::VERSION` is the
/// mask of the version bits, not the value).
const VHOST_USER_VERSION: u32 = 0x1;

/// Largest reply payload accepted for a hand-sent `SET_LOG_BASE`.
const MAX_LOG_BASE_REPLY: usize = 256;

/// A vhost-user frontend connection (see the module docs).
pub struct Connection {
    fe: Frontend,
    /// A second handle on the socket: for hand-sent messages and for the watchdog's shutdown.
    stream: Option<UnixStream>,
    watchdog: Option<Watchdog>,
    timeout: Option<Duration>,
    /// Nesting depth of guarded calls (only the outermost arms the watchdog).
    guard_depth: u32,
    offered: u64,
    acked: u64,
    offered_protocol: VhostUserProtocolFeatures,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
}

#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    fired: bool,
    quit: bool,
}

#[derive(Default)]
struct WatchShared {
    state: Mutex<WatchState>,
    cv: Condvar,
}

/// Shuts a socket down when an armed deadline passes (see the module docs).
struct Watchdog {
    shared: Arc<WatchShared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn new(stream: UnixStream) -> std::io::Result<Self> {
        let shared = Arc::new(WatchShared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || {
                let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                while !st.quit {
                    match st.deadline {
                        None => st = s.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                let _ = stream.shutdown(Shutdown::Both);
                                st.fired = true;
                                st.deadline = None;
                            } else {
                                st =
                                    s.cv.wait_timeout(st, d - now)
                                        .unwrap_or_else(|e| e.into_inner())
                                        .0;
                            }
                        }
                    }
                }
            })?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arm(&self, timeout: Duration) {
        let mut st = self.lock();
        st.deadline = Some(Instant::now() + timeout);
        st.fired = false;
        drop(st);
        self.shared.cv.notify_one();
    }

    /// Disarms; returns whether the watchdog fired since it was armed.
    fn disarm(&self) -> bool {
        let mut st = self.lock();
        st.deadline = None;
        st.fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.lock().quit = true;
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("protocol", &self.protocol)
            .field("queue_num", &self.queue_num)
            .field("timeout", &self.timeout)
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
            // Without a second handle (fd exhaustion) the connection still works, only
            // without timeouts and with `vhost`'s own SET_LOG_BASE.
            stream: stream.try_clone().ok(),
            fe: Frontend::from_stream(stream, DEFAULT_MAX_QUEUES),
            watchdog: None,
            timeout: None,
            guard_depth: 0,
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
        self.guard("the feature negotiation", |c| {
            c.negotiate_inner(want, want_protocol)
        })
    }

    fn negotiate_inner(
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
            !LOG_ALL,
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
    }

    /// Bounds every later message method: a call that has not returned after `timeout` fails
    /// with [`DriverError::Timeout`] and leaves the connection shut down (see the module docs).
    /// `None` (the default) waits forever. The watchdog thread is started on first use.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), DriverError> {
        if timeout.is_some() && self.watchdog.is_none() {
            if let Some(s) = &self.stream {
                self.watchdog = Some(Watchdog::new(s.try_clone()?)?);
            }
        }
        self.timeout = timeout;
        Ok(())
    }

    /// The control-plane timeout ([`set_timeout`](Self::set_timeout)).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Runs `f` under the watchdog (outermost call only).
    fn guard<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let timeout = match (self.timeout, &self.watchdog, self.guard_depth) {
            (Some(t), Some(w), 0) => {
                w.arm(t);
                Some(t)
            }
            _ => None,
        };
        self.guard_depth += 1;
        let res = f(self);
        self.guard_depth -= 1;
        if let (Some(t), Some(w)) = (timeout, &self.watchdog) {
            if w.disarm() {
                return match res {
                    Ok(v) => Ok(v),
                    Err(_) => Err(DriverError::Timeout(t, what)),
                };
            }
        }
        res
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
        self.acked & LOG_ALL != 0
    }

    /// `SET_FEATURES`.
    pub fn set_features(&mut self, features: u64) -> Result<(), DriverError> {
        self.guard("the reply to SET_FEATURES", |c| {
            c.fe.set_features(features)?;
            c.acked = features;
            Ok(())
        })
    }

    /// Turns dirty logging on or off: `SET_FEATURES` with or without `VHOST_F_LOG_ALL`.
    pub fn set_log_all(&mut self, on: bool) -> Result<(), DriverError> {
        if on && self.offered & LOG_ALL == 0 {
            return Err(DriverError::Feature("VHOST_F_LOG_ALL"));
        }
        let f = if on {
            self.acked | LOG_ALL
        } else {
            self.acked & !LOG_ALL
        };
        self.set_features(f)
    }

    /// `SET_LOG_BASE` with a shared-memory log (`LOG_SHMFD`): fd, size and offset. Returns after
    /// the backend's reply, i.e. once it has switched to this log (sent by hand, accepting any
    /// reply payload: see the module docs).
    pub fn set_log_base(&mut self, log: VhostUserDirtyLogRegion) -> Result<(), DriverError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(DriverError::Feature("VHOST_USER_PROTOCOL_F_LOG_SHMFD"));
        }
        self.guard("the reply to SET_LOG_BASE", |c| c.send_log_base(&log))
    }

    /// [`set_log_base`](Self::set_log_base) with the `size` bytes at `offset` of `fd` (a memfd,
    /// say): what a VMM holds, rather than `vhost`'s message struct. `offset` and `size` are
    /// sent as given, so a test can also hand the backend a log that does not fit its fd.
    pub fn set_log_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        size: u64,
    ) -> Result<(), DriverError> {
        self.set_log_base(VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: fd.as_raw_fd(),
        })
    }

    fn send_log_base(&mut self, log: &VhostUserDirtyLogRegion) -> Result<(), DriverError> {
        let Some(stream) = &self.stream else {
            self.fe.set_log_base(0, Some(*log))?;
            return Ok(());
        };
        let code = FrontendReq::SET_LOG_BASE as u32;
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&VHOST_USER_VERSION.to_le_bytes());
        msg.extend_from_slice(&16u32.to_le_bytes());
        msg.extend_from_slice(&log.mmap_size.to_le_bytes());
        msg.extend_from_slice(&log.mmap_offset.to_le_bytes());
        let sent = stream
            .send_with_fd(&msg[..], log.mmap_handle)
            .map_err(|e| DriverError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        if sent != msg.len() {
            return Err(DriverError::Backend(format!(
                "SET_LOG_BASE: sent {sent} of {} bytes",
                msg.len()
            )));
        }
        let mut hdr = [0u8; 12];
        (&*stream).read_exact(&mut hdr)?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (req, flags, size) = (word(0), word(4), word(8) as usize);
        if req != code || flags & VhostUserHeaderFlag::REPLY.bits() == 0 {
            return Err(DriverError::Backend(format!(
                "SET_LOG_BASE answered with request {req}, flags {flags:#x}"
            )));
        }
        if size > MAX_LOG_BASE_REPLY {
            return Err(DriverError::Backend(format!(
                "SET_LOG_BASE reply announces {size} bytes of payload"
            )));
        }
        let mut body = vec![0u8; size];
        (&*stream).read_exact(&mut body)?;
        Ok(())
    }

    /// `SET_MEM_TABLE` with every region of `ram`.
    pub fn set_mem_table(&mut self, ram: &GuestRam) -> Result<(), DriverError> {
        let regions = ram.region_infos()?;
        self.guard("the reply to SET_MEM_TABLE", |c| {
            c.fe.set_mem_table(&regions)?;
            Ok(())
        })
    }

    /// `ADD_MEM_REG` for the region of `ram` containing `gpa` (needs `CONFIGURE_MEM_SLOTS`).
    pub fn add_mem_region(&mut self, ram: &GuestRam, gpa: u64) -> Result<(), DriverError> {
        let info = ram.region_info(gpa)?;
        self.guard("the reply to ADD_MEM_REG", |c| {
            c.fe.add_mem_region(&info)?;
            Ok(())
        })
    }

    /// `REM_MEM_REG` for a region taken out of the RAM.
    pub fn remove_mem_region(&mut self, region: &RemovedRegion) -> Result<(), DriverError> {
        let info = region.info()?;
        self.guard("the reply to REM_MEM_REG", |c| {
            c.fe.remove_mem_region(&info)?;
            Ok(())
        })
    }

    /// Starts queue `index` on `q`: `SET_VRING_NUM`, `SET_VRING_ADDR` (host virtual addresses,
    /// `VHOST_VRING_F_LOG` with the used ring's guest address while logging is on),
    /// `SET_VRING_BASE` ([`SplitQueue::device_base`]), `SET_VRING_CALL`, `SET_VRING_KICK` and,
    /// with protocol features, `SET_VRING_ENABLE`.
    pub fn start_queue(&mut self, index: usize, q: &SplitQueue) -> Result<(), DriverError> {
        self.guard("the replies starting a queue", |c| {
            c.fe.set_vring_num(index, q.size())?;
            c.set_vring_addr(index, q)?;
            c.fe.set_vring_base(index, q.device_base())?;
            c.fe.set_vring_call(index, q.call_fd())?;
            c.fe.set_vring_kick(index, q.kick_fd())?;
            if c.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
                c.fe.set_vring_enable(index, true)?;
            }
            Ok(())
        })
    }

    /// `SET_VRING_ADDR` for queue `index` on `q`: host virtual addresses of the three parts,
    /// and `VHOST_VRING_F_LOG` with the used ring's guest-physical address while `LOG_ALL` is
    /// acked (QEMU re-sends this when it turns logging on or off).
    pub fn set_vring_addr(&mut self, index: usize, q: &SplitQueue) -> Result<(), DriverError> {
        self.set_vring_addr_at(index, q.ram(), q.layout())
    }

    /// [`set_vring_addr`](Self::set_vring_addr) for a queue known by its layout in `ram`, for a
    /// VMM thread that does not own the [`SplitQueue`] (e.g. re-sending the addresses of running
    /// rings when it toggles `LOG_ALL`, as QEMU does).
    pub fn set_vring_addr_at(
        &mut self,
        index: usize,
        ram: &GuestRam,
        l: QueueLayout,
    ) -> Result<(), DriverError> {
        let cfg = VringConfigData {
            queue_max_size: l.size,
            queue_size: l.size,
            flags: u32::from(self.log_all()),
            desc_table_addr: ram.gpa_to_hva(l.desc)?,
            used_ring_addr: ram.gpa_to_hva(l.used)?,
            avail_ring_addr: ram.gpa_to_hva(l.avail)?,
            log_addr: Some(l.used),
        };
        self.guard("the reply to SET_VRING_ADDR", |c| {
            c.fe.set_vring_addr(index, &cfg)?;
            Ok(())
        })
    }

    /// Stops queue `index` (`GET_VRING_BASE`) and returns the backend's next avail index.
    /// After this returns the backend must not touch the ring or its buffers.
    pub fn stop_queue(&mut self, index: usize) -> Result<u16, DriverError> {
        let base = self.guard("the reply to GET_VRING_BASE", |c| {
            Ok(c.fe.get_vring_base(index)?)
        })?;
        u16::try_from(base)
            .map_err(|_| DriverError::Backend(format!("GET_VRING_BASE returned {base:#x}")))
    }

    /// `SET_VRING_ENABLE` (needs protocol features).
    pub fn set_vring_enable(&mut self, index: usize, on: bool) -> Result<(), DriverError> {
        self.guard("the reply to SET_VRING_ENABLE", |c| {
            c.fe.set_vring_enable(index, on)?;
            Ok(())
        })
    }

    /// `GET_CONFIG`: `size` bytes of the device config space from `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, DriverError> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self.guard("the reply to GET_CONFIG", |c| {
            Ok(c.fe.get_config(offset, size, VhostUserConfigFlags::empty(), &buf)?)
        })?;
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
        self.guard("the reply to SET_CONFIG", |c| {
            c.fe.set_config(offset, VhostUserConfigFlags::empty(), data)?;
            Ok(())
        })
    }

    /// A round trip (`GET_FEATURES`): every message sent before has been processed when it
    /// returns, with or without `REPLY_ACK`.
    pub fn barrier(&mut self) -> Result<(), DriverError> {
        self.guard("the reply to GET_FEATURES", |c| {
            c.fe.get_features()?;
            Ok(())
        })
    }

    /// The underlying `vhost` frontend, for messages this wrapper does not cover (not bounded
    /// by [`set_timeout`](Self::set_timeout)).
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal backend speaking just enough vhost-user for `negotiate` (no REPLY_ACK):
    /// answers `SET_LOG_BASE` with `log_reply` payload bytes and stops answering
    /// `GET_FEATURES` after `answer_features` of them.
    fn fake_backend(mut s: UnixStream, log_reply: usize, answer_features: usize) {
        let features = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | LOG_ALL;
        let mut answered = 0;
        let reply = |s: &mut UnixStream, req: u32, body: &[u8]| {
            let mut m = Vec::new();
            m.extend_from_slice(&req.to_le_bytes());
            m.extend_from_slice(&(VHOST_USER_VERSION | 0x4).to_le_bytes());
            m.extend_from_slice(&(body.len() as u32).to_le_bytes());
            m.extend_from_slice(body);
            s.write_all(&m)
        };
        loop {
            let mut hdr = [0u8; 12];
            // Plain reads: an attached fd (SET_LOG_BASE) is simply discarded by the kernel.
            if s.read_exact(&mut hdr).is_err() {
                return;
            }
            let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            if s.read_exact(&mut body).is_err() {
                return;
            }
            let r = match req {
                1 if answered < answer_features => {
                    answered += 1;
                    reply(&mut s, 1, &features.to_le_bytes())
                }
                1 => Ok(()), // silence
                15 => reply(
                    &mut s,
                    15,
                    &VhostUserProtocolFeatures::LOG_SHMFD.bits().to_le_bytes(),
                ),
                6 => reply(&mut s, 6, &vec![0u8; log_reply]),
                _ => Ok(()),
            };
            if r.is_err() {
                return;
            }
        }
    }

    fn pair(log_reply: usize, answer_features: usize) -> Connection {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || fake_backend(b, log_reply, answer_features));
        let mut c = Connection::from_stream(a);
        c.set_timeout(Some(Duration::from_secs(5))).unwrap();
        c.negotiate(!0, VhostUserProtocolFeatures::LOG_SHMFD)
            .unwrap();
        c
    }

    #[test]
    fn set_log_base_accepts_any_reply_payload() {
        let log = crate::vmm::SharedLog::new(1 << 20).unwrap();
        // libvhost-user's u64, vhost's echoed VhostUserLog, and nothing at all.
        for len in [8, 16, 0] {
            let mut c = pair(len, 2);
            c.set_log_base(log.dirty_log_region()).unwrap();
            // The stream is still in step: the next request gets its own reply.
            c.barrier().unwrap();
        }
    }

    #[test]
    fn timeout_unblocks_a_silent_backend() {
        let mut c = pair(8, 1);
        c.set_timeout(Some(Duration::from_millis(200))).unwrap();
        let t = Instant::now();
        let e = c.barrier().unwrap_err();
        assert!(matches!(e, DriverError::Timeout(..)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // The connection is dead afterwards, and says so instead of hanging.
        assert!(c.barrier().is_err());
    }
}
