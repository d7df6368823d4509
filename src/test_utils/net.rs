//! Fixtures for the vhost-user-net device: an in-process device with socket ports
//! ([`in_process`]), a guest with RX/TX queues in memfd RAM ([`Guest`]), the test end of a
//! socket port ([`Wire`]) and patterned frames. Shared by `tests/net_basic.rs` and
//! `benches/net.rs`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::{DaemonDir, InProcessDaemon};
use crate::driver::net::{self as netdrv, RxQueue, TxQueue};
use crate::driver::{Connection, GuestRam, QueueLayout, RegionSpec};
use crate::log::GuestDirtyBitmap;
use crate::net::{NetConfig, NetDevice, Port, SocketPort, TapPort};
use crate::vmm::SharedLog;

/// Timeout of every wait on the device.
pub const T: Duration = Duration::from_secs(10);
/// Guest RAM of the in-process guest, bytes (one region at GPA 0).
pub const RAM_SIZE: u64 = 8 << 20;
/// Size of every queue.
pub const QSIZE: u16 = 256;
/// RX buffers posted per RX queue.
pub const RX_BUFS: u16 = 64;
/// Bytes per RX buffer.
pub const BUF_LEN: u32 = 2048;
/// Bytes per TX slot.
pub const SLOT_LEN: u32 = 2048;

/// Where pair `pair`'s RX queue lives in guest RAM.
pub fn rx_layout(pair: u64) -> QueueLayout {
    QueueLayout::new(0x10000 + pair * 0x20000, QSIZE).unwrap()
}
/// Where pair `pair`'s TX queue lives in guest RAM.
pub fn tx_layout(pair: u64) -> QueueLayout {
    QueueLayout::new(0x18000 + pair * 0x20000, QSIZE).unwrap()
}
/// GPA of pair `pair`'s first RX buffer.
pub fn rx_bufs(pair: u64) -> u64 {
    0x100000 + pair * 0x100000
}
/// GPA of pair `pair`'s first TX slot.
pub fn tx_slots(pair: u64) -> u64 {
    0x400000 + pair * 0x100000
}

/// A test frame of `len` bytes: broadcast destination, a source MAC, then a pattern seeded by
/// `seed` (so frames are told apart).
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f.extend((0..len.saturating_sub(12)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f.truncate(len);
    f
}

/// The in-process guest: RAM, connection, one RX and one TX queue per pair.
#[derive(Debug)]
pub struct Guest {
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The vhost-user connection (the VMM side).
    pub conn: Connection,
    /// RX queue of each pair.
    pub rx: Vec<RxQueue>,
    /// TX queue of each pair.
    pub tx: Vec<TxQueue>,
}

impl Guest {
    /// Negotiates, maps RAM, optionally hands over a log and turns LOG_ALL on, starts
    /// `pairs` queue pairs and posts every RX buffer.
    pub fn new(mut conn: Connection, pairs: u64, log: bool) -> (Guest, Option<SharedLog>) {
        let ram = Arc::new(GuestRam::new(&[RegionSpec::new(0, RAM_SIZE)]).unwrap());
        netdrv::negotiate(&mut conn, !0).unwrap();
        assert!(conn.version_1() && conn.event_idx());
        conn.set_mem_table(&ram).unwrap();
        let shared = log.then(|| {
            let l = SharedLog::new(RAM_SIZE).unwrap();
            conn.set_log_base(l.dirty_log_region()).unwrap();
            conn.set_log_all(true).unwrap();
            l
        });
        let (mut rx, mut tx) = (Vec::new(), Vec::new());
        for p in 0..pairs {
            let r = RxQueue::new(
                ram.clone(),
                rx_layout(p),
                rx_bufs(p),
                BUF_LEN,
                RX_BUFS,
                conn.event_idx(),
            )
            .unwrap();
            let t = TxQueue::new(
                ram.clone(),
                tx_layout(p),
                tx_slots(p),
                SLOT_LEN,
                conn.event_idx(),
            )
            .unwrap();
            conn.start_queue(2 * p as usize, r.queue()).unwrap();
            conn.start_queue(2 * p as usize + 1, t.queue()).unwrap();
            rx.push(r);
            tx.push(t);
        }
        for r in &mut rx {
            r.post_all().unwrap();
        }
        (Guest { ram, conn, rx, tx }, shared)
    }
}

/// The test's end of the socket port: a datagram socket the daemon sends to.
#[derive(Debug)]
pub struct Wire {
    /// The test's socket (bound at the daemon's peer path).
    pub sock: UnixDatagram,
    /// The daemon's port path.
    pub port: PathBuf,
}

impl Wire {
    /// Binds `peer`, sending to `port`.
    pub fn new(peer: &Path, port: &Path) -> Wire {
        let sock = UnixDatagram::bind(peer).unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        sock.set_write_timeout(Some(T)).unwrap();
        Wire {
            sock,
            port: port.to_owned(),
        }
    }
    /// Sends a frame into the daemon's port.
    pub fn inject(&self, f: &[u8]) {
        self.sock.send_to(f, &self.port).unwrap();
    }
    /// Receives a frame the daemon sent (waits up to [`T`]).
    pub fn take(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 70000];
        let n = self.sock.recv(&mut buf).expect("a frame from the daemon");
        buf.truncate(n);
        buf
    }
}

