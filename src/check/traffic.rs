//! The net workload's frames and the traffic source.
//!
//! ## Frames
//! Every frame the checker makes names itself, so a frame that arrives cut, mixed with another
//! or twice is recognised wherever it lands. Layout (all integers little-endian):
//!
//! ```text
//! 0..6    destination MAC  ff:ff:ff:ff:ff:ff (broadcast: no backend filters it)
//! 6..12   source MAC       02:76:64:6c:dd:PP (locally administered; dd = direction, PP = pair)
//! 12..14  EtherType        0x88b5 (IEEE 802 local experimental)
//! 14..16  direction        0 = injected towards the guest (RX), 1 = sent by the guest (TX)
//! 16..18  queue pair
//! 18..22  frame length     bytes, the whole frame
//! 22..26  run nonce        random per run: frames of an earlier run still queued in the
//!                          backend's port are told apart (counted as foreign, not checked)
//! 26..34  sequence number  per pair and direction, from 0
//! 34..    payload          bytes of a SplitMix64 stream seeded by (salt, nonce, direction,
//!                          pair, seq)
//! ```
//!
//! ## Injector
//! With `--traffic socket:PATH` ([`Traffic::Socket`]) one thread per queue pair sends frames to
//! the backend's datagram socket port (`PATH`, pair `k > 0`: `PATH.k`, as
//! `vhost-dirtylog-net --socket-port` binds them) from a socket of its own, at
//! [`NetOptions::rate`] frames per second, sizes uniform in the `--frame-size` range. It never
//! stops for the migration: frames keep arriving through `GET_VRING_BASE` /
//! `SET_VRING_ENABLE(0)` and the settle time, so a backend that writes a ring after it was
//! stopped is caught. The same socket receives the frames the backend sends out of its port
//! (the guest's TX frames; the backend learns the address from the injected frames); they are
//! checked and counted.
//!
//! With `--traffic tap:NAME[@NETNS]` ([`Traffic::Tap`]) one thread sends frames (all naming
//! pair 0) through an `AF_PACKET` socket bound to the TAP interface, opened inside the
//! network namespace by a helper thread (`setns` changes only the calling thread's), after
//! setting the interface up. Frames transmitted on a TAP interface are what its file
//! descriptor reads, i.e. what the backend receives; with several queues the kernel picks
//! the queue. The backend's TX frames come back on the same socket (received frames; our own,
//! `PACKET_OUTGOING`, are skipped), as do the kernel's own frames on that interface, which
//! are counted as foreign.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::CheckError;
use super::options::{NetOptions, Traffic};
use super::pattern::{splitmix64, Rng};

/// EtherType of the checker's frames (IEEE 802 local experimental 1).
pub(super) const ETHERTYPE: u16 = 0x88b5;
/// Bytes of the frame header described in the module docs.
pub(super) const FRAME_HDR: usize = 34;
/// Direction field: injected towards the guest.
pub(super) const DIR_RX: u16 = 0;
/// Direction field: sent by the guest.
pub(super) const DIR_TX: u16 = 1;

/// Who made a frame: the run's salt (from `--seed`) and nonce (random per run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Origin {
    pub salt: u64,
    pub nonce: u32,
}

impl Origin {
    /// The origin of this run's frames for `salt`, with a fresh nonce.
    pub fn new(salt: u64) -> Origin {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let nonce = splitmix64(t ^ u64::from(std::process::id()) << 32) as u32;
        Origin { salt, nonce }
    }
}

/// Writes the frame `(dir, pair, seq)` of `len` bytes (at least [`FRAME_HDR`]) into `buf`.
pub(super) fn make_frame(buf: &mut Vec<u8>, dir: u16, pair: u16, seq: u64, len: usize, o: Origin) {
    buf.clear();
    buf.extend_from_slice(&[0xff; 6]);
    buf.extend_from_slice(&[0x02, 0x76, 0x64, 0x6c, dir as u8, pair as u8]);
    buf.extend_from_slice(&ETHERTYPE.to_be_bytes());
    buf.extend_from_slice(&dir.to_le_bytes());
    buf.extend_from_slice(&pair.to_le_bytes());
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&o.nonce.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    let mut x = stream_seed(o, dir, pair, seq);
    while buf.len() < len {
        x = splitmix64(x);
        let n = (len - buf.len()).min(8);
        buf.extend_from_slice(&x.to_le_bytes()[..n]);
    }
    buf.truncate(len.max(FRAME_HDR));
}

