//! A message relay in front of vhost-user-backend that accepts QEMU's early
//! `SET_VRING_ENABLE`.
//!
//! ## The flaw it works around
//! QEMU's virtio-net (`hw/net/virtio-net.c` `peer_attach`, called when the device is reset and
//! when the guest sets the number of queue pairs) sends `VHOST_USER_SET_VRING_ENABLE` for its
//! vhost-user peer as soon as the backend *offered* `VHOST_USER_F_PROTOCOL_FEATURES`
//! (`vhost_user_set_vring_enable` checks `dev->features`, the offered set), which happens
//! before the first `SET_FEATURES`: QEMU 10.0 sends it, asking for a reply, right after the
//! protocol-feature handshake. The vhost-user specification says the message "should be sent
//! only when `VHOST_USER_F_PROTOCOL_FEATURES` has been negotiated", and the rust-vmm crates
//! enforce that strictly: `vhost` 0.18's `BackendReqHandler` fails the request with
//! `InactiveFeature` before the device sees it (`backend_req_handler.rs`), which ends the
//! connection, and `vhost-user-backend` 0.24 refuses it again (`handler.rs`). The guest then
//! never gets a link. DPDK's `lib/vhost` and libvhost-user accept the message at any time.
//!
//! ## What the relay does
//! The daemon serves the frontend through a socket pair of its own: vhost-user-backend connects
//! ([`VhostUserDaemon::start_client`]) to a private listener (a socket of mode 0600 named after
//! the process, and the accepted peer must be this very process, checked with `SO_PEERCRED`), and two threads copy
//! messages, file descriptors included (`SCM_RIGHTS`, through vmm-sys-util's [`ScmSocket`]),
//! between that connection and the frontend's. Every message is forwarded unchanged except a
//! `SET_VRING_ENABLE` that arrives while no `SET_FEATURES` has acked
//! `VHOST_USER_F_PROTOCOL_FEATURES`: the relay answers it itself (success, if the frontend
//! asked for a reply), remembers the last state asked for each ring, and sends those states to
//! the backend right after the `SET_FEATURES` that acks the bit — the order the specification
//! asks for. Control messages are small and rare; the dataplane (guest memory, eventfds) does
//! not pass through the relay.
//!
//! A malformed header (payload larger than [`MAX_PAYLOAD`]) or a closed side ends the
//! connection as the crate itself would: both sockets are shut down, the daemon's `wait`
//! returns `Disconnected`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::mmap::NewBitmap;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1.
const FLAG_VERSION: u32 = 0x1;
/// Header flags: this message is a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flags: the sender wants a reply (`VHOST_USER_PROTOCOL_F_REPLY_ACK`).
const FLAG_NEED_REPLY: u32 = 0x8;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Bytes of a vhost-user message header (request, flags, size: three little-endian u32).
const HEADER: usize = 12;
/// The largest payload relayed, in bytes: the `vhost` crate's own limit (`MAX_MSG_SIZE`,
/// 4 KiB); a bigger one would be refused by the handler anyway.
pub const MAX_PAYLOAD: usize = 0x1000;
/// The most file descriptors one message may carry (`MAX_ATTACHED_FD_ENTRIES` in the
/// specification's reference implementation and the `vhost` crate).
const MAX_FDS: usize = 32;

/// Why the relay could not be set up or a connection could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Creating the private listener, connecting or accepting failed.
    #[error("relay socket: {0}")]
    Io(#[from] io::Error),
    /// vhost-user-backend could not connect to the relay.
    #[error("vhost-user-backend did not start on the relay: {0}")]
    Daemon(String),
    /// Something other than this process connected to the private listener first.
    #[error("relay: unexpected peer (pid {0}) on the private socket")]
    Intruder(i32),
}

/// The relay's private listener; one per daemon process, reused for every frontend. Dropping it
/// removes the socket.
#[derive(Debug)]
pub struct Relay {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.remove_files();
    }
}