/// An in-process `vhost-dirtylog-net` device served on a vhost-user socket, one socket
/// port (and [`Wire`]) per pair.
#[derive(Debug)]
pub struct InProc {
    /// The device (its counters).
    pub dev: NetDevice,
    /// The serving daemon.
    pub daemon: InProcessDaemon<GuestDirtyBitmap>,
    /// The test end of each pair's port.
    pub wires: Vec<Wire>,
    _dir: DaemonDir,
}

/// [`in_process_with`] the default settings and `pairs` queue pairs.
pub fn in_process(pairs: u16) -> InProc {
    in_process_with(NetConfig {
        queue_pairs: pairs,
        ..Default::default()
    })
}

/// Starts a device with `config` in this process, one socket port per pair.
pub fn in_process_with(config: NetConfig) -> InProc {
    let pairs = config.queue_pairs;
    let dir = DaemonDir::new("net-test");
    let mut ports: Vec<Arc<dyn Port>> = Vec::new();
    let mut wires = Vec::new();
    for p in 0..usize::from(pairs) {
        let port = dir.dir.path().join(format!("port{p}"));
        let peer = dir.dir.path().join(format!("peer{p}"));
        ports.push(Arc::new(SocketPort::bind(&port, Some(&peer)).unwrap()));
        wires.push(Wire::new(&peer, &port));
    }
    serve(config, ports, wires, dir)
}

/// Starts a device with `config` in this process on the given ports (one per pair; `wires`
/// may be empty when the caller talks to the ports another way, e.g. a TAP).
pub fn in_process_on(config: NetConfig, ports: Vec<Arc<dyn Port>>) -> InProc {
    serve(config, ports, Vec::new(), DaemonDir::new("net-test"))
}

fn serve(config: NetConfig, ports: Vec<Arc<dyn Port>>, wires: Vec<Wire>, dir: DaemonDir) -> InProc {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = NetDevice::into_backend(config, ports, mem.clone()).unwrap();
    let dev = backend.inner().clone();
    let d2 = dev.clone();
    let daemon = InProcessDaemon::serve_with(backend, mem, &dir.sock, |d| d2.attach(d).unwrap());
    InProc {
        dev,
        daemon,
        wires,
        _dir: dir,
    }
}

/// A TAP `name` in a network namespace of its own (the calling process's namespaces are left
/// alone: a helper thread `unshare`s), up, IPv6 off, and an `AF_PACKET` socket bound to it
/// (1 s receive timeout): the wire side of the TAP. Frames written to the socket reach the
/// device's RX; frames the device sends can be read from it. Nothing leaves the namespace.
///
/// Errors: not root, no `/dev/net/tun`, or a socket call failed (the message says which).
pub fn tap_in_netns(name: &'static str) -> Result<(TapPort, std::fs::File), String> {
    use std::os::fd::FromRawFd;
    std::thread::spawn(move || -> Result<_, String> {
        // SAFETY: unshare affects only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        let tap = TapPort::open(name, false).map_err(|e| e.to_string())?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // SAFETY: plain socket calls on fds this thread owns; `ifr` and `sll` are live locals
        // of the sizes given.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, c) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
                *d = *c as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) < 0 {
                return Err(format!("SIOCSIFFLAGS: {}", std::io::Error::last_os_error()));
            }
            libc::close(s);
            let idx = libc::if_nametoindex(ifr.ifr_name.as_ptr());
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let p = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            );
            if p < 0 {
                return Err(format!("AF_PACKET: {}", std::io::Error::last_os_error()));
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = idx as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            if libc::bind(p, (&sll as *const libc::sockaddr_ll).cast(), len) < 0 {
                return Err(format!(
                    "bind AF_PACKET: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            libc::setsockopt(
                p,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok((tap, std::fs::File::from_raw_fd(p)))
        }
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_string())?
}