fn stream_seed(o: Origin, dir: u16, pair: u16, seq: u64) -> u64 {
    o.salt
        ^ seq.rotate_left(17)
        ^ u64::from(o.nonce) << 20
        ^ (u64::from(dir) << 62)
        ^ (u64::from(pair) << 48)
}

/// What [`parse_frame`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Parsed {
    /// An intact frame of this run: its pair and sequence number.
    Seq(u16, u64),
    /// A checker frame of another run (still queued in the port): not checked.
    Foreign,
    /// Damaged: what is wrong.
    Bad(String),
}

/// What a frame must be.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expect {
    /// Direction.
    pub dir: u16,
    /// Pair (`None`: any pair below `pairs`).
    pub pair: Option<u16>,
    /// Pairs of the run.
    pub pairs: u16,
    /// Frames with another EtherType are foreign, not damaged (a TAP also carries the
    /// kernel's own frames, e.g. IPv6 router solicitations).
    pub lenient: bool,
}

/// Checks `f` is an intact frame of `o`'s run as `e` says.
pub(super) fn parse_frame(f: &[u8], e: Expect, o: Origin) -> Parsed {
    match parse_inner(f, e, o) {
        Ok(Some((p, seq))) => Parsed::Seq(p, seq),
        Ok(None) => Parsed::Foreign,
        Err(e) => Parsed::Bad(e),
    }
}

fn parse_inner(f: &[u8], e: Expect, o: Origin) -> Result<Option<(u16, u64)>, String> {
    let dir = e.dir;
    if e.lenient && (f.len() < 14 || u16::from_be_bytes([f[12], f[13]]) != ETHERTYPE) {
        return Ok(None);
    }
    if f.len() < FRAME_HDR {
        return Err(format!("a {}-byte frame, shorter than its header", f.len()));
    }
    let u16le = |i: usize| u16::from_le_bytes([f[i], f[i + 1]]);
    if u16::from_be_bytes([f[12], f[13]]) != ETHERTYPE {
        return Err(format!(
            "EtherType {:#06x}, not the checker's",
            u16::from_be_bytes([f[12], f[13]])
        ));
    }
    let (d, p) = (u16le(14), u16le(16));
    let len = u32::from_le_bytes([f[18], f[19], f[20], f[21]]) as usize;
    let nonce = u32::from_le_bytes([f[22], f[23], f[24], f[25]]);
    let seq = u64::from_le_bytes(f[26..34].try_into().unwrap_or([0; 8]));
    if nonce != o.nonce {
        return Ok(None);
    }
    if d != dir || e.pair.is_some_and(|q| q != p) || p >= e.pairs {
        return Err(format!(
            "frame {seq} of direction {d} pair {p} arrived as direction {dir}{}",
            e.pair.map_or(String::new(), |q| format!(" pair {q}"))
        ));
    }
    if len != f.len() {
        return Err(format!(
            "frame {seq} is {} bytes, its header says {len}",
            f.len()
        ));
    }
    let mut x = stream_seed(o, dir, p, seq);
    for (k, chunk) in f[FRAME_HDR..].chunks(8).enumerate() {
        x = splitmix64(x);
        if chunk != &x.to_le_bytes()[..chunk.len()] {
            return Err(format!(
                "frame {seq} ({len} bytes): payload differs at byte {}",
                FRAME_HDR + 8 * k
            ));
        }
    }
    Ok(Some((p, seq)))
}

/// The path of pair `pair`'s socket port when pair 0's is `base` (`base`, `base.1`, ...), as
/// `vhost-dirtylog-net` binds them.
pub(super) fn pair_path(base: &Path, pair: usize) -> PathBuf {
    if pair == 0 {
        return base.to_owned();
    }
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{pair}"));
    PathBuf::from(s)
}

/// Counters of one pair's injector, readable while it runs.
#[derive(Debug, Default)]
pub(super) struct PortStats {
    /// Frames the backend's port accepted.
    pub sent: AtomicU64,
    /// Sends refused because the port's queue was full (the frame is retried later).
    pub full: AtomicU64,
    /// Sends that failed otherwise (no socket there yet, ...).
    pub errors: AtomicU64,
    /// Frames the backend sent out of its port (the guest's TX frames) that arrived intact.
    pub tx_seen: AtomicU64,
    /// Frames from the backend that were not intact TX frames of this pair.
    pub tx_bad: AtomicU64,
}