/// A running relay connection: its two copying threads.
#[derive(Debug)]
pub struct RelayConnection {
    threads: Vec<JoinHandle<()>>,
}

impl RelayConnection {
    /// Waits until both directions ended (after the daemon's `wait` returned, or a side closed).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl Relay {
    /// [`new_in`](Self::new_in) `$TMPDIR`.
    ///
    /// Errors: as [`new_in`](Self::new_in).
    pub fn new() -> Result<Relay, RelayError> {
        Self::new_in(&std::env::temp_dir())
    }

    /// Creates the private listener in `dir`: a socket named after this process
    /// (`.vhost-dirtylog-relay-PID-N.sock`), mode 0600 (only this user may connect; and only
    /// this process is served, see [`start`](Self::start)). A daemon passes a directory its
    /// sandbox lets it remove files in (its vhost-user socket's), so the socket can be removed
    /// at exit. Call it before the sandbox is applied.
    ///
    /// Errors: the socket cannot be created or its mode set.
    pub fn new_in(dir: &Path) -> Result<Relay, RelayError> {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = dir.join(format!(
            ".vhost-dirtylog-relay-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A stale socket of a dead process with this pid: its name is ours now.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let relay = Relay { listener, path };
        std::fs::set_permissions(&relay.path, std::fs::Permissions::from_mode(0o600))?;
        Ok(relay)
    }

    /// The private socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the private socket (also done on drop). For a process about to `exit`, which
    /// runs no destructors. No frontend can be started afterwards.
    pub fn remove_files(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Serves `frontend` with `daemon` through the relay: the daemon connects to the private
    /// listener, and the relay copies messages both ways until either side closes.
    ///
    /// Errors: the daemon could not connect, the private listener failed, or another process
    /// got there first (then the daemon is not started; its connection attempt is dropped).
    pub fn start<T>(
        &self,
        daemon: &mut VhostUserDaemon<T>,
        frontend: UnixStream,
    ) -> Result<RelayConnection, RelayError>
    where
        T: VhostUserBackend + Clone + 'static,
        T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
        T::Vring: Clone + Send + Sync,
    {
        let path = self
            .path
            .to_str()
            .ok_or_else(|| RelayError::Daemon("relay path is not UTF-8".into()))?;
        // The connection completes against the listen backlog, so this returns before accept.
        daemon
            .start_client(path)
            .map_err(|e| RelayError::Daemon(e.to_string()))?;
        let (backend, _) = self.listener.accept()?;
        let pid = peer_pid(&backend)?;
        if pid != std::process::id() as i32 {
            let _ = backend.shutdown(Shutdown::Both);
            return Err(RelayError::Intruder(pid));
        }
        Ok(start_pumps(frontend, backend)?)
    }
}

/// The pid of a unix socket's peer (`SO_PEERCRED`).
fn peer_pid(s: &UnixStream) -> io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals of the sizes passed; getsockopt writes at most
    // `len` bytes into `cred` and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// What the frontend-to-backend direction knows about the negotiation.
#[derive(Default)]
struct Negotiation {
    /// A `SET_FEATURES` acked `VHOST_USER_F_PROTOCOL_FEATURES`.
    acked: bool,
    /// Ring index → last state of an early `SET_VRING_ENABLE`.
    early: BTreeMap<u32, u32>,
}

/// Starts the two copying threads between `frontend` and `backend` (the daemon's end).
pub(crate) fn start_pumps(
    frontend: UnixStream,
    backend: UnixStream,
) -> io::Result<RelayConnection> {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let from_backend = backend.try_clone()?;
    let ends = Arc::new([frontend.try_clone()?, backend.try_clone()?]);
    let ends2 = ends.clone();
    let down = move |ends: &[UnixStream; 2]| {
        for s in ends {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    let tf = to_frontend.clone();
    let a = std::thread::Builder::new()
        .name("vu-relay-req".into())
        .spawn(move || {
            if let Err(e) = pump_requests(frontend, backend, &tf) {
                log::debug!("relay: frontend side ended: {e}");
            }
            down(&ends);
        })?;
    let b = std::thread::Builder::new()
        .name("vu-relay-reply".into())
        .spawn(move || {
            if let Err(e) = pump_replies(from_backend, &to_frontend) {
                log::debug!("relay: backend side ended: {e}");
            }
            down(&ends2);
        })?;
    Ok(RelayConnection {
        threads: vec![a, b],
    })
}

/// One vhost-user message as read from a socket.
struct Message {
    header: [u8; HEADER],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes(self.header[0..4].try_into().expect("4 bytes"))
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes(self.header[4..8].try_into().expect("4 bytes"))
    }

    fn u64_payload(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.get(..8)?.try_into().ok()?))
    }

    /// `VhostUserVringState { index: u32, num: u32 }`.
    fn vring_state(&self) -> Option<(u32, u32)> {
        let p = self.payload.get(..8)?;
        Some((
            u32::from_le_bytes(p[0..4].try_into().ok()?),
            u32::from_le_bytes(p[4..8].try_into().ok()?),
        ))
    }

    fn new(request: u32, flags: u32, payload: Vec<u8>) -> Message {
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload,
            fds: Vec::new(),
        }
    }
}

/// Reads one message; `Ok(None)` at a clean end of stream.
fn read_message(s: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `header`, a live local of `HEADER` bytes that may take any
    // bytes; the received descriptors are owned by us and wrapped right below.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: recvmsg installed these `nfds` descriptors in this process for us; nothing
        // else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER {
        s.read_exact(&mut header[n..])?;
    }
    let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message payload of {size} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut payload = vec![0u8; size];
    s.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// Writes one message, its descriptors with the first byte.
fn write_message(s: &mut UnixStream, m: &Message) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER + m.payload.len());
    bytes.extend_from_slice(&m.header);
    bytes.extend_from_slice(&m.payload);
    let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = if raw.is_empty() {
        s.write(&bytes)?
    } else {
        s.send_with_fds(&[&bytes[..]], &raw)
            .map_err(io::Error::from)?
    };
    s.write_all(&bytes[sent..])
}

