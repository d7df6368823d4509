//! [`TapPort`] (`--tap NAME`): a Linux TAP interface carrying frames with a virtio-net header.
//!
//! Each queue pair opens its own queue of the TAP (`/dev/net/tun`, `TUNSETIFF` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` when there are several pairs):
//! an existing interface of that name is attached to, otherwise the kernel creates it (it then
//! lives as long as the daemon holds it). Frames in both directions carry a virtio-net header
//! of the size the guest negotiated (`TUNSETVNETHDRSZ`: 12 bytes with `VERSION_1` or
//! `MRG_RXBUF`, as QEMU's tap backend sets it), so the device passes checksum and TSO requests
//! straight through; what the TAP may hand the guest is limited to what the guest acked
//! (`TUNSETOFFLOAD`: `GUEST_CSUM` → `TUN_F_CSUM`, `GUEST_TSO4/6` → `TUN_F_TSO4/6`, as QEMU's
//! `tap_fd_set_offload`).
//!
//! Why raw `ioctl`s and not a crate: `tun-rs` (2.8) sets a fixed offload mask and keeps its
//! `TUNSETOFFLOAD` / `TUNSETVNETHDRSZ` wrappers private, the `tun` crate has no virtio-net header
//! support; the three `ioctl`s and their constants are all in `libc`, which we already use.

use std::fs::{File, OpenOptions};
use std::io::{Error as IoError, ErrorKind, IoSlice, Read, Result as IoResult, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
};

use super::port::{Port, Sent};
use crate::virtio_net::NET_HDR_SIZE;

/// One queue of a TAP interface (see the module docs).
#[derive(Debug)]
pub struct TapPort {
    file: File,
    name: String,
}

impl TapPort {
    /// Opens (or creates) TAP `name` for one queue; `multi_queue` for several pairs.
    pub fn open(name: &str, multi_queue: bool) -> IoResult<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                format!("TAP name {name:?} is empty or longer than 15 bytes"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifr` is, live for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            let e = IoError::last_os_error();
            return Err(IoError::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
        }
        let port = TapPort {
            file,
            name: name.to_owned(),
        };
        port.set_hdr_size(NET_HDR_SIZE)?;
        port.tun_offload(0)?;
        Ok(port)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_hdr_size(&self, size: usize) -> IoResult<()> {
        let sz = size as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, a live local.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &sz) } < 0 {
            return Err(IoError::last_os_error());
        }
        Ok(())
    }

    fn tun_offload(&self, flags: libc::c_uint) -> IoResult<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value; no memory is passed.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(IoError::last_os_error());
        }
        Ok(())
    }
}

/// `TUNSETOFFLOAD` flags for the guest's acked features (what the TAP may send the guest).
pub fn tun_offload_flags(acked: u64) -> libc::c_uint {
    let has = |b: u32| acked & (1u64 << b) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= libc::TUN_F_TSO6;
        }
    }
    f
}

impl Port for TapPort {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&self, buf: &mut [u8]) -> IoResult<Option<usize>> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&self, frame: &[IoSlice<'_>]) -> IoResult<Sent> {
        loop {
            match (&self.file).write_vectored(frame) {
                Ok(_) => return Ok(Sent::Sent),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Sent::WouldBlock),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn vnet_hdr(&self) -> bool {
        true
    }

    fn configure(&self, acked: u64, hdr_len: usize) -> IoResult<()> {
        self.set_hdr_size(hdr_len)?;
        self.tun_offload(tun_offload_flags(acked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_the_guest() {
        assert_eq!(tun_offload_flags(0), 0);
        let csum = 1u64 << VIRTIO_NET_F_GUEST_CSUM;
        let tso4 = 1u64 << VIRTIO_NET_F_GUEST_TSO4;
        let tso6 = 1u64 << VIRTIO_NET_F_GUEST_TSO6;
        assert_eq!(tun_offload_flags(csum), libc::TUN_F_CSUM);
        // TSO without checksum offload is not allowed (Linux's tun refuses it too).
        assert_eq!(tun_offload_flags(tso4 | tso6), 0);
        assert_eq!(
            tun_offload_flags(csum | tso4 | tso6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
