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

use std::io::ErrorKind;
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
    /// An intact frame of this run, with its sequence number.
    Seq(u64),
    /// A checker frame of another run (still queued in the port): not checked.
    Foreign,
    /// Damaged: what is wrong.
    Bad(String),
}

/// Checks `f` is an intact frame of `o`'s run, direction `dir` and pair `pair`.
pub(super) fn parse_frame(f: &[u8], dir: u16, pair: u16, o: Origin) -> Parsed {
    match parse_inner(f, dir, pair, o) {
        Ok(Some(seq)) => Parsed::Seq(seq),
        Ok(None) => Parsed::Foreign,
        Err(e) => Parsed::Bad(e),
    }
}

fn parse_inner(f: &[u8], dir: u16, pair: u16, o: Origin) -> Result<Option<u64>, String> {
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
    if d != dir || p != pair {
        return Err(format!(
            "frame {seq} of direction {d} pair {p} arrived on pair {pair} direction {dir}"
        ));
    }
    if len != f.len() {
        return Err(format!(
            "frame {seq} is {} bytes, its header says {len}",
            f.len()
        ));
    }
    let mut x = stream_seed(o, dir, pair, seq);
    for (k, chunk) in f[FRAME_HDR..].chunks(8).enumerate() {
        x = splitmix64(x);
        if chunk != &x.to_le_bytes()[..chunk.len()] {
            return Err(format!(
                "frame {seq} ({len} bytes): payload differs at byte {}",
                FRAME_HDR + 8 * k
            ));
        }
    }
    Ok(Some(seq))
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
    /// Per pair.
    pub stats: Vec<Arc<PortStats>>,
    dir: PathBuf,
    /// Problems seen (bad frames from the port).
    pub samples: Vec<String>,
}

/// Settings of one injector thread.
struct Inject {
    pair: u16,
    sock: UnixDatagram,
    to: PathBuf,
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
        let Traffic::Socket(base) = &net.traffic else {
            return Ok(None);
        };
        let setup = |m: String| CheckError::Setup(m);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "vhost-dirtylog-check-{}-{nanos:x}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).map_err(|e| setup(format!("{}: {e}", dir.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut inj = Injectors {
            stop: stop.clone(),
            handles: Vec::new(),
            stats: Vec::new(),
            dir: dir.clone(),
            samples: Vec::new(),
        };
        for pair in 0..pairs {
            let own = dir.join(format!("pair{pair}.sock"));
            let sock = UnixDatagram::bind(&own)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .map_err(|e| setup(format!("{}: {e}", own.display())))?;
            let stats = Arc::new(PortStats::default());
            let job = Inject {
                pair,
                sock,
                to: pair_path(base, usize::from(pair)),
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
                .map_err(|e| setup(format!("cannot start an injector thread: {e}")))?;
            inj.handles.push(h);
            inj.stats.push(stats);
        }
        Ok(Some(inj))
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Inject {
    /// Sends until told to stop; returns the first problem seen with a frame from the port.
    fn run(self) -> Option<String> {
        let mut rng = Rng::new(splitmix64(self.seed ^ 0x6e65_7400 ^ u64::from(self.pair)));
        let mut frame = Vec::with_capacity(self.sizes.1 as usize);
        let mut rbuf = vec![0u8; 65536];
        let mut seq = 0u64;
        let mut tx_next = 0u64;
        let mut sample = None;
        let start = Instant::now();
        let mut pending = false;
        while !self.stop.load(Ordering::Relaxed) {
            // What the backend sent out of its port.
            let mut got = 0;
            while got < 256 {
                match self.sock.recv(&mut rbuf) {
                    Ok(n) => {
                        got += 1;
                        match parse_frame(&rbuf[..n], DIR_TX, self.pair, self.origin) {
                            Parsed::Seq(s) if s >= tx_next => {
                                tx_next = s + 1;
                                self.stats.tx_seen.fetch_add(1, Ordering::Relaxed);
                            }
                            Parsed::Foreign => {}
                            Parsed::Seq(s) => {
                                self.stats.tx_bad.fetch_add(1, Ordering::Relaxed);
                                sample.get_or_insert_with(|| {
                                    format!(
                                        "pair {}: TX frame {s} left the port after frame {}",
                                        self.pair,
                                        tx_next.wrapping_sub(1)
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
                    Err(_) => break,
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
                match self.sock.send_to(&frame, &self.to) {
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
        let mut f = Vec::new();
        for len in [34usize, 60, 61, 1514] {
            make_frame(&mut f, DIR_RX, 3, 77, len, o);
            assert_eq!(f.len(), len);
            assert_eq!(parse_frame(&f, DIR_RX, 3, o), Parsed::Seq(77));
        }
        let bad = |p: Parsed| match p {
            Parsed::Bad(e) => e,
            p => panic!("{p:?}"),
        };
        assert!(bad(parse_frame(&f, DIR_TX, 3, o)).contains("direction"));
        assert!(bad(parse_frame(&f[..100], DIR_RX, 3, o)).contains("header says 1514"));
        let mut g = f.clone();
        g[700] ^= 1;
        assert!(bad(parse_frame(&g, DIR_RX, 3, o)).contains("byte 698"));
        // Another salt (another seed) is damage; another nonce (another run) is foreign.
        assert!(matches!(
            parse_frame(&f, DIR_RX, 3, Origin { salt: 10, nonce: 5 }),
            Parsed::Bad(_)
        ));
        assert_eq!(
            parse_frame(&f, DIR_RX, 3, Origin { salt: 9, nonce: 6 }),
            Parsed::Foreign
        );
        assert!(matches!(
            parse_frame(&f[..10], DIR_RX, 3, o),
            Parsed::Bad(_)
        ));
        assert_eq!(pair_path(Path::new("/x/p"), 2), PathBuf::from("/x/p.2"));
        assert_eq!(pair_path(Path::new("/x/p"), 0), PathBuf::from("/x/p"));
        assert_ne!(Origin::new(1).nonce, 0);
    }
}