/// Frontend → backend: forwards requests, answering early `SET_VRING_ENABLE`s itself.
fn pump_requests(
    mut frontend: UnixStream,
    mut backend: UnixStream,
    to_frontend: &Mutex<UnixStream>,
) -> io::Result<()> {
    let mut neg = Negotiation::default();
    while let Some(m) = read_message(&mut frontend)? {
        match m.request() {
            SET_VRING_ENABLE if !neg.acked => {
                let Some((index, num)) = m.vring_state() else {
                    write_message(&mut backend, &m)?; // malformed: let the handler refuse it
                    continue;
                };
                log::debug!(
                    "relay: SET_VRING_ENABLE({index}, {num}) before PROTOCOL_FEATURES was acked; \
                     applied after SET_FEATURES"
                );
                neg.early.insert(index, num);
                if m.flags() & FLAG_NEED_REPLY != 0 {
                    let ack = Message::new(
                        SET_VRING_ENABLE,
                        FLAG_VERSION | FLAG_REPLY,
                        0u64.to_le_bytes().to_vec(),
                    );
                    let mut f = to_frontend.lock().unwrap_or_else(|e| e.into_inner());
                    write_message(&mut f, &ack)?;
                }
            }
            SET_FEATURES => {
                write_message(&mut backend, &m)?;
                let acks = m.u64_payload().is_some_and(|f| f & PROTOCOL_FEATURES != 0);
                if acks && !neg.acked {
                    neg.acked = true;
                    for (index, num) in std::mem::take(&mut neg.early) {
                        let mut p = index.to_le_bytes().to_vec();
                        p.extend_from_slice(&num.to_le_bytes());
                        write_message(
                            &mut backend,
                            &Message::new(SET_VRING_ENABLE, FLAG_VERSION, p),
                        )?;
                    }
                }
            }
            _ => write_message(&mut backend, &m)?,
        }
    }
    Ok(())
}

