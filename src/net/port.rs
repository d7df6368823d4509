//! Packet ports: where the device's frames come from and go to.
//!
//! A [`Port`] is a nonblocking file descriptor carrying one Ethernet frame per read or write.
//! The device registers it (edge-triggered) in the worker thread of its queue pair through
//! `VringEpollHandler::register_listener`, reads frames while the guest has RX buffers and
//! writes the guest's TX frames to it.
//!
//! [`SocketPort`] (`--socket-port PATH`): a unix `SOCK_DGRAM` socket bound at a path, one plain
//! Ethernet frame per datagram (no virtio-net header) — the framing of QEMU's
//! `-netdev dgram,local.type=unix,...`, so a daemon can be wired to QEMU or to a second daemon
//! back to back, without root. Frames are sent to a fixed peer path if one is given, else to
//! the address of the last datagram received (learned, as a learning bridge port would).

use std::io::{Error as IoError, ErrorKind, IoSlice, Result as IoResult};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What [`Port::send`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The frame was handed to the port.
    Sent,
    /// The port had no room (its peer's queue is full): dropped, as a NIC drops on a full link.
    WouldBlock,
    /// No peer to send to yet (nothing received, no fixed peer): dropped.
    NoPeer,
}

/// A packet port (see the module docs).
pub trait Port: Send + Sync + std::fmt::Debug {
    /// The nonblocking fd to wait on for received frames.
    fn fd(&self) -> RawFd;
    /// Reads one frame into `buf`. `Ok(None)`: nothing to read now. `Ok(Some(n))` with
    /// `n > buf.len()`: the frame was `n` bytes and was truncated (the caller drops it).
    fn recv(&self, buf: &mut [u8]) -> IoResult<Option<usize>>;
    /// Sends one frame, gathered from `frame`.
    fn send(&self, frame: &[IoSlice<'_>]) -> IoResult<Sent>;
    /// Whether frames on this port carry a 12-byte virtio-net header (a TAP with
    /// `IFF_VNET_HDR`): only then can checksum / TSO offloads be offered to the guest.
    fn vnet_hdr(&self) -> bool {
        false
    }
    /// Called when the guest acks its features (`SET_FEATURES`): `acked` virtio features and
    /// the header size they imply. A TAP sets its header size and offloads from them.
    fn configure(&self, acked: u64, hdr_len: usize) -> IoResult<()> {
        let _ = (acked, hdr_len);
        Ok(())
    }
}

/// A unix datagram socket port (see the module docs).
#[derive(Debug)]
pub struct SocketPort {
    sock: UnixDatagram,
    path: PathBuf,
    fixed_peer: bool,
    /// Where TX frames go: the fixed peer, or the last sender (raw `sockaddr_un` and length).
    peer: Mutex<Option<(libc::sockaddr_un, libc::socklen_t)>>,
}

fn sockaddr_for(path: &Path) -> IoResult<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= a.sun_path.len() {
        return Err(IoError::new(
            ErrorKind::InvalidInput,
            format!("socket path {} is empty or too long", path.display()),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((a, len as libc::socklen_t))
}

impl SocketPort {
    /// Binds a datagram socket at `path` (a stale socket file there is replaced) and sends to
    /// `peer` if given, else to whoever sent last.
    pub fn bind(path: &Path, peer: Option<&Path>) -> IoResult<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            } else {
                return Err(IoError::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        let sock = UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        let peer_addr = peer.map(sockaddr_for).transpose()?;
        Ok(SocketPort {
            sock,
            path: path.to_owned(),
            fixed_peer: peer_addr.is_some(),
            peer: Mutex::new(peer_addr),
        })
    }

    /// The path the socket is bound at.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Port for SocketPort {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn recv(&self, buf: &mut [u8]) -> IoResult<Option<usize>> {
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
        let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        loop {
            // SAFETY: msghdr is plain data; all zeroes is a valid value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_un).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: `iov` points at the live, writable `buf`; `msg` at the live `from` of the
            // size given. MSG_TRUNC makes the return value the datagram's real length, so
            // oversized frames are detected. (recvmsg, not recvfrom: the sandbox's allow-list.)
            let n = unsafe {
                libc::recvmsg(
                    self.sock.as_raw_fd(),
                    &mut msg,
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            let from_len = msg.msg_namelen;
            if n >= 0 {
                if !self.fixed_peer && from_len as usize > std::mem::size_of::<libc::sa_family_t>()
                {
                    let mut p = self.peer.lock().unwrap_or_else(|e| e.into_inner());
                    let same = p.as_ref().is_some_and(|(a, l)| {
                        *l == from_len && a.sun_path[..] == from.sun_path[..]
                    });
                    if !same {
                        *p = Some((from, from_len));
                    }
                }
                return Ok(Some(n as usize));
            }
            let e = IoError::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock => return Ok(None),
                ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    fn send(&self, frame: &[IoSlice<'_>]) -> IoResult<Sent> {
        let Some((mut to, to_len)) = *self.peer.lock().unwrap_or_else(|e| e.into_inner()) else {
            return Ok(Sent::NoPeer);
        };
        // SAFETY: msghdr is plain data; all zeroes is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut to as *mut libc::sockaddr_un).cast();
        msg.msg_namelen = to_len;
        // IoSlice is ABI-compatible with iovec (std guarantees it on unix).
        msg.msg_iov = frame.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = frame.len() as _;
        loop {
            // SAFETY: `msg` points at the live `to` address and at `frame`'s iovecs, which
            // outlive the call; the kernel only reads them.
            let n = unsafe {
                libc::sendmsg(
                    self.sock.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(Sent::Sent);
            }
            let e = IoError::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock => return Ok(Sent::WouldBlock),
                ErrorKind::Interrupted => continue,
                // The peer's socket is gone (a daemon restarting): like a link down.
                ErrorKind::NotFound | ErrorKind::ConnectionRefused => return Ok(Sent::NoPeer),
                _ => return Err(e),
            }
        }
    }
}

/// The socket path of queue pair `pair` for a socket port given as `base`: `base` for pair 0,
/// `base.N` for pair N > 0 (one socket per queue pair, so each worker owns its port).
pub fn pair_path(base: &Path, pair: usize) -> PathBuf {
    if pair == 0 {
        base.to_owned()
    } else {
        let mut s = base.as_os_str().to_owned();
        s.push(format!(".{pair}"));
        PathBuf::from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ports_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let pa = SocketPort::bind(&a, Some(&b)).unwrap();
        let pb = SocketPort::bind(&b, None).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(pb.recv(&mut buf).unwrap(), None);
        // b has no peer until it hears from a.
        assert_eq!(pb.send(&[IoSlice::new(b"x")]).unwrap(), Sent::NoPeer);
        assert_eq!(
            pa.send(&[IoSlice::new(b"hello "), IoSlice::new(b"world")])
                .unwrap(),
            Sent::Sent
        );
        assert_eq!(pb.recv(&mut buf).unwrap(), Some(11));
        assert_eq!(&buf[..11], b"hello world");
        // Learned: b answers a.
        assert_eq!(pb.send(&[IoSlice::new(b"back")]).unwrap(), Sent::Sent);
        assert_eq!(pa.recv(&mut buf).unwrap(), Some(4));
        // An oversized datagram reports its real length.
        pa.send(&[IoSlice::new(&[7u8; 100])]).unwrap();
        assert_eq!(pb.recv(&mut buf).unwrap(), Some(100));
        assert_eq!(pair_path(&a, 0), a);
        assert_eq!(pair_path(&a, 2), dir.path().join("a.2"));
    }
}