/// The injector threads (one per pair) and their sockets' directory.
#[derive(Debug)]
pub(super) struct Injectors {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Option<String>>>,
    /// Per injector (one per pair on a socket port, one on a TAP).
    pub stats: Vec<Arc<PortStats>>,
    /// The directory of our sockets (socket ports only).
    dir: Option<PathBuf>,
    /// Problems seen (bad frames from the port).
    pub samples: Vec<String>,
}

/// Where an injector's frames go and the backend's come from.
enum Wire {
    /// The backend's datagram socket port at `to`, from a socket of our own.
    Unix { sock: UnixDatagram, to: PathBuf },
    /// An `AF_PACKET` socket bound to a TAP interface.
    Packet(OwnedFd),
}

impl Wire {
    /// Sends one frame.
    fn send(&self, f: &[u8]) -> std::io::Result<()> {
        match self {
            Wire::Unix { sock, to } => sock.send_to(f, to).map(|_| ()),
            Wire::Packet(fd) => {
                // SAFETY: `f` is live and readable for its length; the fd is ours and open.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        f.as_ptr().cast(),
                        f.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Receives one frame the backend sent (`Ok(None)`: nothing now). On a packet socket the
    /// frames we sent ourselves (`PACKET_OUTGOING`) are skipped.
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let r = match self {
            Wire::Unix { sock, .. } => sock.recv(buf),
            Wire::Packet(fd) => loop {
                // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: `buf` and `from` are live and writable for the sizes given.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut flen,
                    )
                };
                if n < 0 {
                    break Err(std::io::Error::last_os_error());
                }
                if from.sll_pkttype != libc::PACKET_OUTGOING {
                    break Ok(n as usize);
                }
            },
        };
        match r {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Opens an `AF_PACKET` socket bound to interface `name` in network namespace `netns` (a
/// name under `/var/run/netns` or a path; `None`: ours) and sets the interface up. The
/// namespace is entered by a helper thread (`setns` changes only the calling thread's); the
/// socket stays in it.
fn packet_socket(name: &str, netns: Option<&str>) -> Result<OwnedFd, String> {
    let name = name.to_string();
    let netns = netns.map(|n| {
        if n.contains('/') {
            PathBuf::from(n)
        } else {
            Path::new("/var/run/netns").join(n)
        }
    });
    std::thread::spawn(move || -> Result<OwnedFd, String> {
        if let Some(ns) = &netns {
            let f = std::fs::File::open(ns)
                .map_err(|e| format!("network namespace {}: {e}", ns.display()))?;
            // SAFETY: setns on a namespace fd we opened; it affects only this helper thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "entering network namespace {}: {}",
                    ns.display(),
                    std::io::Error::last_os_error()
                ));
            }
        }
        let cname = std::ffi::CString::new(name.clone()).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(format!(
                "no interface {name}{}",
                netns
                    .as_ref()
                    .map_or(String::new(), |n| format!(" in {}", n.display()))
            ));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if raw < 0 {
            return Err(format!(
                "AF_PACKET socket (needs CAP_NET_RAW): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(format!(
                "binding to {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        // Up (SIOCGIFFLAGS / SIOCSIFFLAGS), as `ip link set NAME up` does.
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads and writes a `struct ifreq`, which `ifr` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } != 0 {
            return Err(format!(
                "{name}: SIOCGIFFLAGS: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the flags member is the one SIOCGIFFLAGS filled in.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short == 0 {
            ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
            // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`, which `ifr` is.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } != 0 {
                return Err(format!(
                    "{name}: setting it up: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(fd)
    })
    .join()
    .map_err(|_| "the namespace helper thread panicked".to_string())?
}

/// Settings of one injector thread.
struct Inject {
    /// The pair its frames name.
    pair: u16,
    /// TX frames from the port: of this pair only (`None`: any, a TAP's one wire).
    tx_pair: Option<u16>,
    pairs: u16,
    wire: Wire,
    rate: u64,
    sizes: (u32, u32),
    origin: Origin,
    seed: u64,
    stats: Arc<PortStats>,
    stop: Arc<AtomicBool>,
}

impl Injectors {
    /// Starts the traffic of `net` for `pairs` queue pairs (`None` for [`Traffic::None`]).
    pub fn start(
        net: &NetOptions,
        pairs: u16,
        origin: Origin,
        seed: u64,
    ) -> Result<Option<Injectors>, CheckError> {
        let setup = |m: String| CheckError::Setup(m);
        let base = match &net.traffic {
            Traffic::None => return Ok(None),
            Traffic::Socket(base) => base,
            Traffic::Tap { name, netns } => {
                let fd = packet_socket(name, netns.as_deref()).map_err(setup)?;
                return Self::spawn_all(
                    net,
                    pairs,
                    origin,
                    seed,
                    None,
                    vec![(Wire::Packet(fd), None)],
                )
                .map(Some);
            }
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "vhost-dirtylog-check-{}-{nanos:x}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).map_err(|e| setup(format!("{}: {e}", dir.display())))?;
        let mut wires = Vec::new();
        for pair in 0..pairs {
            let own = dir.join(format!("pair{pair}.sock"));
            let sock = UnixDatagram::bind(&own)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .map_err(|e| setup(format!("{}: {e}", own.display())))?;
            let to = pair_path(base, usize::from(pair));
            wires.push((Wire::Unix { sock, to }, Some(pair)));
        }
        Self::spawn_all(net, pairs, origin, seed, Some(dir), wires).map(Some)
    }

    /// One injector thread per wire; `(wire, Some(pair))` carries that pair's frames only,
    /// `(wire, None)` frames of pair 0 in and TX frames of every pair out.
    fn spawn_all(
        net: &NetOptions,
        pairs: u16,
        origin: Origin,
        seed: u64,
        dir: Option<PathBuf>,
        wires: Vec<(Wire, Option<u16>)>,
    ) -> Result<Injectors, CheckError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut inj = Injectors {
            stop: stop.clone(),
            handles: Vec::new(),
            stats: Vec::new(),
            dir,
            samples: Vec::new(),
        };
        for (wire, tx_pair) in wires {
            let pair = tx_pair.unwrap_or(0);
            let stats = Arc::new(PortStats::default());
            let job = Inject {
                pair,
                tx_pair,
                pairs,
                wire,
                rate: net.rate,
                sizes: (net.frame_min, net.frame_max),
                origin,
                seed,
                stats: stats.clone(),
                stop: stop.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("check-inject-{pair}"))
                .spawn(move || job.run())
                .map_err(|e| CheckError::Setup(format!("cannot start an injector thread: {e}")))?;
            inj.handles.push(h);
            inj.stats.push(stats);
        }
        Ok(inj)
    }

    /// One wire per pair (socket port): pair `k`'s RX queue gets injector `k`'s frames.
    /// Otherwise (a TAP) the kernel spreads frames over the queues as it likes.
    pub fn per_pair(&self) -> bool {
        self.dir.is_some()
    }

    /// Sum of a counter over all pairs.
    pub fn sum(&self, f: impl Fn(&PortStats) -> &AtomicU64) -> u64 {
        self.stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Stops the threads and collects their samples.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            if let Ok(Some(s)) = h.join() {
                self.samples.push(s);
            }
        }
    }
}

impl Drop for Injectors {
    fn drop(&mut self) {
        self.stop();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Inject {
    /// Sends until told to stop; returns the first problem seen with a frame from the port.
    fn run(self) -> Option<String> {
        let mut rng = Rng::new(splitmix64(self.seed ^ 0x6e65_7400 ^ u64::from(self.pair)));
        let mut frame = Vec::with_capacity(self.sizes.1 as usize);
        let mut rbuf = vec![0u8; 65536];
        let mut seq = 0u64;
        let mut tx_next = vec![0u64; usize::from(self.pairs.max(1))];
        let expect = Expect {
            dir: DIR_TX,
            pair: self.tx_pair,
            pairs: self.pairs,
            lenient: self.tx_pair.is_none(),
        };
        let mut sample = None;
        let start = Instant::now();
        let mut pending = false;
        while !self.stop.load(Ordering::Relaxed) {
            // What the backend sent out of its port.
            let mut got = 0;
            while got < 256 {
                match self.wire.recv(&mut rbuf) {
                    Ok(Some(n)) => {
                        got += 1;
                        match parse_frame(&rbuf[..n.min(rbuf.len())], expect, self.origin) {
                            Parsed::Seq(p, s) if s >= tx_next[usize::from(p)] => {
                                tx_next[usize::from(p)] = s + 1;
                                self.stats.tx_seen.fetch_add(1, Ordering::Relaxed);
                            }
                            Parsed::Foreign => {}
                            Parsed::Seq(p, s) => {
                                self.stats.tx_bad.fetch_add(1, Ordering::Relaxed);
                                sample.get_or_insert_with(|| {
                                    format!(
                                        "pair {p}: TX frame {s} left the port after frame {}",
                                        tx_next[usize::from(p)].wrapping_sub(1)
                                    )
                                });
                            }
                            Parsed::Bad(e) => {
                                self.stats.tx_bad.fetch_add(1, Ordering::Relaxed);
                                sample.get_or_insert_with(|| {
                                    format!("pair {}: from the port: {e}", self.pair)
                                });
                            }
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            // Injection, paced to the rate (0: as fast as the port takes frames).
            let due = if self.rate == 0 {
                u64::MAX
            } else {
                (start.elapsed().as_secs_f64() * self.rate as f64) as u64
            };
            let mut burst = 0;
            while seq < due && burst < 64 {
                if !pending {
                    let len = rng.range(u64::from(self.sizes.0), u64::from(self.sizes.1));
                    make_frame(
                        &mut frame,
                        DIR_RX,
                        self.pair,
                        seq,
                        len as usize,
                        self.origin,
                    );
                    pending = true;
                }
                match self.wire.send(&frame) {
                    Ok(_) => {
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        seq += 1;
                        pending = false;
                        burst += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.stats.full.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(_) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                        break;
                    }
                }
            }
            if got == 0 && (burst < 64 || self.rate != 0) {
                // The port is full, or the rate is met: let the backend and the guest run.
                std::thread::sleep(Duration::from_micros(if self.rate == 0 { 20 } else { 200 }));
            }
        }
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_named() {
        let o = Origin { salt: 9, nonce: 5 };
        let rx3 = Expect {
            dir: DIR_RX,
            pair: Some(3),
            pairs: 4,
            lenient: false,
        };
        let any = Expect { pair: None, ..rx3 };
        let tx3 = Expect { dir: DIR_TX, ..rx3 };
        let mut f = Vec::new();
        for len in [34usize, 60, 61, 1514] {
            make_frame(&mut f, DIR_RX, 3, 77, len, o);
            assert_eq!(f.len(), len);
            assert_eq!(parse_frame(&f, rx3, o), Parsed::Seq(3, 77));
            assert_eq!(parse_frame(&f, any, o), Parsed::Seq(3, 77));
        }
        let bad = |p: Parsed| match p {
            Parsed::Bad(e) => e,
            p => panic!("{p:?}"),
        };
        assert!(bad(parse_frame(&f, tx3, o)).contains("direction"));
        assert!(bad(parse_frame(&f[..100], rx3, o)).contains("header says 1514"));
        let mut g = f.clone();
        g[700] ^= 1;
        assert!(bad(parse_frame(&g, rx3, o)).contains("byte 698"));
        // Another salt (another seed) is damage; another nonce (another run) is foreign.
        assert!(matches!(
            parse_frame(&f, rx3, Origin { salt: 10, nonce: 5 }),
            Parsed::Bad(_)
        ));
        assert_eq!(
            parse_frame(&f, rx3, Origin { salt: 9, nonce: 6 }),
            Parsed::Foreign
        );
        assert!(matches!(parse_frame(&f[..10], rx3, o), Parsed::Bad(_)));
        // Pair 3 of a 3-pair run does not exist; a TAP's other traffic is foreign.
        assert!(matches!(
            parse_frame(&f, Expect { pairs: 3, ..any }, o),
            Parsed::Bad(_)
        ));
        let mut ip6 = f.clone();
        ip6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert!(matches!(parse_frame(&ip6, any, o), Parsed::Bad(_)));
        let lenient = Expect {
            lenient: true,
            ..any
        };
        assert_eq!(parse_frame(&ip6, lenient, o), Parsed::Foreign);
        assert_eq!(parse_frame(&f, lenient, o), Parsed::Seq(3, 77));
        assert_eq!(pair_path(Path::new("/x/p"), 2), PathBuf::from("/x/p.2"));
        assert_eq!(pair_path(Path::new("/x/p"), 0), PathBuf::from("/x/p"));
        assert_ne!(Origin::new(1).nonce, 0);
    }
}