/// Backend → frontend: forwards replies (and their descriptors) unchanged.
fn pump_replies(mut backend: UnixStream, to_frontend: &Mutex<UnixStream>) -> io::Result<()> {
    while let Some(m) = read_message(&mut backend)? {
        let mut f = to_frontend.lock().unwrap_or_else(|e| e.into_inner());
        write_message(&mut f, &m)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let m = Message::new(request, flags, payload.to_vec());
        let mut v = m.header.to_vec();
        v.extend_from_slice(&m.payload);
        v
    }

    /// Frontend end, backend end as the daemon sees them, through the pumps.
    fn pair() -> (UnixStream, UnixStream, RelayConnection) {
        let (fe, fe_relay) = UnixStream::pair().unwrap();
        let (be_relay, be) = UnixStream::pair().unwrap();
        let conn = start_pumps(fe_relay, be_relay).unwrap();
        for s in [&fe, &be] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (fe, be, conn)
    }

    fn read(s: &mut UnixStream) -> Message {
        read_message(s).unwrap().expect("a message")
    }

    #[test]
    fn early_enable_is_answered_and_replayed_after_set_features() {
        let (mut fe, mut be, conn) = pair();
        let mut st = 1u32.to_le_bytes().to_vec();
        st.extend_from_slice(&1u32.to_le_bytes());
        fe.write_all(&req(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &st))
            .unwrap();
        let ack = read(&mut fe);
        assert_eq!(ack.request(), SET_VRING_ENABLE);
        assert_eq!(ack.flags(), FLAG_VERSION | FLAG_REPLY);
        assert_eq!(ack.u64_payload(), Some(0));
        let feats = (PROTOCOL_FEATURES | 1 << 32).to_le_bytes();
        fe.write_all(&req(SET_FEATURES, FLAG_VERSION, &feats))
            .unwrap();
        let m = read(&mut be);
        assert_eq!(
            (m.request(), m.u64_payload()),
            (SET_FEATURES, Some(u64::from_le_bytes(feats)))
        );
        let m = read(&mut be);
        assert_eq!(m.request(), SET_VRING_ENABLE);
        assert_eq!(m.vring_state(), Some((1, 1)));
        assert_eq!(m.flags() & FLAG_NEED_REPLY, 0);
        // After the ack, the message goes through untouched.
        fe.write_all(&req(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &st))
            .unwrap();
        let m = read(&mut be);
        assert_eq!(m.flags(), FLAG_VERSION | FLAG_NEED_REPLY);
        drop(fe);
        conn.join();
    }

    #[test]
    fn descriptors_and_replies_pass_both_ways() {
        let (mut fe, mut be, conn) = pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        let bytes = req(31, FLAG_VERSION, &[7u8; 40]);
        fe.send_with_fds(&[&bytes[..]], &[file.as_raw_fd()])
            .unwrap();
        let m = read(&mut be);
        assert_eq!((m.request(), m.payload.len(), m.fds.len()), (31, 40, 1));
        be.write_all(&req(31, FLAG_VERSION | FLAG_REPLY, &5u64.to_le_bytes()))
            .unwrap();
        let r = read(&mut fe);
        assert_eq!((r.request(), r.u64_payload()), (31, Some(5)));
        drop(be);
        // The backend going away ends the frontend's connection too.
        assert!(read_message(&mut fe).unwrap().is_none());
        conn.join();
    }

    #[test]
    fn oversized_header_ends_the_connection() {
        let (mut fe, mut be, conn) = pair();
        let mut h = Message::new(1, FLAG_VERSION, Vec::new()).header;
        h[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        fe.write_all(&h).unwrap();
        assert!(read_message(&mut be).unwrap().is_none());
        conn.join();
    }
}
