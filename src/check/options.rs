//! What a run is asked to do: the workload, the faults, and [`CheckOptions`] with its
//! defaults and validation.
//!
//! Names are parsed with [`FromStr`] (errors list the valid names), so any front end — the
//! `vhost-dirtylog-check` command line, a test, a config file — reads them the same way.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::error::CheckError;
use super::layout::default_layout;
use crate::driver::RegionSpec;

/// The guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Reads only: the device writes guest memory with every request.
    Read,
    /// Writes only: the device writes only status bytes and the used ring.
    Write,
    /// Half reads, half writes; reads check the data the writes put on disk.
    Mixed,
}

impl Workload {
    /// Every workload, in the order the command line lists them.
    pub const ALL: [Workload; 3] = [Workload::Read, Workload::Write, Workload::Mixed];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Mixed => "mixed",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;

    /// Parses a command-line name (`read`, `write`, `mixed`).
    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s.trim())
            .ok_or_else(|| format!("unknown workload {s:?} (read, write, mixed)"))
    }
}

/// A fault injected during the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// A bigger log replaces the current one (`SET_LOG_BASE`); the old one is drained after
    /// the backend's reply.
    LogResize,
    /// A region is hot-added (`ADD_MEM_REG`, or `SET_MEM_TABLE` without
    /// `CONFIGURE_MEM_SLOTS`) and used by later requests, an unused one is removed
    /// (`REM_MEM_REG`), and the whole table is re-sent.
    MemTable,
    /// `LOG_ALL` is turned off for a while and on again; the VMM then marks all RAM dirty.
    LogToggle,
    /// The frontend stops every ring, disconnects, reconnects, sets everything up again
    /// (same log, `LOG_ALL` on) and resumes the rings from the `GET_VRING_BASE` index.
    Reconnect,
    /// A `SET_VRING_ADDR` storm: from the time it is due until the final stop, after every
    /// round the VMM re-sends the *same* ring addresses of every running ring
    /// ([`CheckOptions::storm_burst`] times each; flags `VHOST_VRING_F_LOG` while `LOG_ALL` is
    /// on, else 0), as QEMU does for every ring at every migration start, cancel and
    /// completion (issue 13 item 1: a handler that re-reads the used index from guest memory
    /// can wind a running ring back).
    VringAddr,
}

impl Fault {
    /// Every fault, in the order `all` runs them.
    pub const ALL: [Fault; 5] = [
        Fault::LogResize,
        Fault::MemTable,
        Fault::LogToggle,
        Fault::Reconnect,
        Fault::VringAddr,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::LogResize => "log-resize",
            Fault::MemTable => "mem-table",
            Fault::LogToggle => "log-toggle",
            Fault::Reconnect => "reconnect",
            Fault::VringAddr => "vring-addr",
        }
    }

    /// Parses a comma-separated list of fault names, `all` or `none`; a fault named twice runs
    /// once, at its first place.
    pub fn parse_list(s: &str) -> Result<Vec<Fault>, String> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "none" => {}
                "all" => out.extend(Fault::ALL),
                _ => match name.parse() {
                    Ok(f) => out.push(f),
                    Err(_) => {
                        return Err(format!(
                            "unknown fault {name:?} (log-resize, mem-table, log-toggle, reconnect, vring-addr, all, none)"
                        ))
                    }
                },
            }
        }
        let mut seen = Vec::new();
        out.retain(|f| {
            let new = !seen.contains(f);
            seen.push(*f);
            new
        });
        Ok(out)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;

    /// Parses one fault name (`log-resize`, `mem-table`, `log-toggle`, `reconnect`,
    /// `vring-addr`); lists
    /// with `all` and `none` are [`Fault::parse_list`]'s.
    fn from_str(s: &str) -> Result<Self, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown fault {s:?} (log-resize, mem-table, log-toggle, reconnect, vring-addr)"
                )
            })
    }
}

/// How the VMM side reads the backend's log each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// One log for the whole migration, consumed word by word with atomic swaps
    /// ([`MigrationBitmap::sync_from_log`](crate::vmm::MigrationBitmap::sync_from_log); QEMU's
    /// `vhost_dev_sync_region`).
    Swap,
    /// Two logs handed to the backend in turn with `SET_LOG_BASE` every round; the retired one
    /// is merged with plain loads once the reply is in ([`LogFlip`](crate::vmm::LogFlip);
    /// cloud-hypervisor's way).
    Flip,
}

impl SyncMode {
    /// Both modes, in the order the command line lists them.
    pub const ALL: [SyncMode; 2] = [SyncMode::Swap, SyncMode::Flip];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Swap => "swap",
            SyncMode::Flip => "flip",
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SyncMode {
    type Err = String;

    /// Parses `swap` or `flip`.
    fn from_str(s: &str) -> Result<Self, String> {
        SyncMode::ALL
            .into_iter()
            .find(|m| m.name() == s.trim())
            .ok_or_else(|| format!("unknown sync mode {s:?} (swap, flip)"))
    }
}

/// Whose way of migrating the VMM side plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmmStyle {
    /// QEMU's: the rings are stopped with `GET_VRING_BASE` (`vhost_virtqueue_stop`), then the
    /// log is synced a last time.
    Qemu,
    /// cloud-hypervisor's: flip sync every round; the final stop is `SET_VRING_ENABLE(0)` on
    /// each ring followed by one more log flip (`SET_LOG_BASE` with a fresh log), the retired
    /// log merged and the new one never read. (`GET_VRING_BASE` is sent afterwards only to
    /// learn how many requests the backend had taken; the migration is over by then.)
    Ch,
}

impl VmmStyle {
    /// Both styles, in the order the command line lists them.
    pub const ALL: [VmmStyle; 2] = [VmmStyle::Qemu, VmmStyle::Ch];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            VmmStyle::Qemu => "qemu",
            VmmStyle::Ch => "ch",
        }
    }
}

impl fmt::Display for VmmStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for VmmStyle {
    type Err = String;

    /// Parses `qemu` or `ch`.
    fn from_str(s: &str) -> Result<Self, String> {
        VmmStyle::ALL
            .into_iter()
            .find(|m| m.name() == s.trim())
            .ok_or_else(|| format!("unknown VMM style {s:?} (qemu, ch)"))
    }
}

/// The kind of device the checker drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Device {
    /// virtio-blk (virtio spec 5.2): random reads (and writes) against a disk pattern.
    Blk,
    /// virtio-net (virtio spec 5.1): queue pairs, mergeable RX buffers, TX frames.
    Net,
}

impl Device {
    /// Both devices, in the order the command line lists them.
    pub const ALL: [Device; 2] = [Device::Blk, Device::Net];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Device::Blk => "blk",
            Device::Net => "net",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Device {
    type Err = String;

    /// Parses `blk` or `net`.
    fn from_str(s: &str) -> Result<Self, String> {
        Device::ALL
            .into_iter()
            .find(|d| d.name() == s.trim())
            .ok_or_else(|| format!("unknown device {s:?} (blk, net)"))
    }
}

/// Where the frames a net backend delivers into the guest come from (`--traffic`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Traffic {
    /// The backend makes its own traffic (e.g. `dpdk-testpmd --forward-mode=txonly`): the
    /// checker injects nothing, sends no TX frames, and does not check frame contents.
    None,
    /// The backend's unix datagram socket port (one Ethernet frame per datagram, no virtio-net
    /// header; `vhost-dirtylog-net --socket-port PATH`, QEMU's `-netdev dgram` framing): the
    /// checker sends frames to `PATH` (pair `k > 0`: `PATH.k`) from a socket of its own, where
    /// the backend's TX frames arrive and are counted.
    Socket(PathBuf),
    /// A TAP interface the backend serves (`vhost-dirtylog-net --tap NAME`, QEMU's tap
    /// netdev, DPDK's `net_tap`): frames are injected with an `AF_PACKET` socket bound to it,
    /// inside network namespace `netns` (a name under `/var/run/netns`, as `ip netns` makes
    /// them, or a path such as `/proc/PID/ns/net`) if given; the interface is set up if it is
    /// down. The guest's TX frames are counted as they come out of the interface.
    Tap {
        /// The interface name.
        name: String,
        /// The network namespace it lives in (`None`: the checker's own).
        netns: Option<String>,
    },
}

impl Traffic {
    /// Parses `none`, `socket:PATH` or `tap:NAME[@NETNS]`.
    pub fn parse(s: &str) -> Result<Traffic, String> {
        let s = s.trim();
        if s == "none" {
            return Ok(Traffic::None);
        }
        if let Some(p) = s.strip_prefix("socket:") {
            if p.is_empty() {
                return Err("--traffic socket:PATH needs a path".into());
            }
            return Ok(Traffic::Socket(PathBuf::from(p)));
        }
        if let Some(t) = s.strip_prefix("tap:") {
            let (name, netns) = match t.split_once('@') {
                Some((n, ns)) => (n, Some(ns.to_string())),
                None => (t, None),
            };
            if name.is_empty() || name.len() >= 16 || netns.as_deref() == Some("") {
                return Err(format!(
                    "--traffic {s:?}: expected tap:NAME or tap:NAME@NETNS (NAME at most 15 bytes)"
                ));
            }
            return Ok(Traffic::Tap {
                name: name.to_string(),
                netns,
            });
        }
        Err(format!(
            "unknown traffic source {s:?} (socket:PATH, tap:NAME[@NETNS], none)"
        ))
    }
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Traffic::None => f.write_str("none"),
            Traffic::Socket(p) => write!(f, "socket:{}", p.display()),
            Traffic::Tap { name, netns: None } => write!(f, "tap:{name}"),
            Traffic::Tap {
                name,
                netns: Some(ns),
            } => write!(f, "tap:{name}@{ns}"),
        }
    }
}

/// The net workload's settings ([`CheckOptions::net`]; used with [`Device::Net`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NetOptions {
    /// The traffic source.
    pub traffic: Traffic,
    /// Smallest frame in bytes (Ethernet header and payload, no virtio-net header).
    pub frame_min: u32,
    /// Largest frame in bytes.
    pub frame_max: u32,
    /// Bytes per RX buffer (one descriptor each, posted as mergeable RX buffers, virtio spec
    /// 5.1.6.3.1): frames longer than this minus the 12-byte header span several buffers.
    pub rx_buf: u32,
    /// Frames per second injected per queue pair (and sent through each TX queue); 0: as
    /// fast as the port takes them.
    pub rate: u64,
    /// The guest sends TX frames (default on when the checker injects traffic).
    pub tx: bool,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            traffic: Traffic::None,
            frame_min: 60,
            frame_max: 1514,
            rx_buf: 1024,
            rate: 20_000,
            tx: true,
        }
    }
}

/// Parses a frame size range `MIN..MAX` (or one size `N`), in bytes.
pub fn parse_frame_range(s: &str) -> Result<(u32, u32), String> {
    let s = s.trim();
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let p = |x: &str| {
        x.trim().parse::<u32>().map_err(|_| {
            format!("invalid frame size range {s:?}: expected MIN..MAX, e.g. 60..1514")
        })
    };
    let (a, b) = (p(a)?, p(b)?);
    if a > b {
        return Err(format!("frame size range {s:?}: MIN is larger than MAX"));
    }
    Ok((a, b))
}

/// Everything a check run needs; [`CheckOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// The device type the backend serves.
    pub device: Device,
    /// The net workload (with [`Device::Net`]).
    pub net: NetOptions,
    /// Guest RAM regions (sorted or not; must not overlap). The first holds the rings.
    pub layout: Vec<RegionSpec>,
    /// Queues to drive (net: queue pairs); `None`: up to 2, as many as the backend has.
    pub queues: Option<u16>,
    /// Entries per queue.
    pub queue_size: u16,
    /// Requests in flight per queue (lowered if the queue cannot hold them).
    pub depth: u16,
    /// Place each used ring so its `avail_event` field starts a page of its own (split rings
    /// need only 4-byte alignment). A backend that writes `avail_event` without logging it is
    /// then caught whenever that write is the page's last; with the used ring page-aligned the
    /// logged used-index update on the same page usually hides it.
    pub isolate_avail_event: bool,
    /// The workload.
    pub workload: Workload,
    /// Smallest request in bytes (a multiple of 4 KiB).
    pub min_io: u64,
    /// Largest request in bytes (a multiple of 4 KiB).
    pub max_io: u64,
    /// Pre-copy rounds after round 0; `None`: run for [`duration`](Self::duration).
    pub rounds: Option<u64>,
    /// How long the migration runs (when `rounds` is `None`).
    pub duration: Duration,
    /// Time between the starts of two rounds.
    pub round_interval: Duration,
    /// Deferred clearing (`fetch_log` + per-chunk `clear_pages`) instead of `sync_from_log`.
    pub deferred: bool,
    /// Chunk size, in pages, for deferred clearing.
    pub clear_chunk: u64,
    /// Faults to inject, spread evenly over the run.
    pub faults: Vec<Fault>,
    /// Fill the disk with the pattern first: `None` = when the device is writable.
    pub prepare: Option<bool>,
    /// Disk bytes to use, from offset 0 (capped at the capacity).
    pub disk_span: u64,
    /// Seed of the pattern salt and the random workload.
    pub seed: u64,
    /// Bound on every wait for the backend.
    pub timeout: Duration,
    /// Time between the final sync and the comparison, to catch writes after the stop.
    pub settle: Duration,
    /// Write a progress line to stderr.
    pub progress: bool,
    /// Negotiate `VHOST_USER_PROTOCOL_F_REPLY_ACK` if the backend offers it. Without it, no
    /// message except the few with replies (`GET_*`, `SET_LOG_BASE`) waits for the backend,
    /// and the checker relies on [`barrier`](Self::barrier)s.
    pub reply_ack: bool,
    /// After unacknowledged messages that change logging or memory (`SET_FEATURES` with or
    /// without `LOG_ALL`, `SET_VRING_ADDR`, `SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`,
    /// `SET_VRING_ENABLE`), wait for a `GET_FEATURES` round trip before relying on them (as
    /// QEMU's `vhost_user_set_features` / `vhost_user_set_vring_addr` have done since 2021).
    /// Default on; off only reproduces issue 13 item 4 (a correct backend blamed for the race).
    pub barrier: bool,
    /// A queue with requests in flight and no completion for this long fails the run
    /// ([`CheckError::Protocol`], naming the queue and the count). Far below
    /// [`timeout`](Self::timeout), so a hang inside a short run is not missed.
    pub stall_timeout: Duration,
    /// How the log is read each round; `None`: [`SyncMode::Flip`] in [`VmmStyle::Ch`], else
    /// [`SyncMode::Swap`].
    pub sync: Option<SyncMode>,
    /// Whose way of migrating to play.
    pub vmm_style: VmmStyle,
    /// `SET_VRING_ADDR` messages per running ring after every round of a
    /// [`Fault::VringAddr`] storm.
    pub storm_burst: u32,
}

impl CheckOptions {
    /// Defaults for the backend at `socket`: 64 MiB of RAM in 3 regions with holes, up to 2
    /// queues of 256 entries, 32 requests in flight each, random reads of 4 KiB..128 KiB, 3
    /// seconds of pre-copy rounds every 50 ms, no fault.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        CheckOptions {
            socket: socket.into(),
            device: Device::Blk,
            net: NetOptions::default(),
            layout: default_layout(64 << 20, 3).unwrap_or_default(),
            queues: None,
            queue_size: 256,
            depth: 32,
            isolate_avail_event: true,
            workload: Workload::Read,
            min_io: 4 << 10,
            max_io: 128 << 10,
            rounds: None,
            duration: Duration::from_secs(3),
            round_interval: Duration::from_millis(50),
            deferred: false,
            clear_chunk: 512,
            faults: Vec::new(),
            prepare: None,
            disk_span: 64 << 20,
            seed: 1,
            timeout: Duration::from_secs(10),
            settle: Duration::from_millis(200),
            progress: false,
            reply_ack: true,
            barrier: true,
            stall_timeout: Duration::from_secs(2),
            sync: None,
            vmm_style: VmmStyle::Qemu,
            storm_burst: 32,
        }
    }

    /// The sync mode in effect (see [`sync`](Self::sync)).
    pub fn sync_mode(&self) -> SyncMode {
        self.sync.unwrap_or(match self.vmm_style {
            VmmStyle::Qemu => SyncMode::Swap,
            VmmStyle::Ch => SyncMode::Flip,
        })
    }

    /// Checks what can be checked without the backend.
    pub(super) fn validate(&self) -> Result<(), CheckError> {
        let bad = |m: &str| Err(CheckError::Invalid(m.to_string()));
        if self.min_io < 4096
            || !self.min_io.is_multiple_of(4096)
            || !self.max_io.is_multiple_of(4096)
        {
            return bad("--min-io and --max-io must be multiples of 4 KiB");
        }
        if self.min_io > self.max_io {
            return bad("--min-io is larger than --max-io");
        }
        if self.max_io > 4 << 20 {
            return bad("--max-io is at most 4 MiB");
        }
        if self.depth == 0 {
            return bad("--depth must be at least 1");
        }
        if self.queues == Some(0) {
            return bad("--queues must be at least 1");
        }
        if self.clear_chunk == 0 {
            return bad("--clear-chunk must be at least 1 page");
        }
        if self.round_interval.is_zero() {
            return bad("--round-interval must be positive");
        }
        if self.timeout.is_zero() {
            return bad("--timeout must be positive");
        }
        if self.layout.is_empty() {
            return bad("no guest memory regions");
        }
        if self.stall_timeout.is_zero() {
            return bad("--stall-timeout must be positive");
        }
        if self.vmm_style == VmmStyle::Ch && self.sync_mode() != SyncMode::Flip {
            return bad("--vmm-style ch flips the log every round: it needs --sync flip");
        }
        if self.deferred && self.sync_mode() == SyncMode::Flip {
            return bad("--deferred clears the log it fetched: it works with --sync swap only");
        }
        if self.device == Device::Net {
            let n = &self.net;
            if n.frame_min < 60 || n.frame_max > 9216 || n.frame_min > n.frame_max {
                return bad("--frame-size must lie within 60..9216 bytes, MIN <= MAX");
            }
            if n.rx_buf < 64 || n.rx_buf > 8192 || !n.rx_buf.is_multiple_of(8) {
                return bad("--rx-buf-size must be a multiple of 8 in 64..8192 bytes");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::error::{EXIT_UNSUPPORTED, EXIT_USAGE};
    use super::*;

    #[test]
    fn fault_lists() {
        assert_eq!(Fault::parse_list("none"), Ok(vec![]));
        assert_eq!(Fault::parse_list("all").unwrap(), Fault::ALL.to_vec());
        assert_eq!(
            Fault::parse_list("reconnect,log-resize,reconnect"),
            Ok(vec![Fault::Reconnect, Fault::LogResize])
        );
        assert!(Fault::parse_list("crash").is_err());
    }

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
            assert_eq!(f.to_string(), f.name());
        }
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
            assert_eq!(w.to_string(), w.name());
        }
        let e = "all".parse::<Fault>().unwrap_err();
        assert!(e.contains("reconnect"), "{e}");
        for m in SyncMode::ALL {
            assert_eq!(m.name().parse::<SyncMode>(), Ok(m));
        }
        for v in VmmStyle::ALL {
            assert_eq!(v.name().parse::<VmmStyle>(), Ok(v));
        }
        assert!("qemu"
            .parse::<SyncMode>()
            .unwrap_err()
            .contains("swap, flip"));
        assert!("kvm".parse::<VmmStyle>().unwrap_err().contains("qemu, ch"));
        assert!(Fault::parse_list("vring-addr").unwrap() == [Fault::VringAddr]);
        let e = "random".parse::<Workload>().unwrap_err();
        assert!(e.contains("read, write, mixed"), "{e}");
    }

    #[test]
    fn option_validation() {
        let o = CheckOptions::new("/x");
        assert!(o.validate().is_ok());
        assert_eq!(o.layout.len(), 3);
        let mut b = o.clone();
        b.min_io = 1000;
        assert!(matches!(b.validate(), Err(CheckError::Invalid(_))));
        let mut b = o.clone();
        b.min_io = 8192;
        b.max_io = 4096;
        assert!(b.validate().is_err());
        let mut b = o.clone();
        b.vmm_style = VmmStyle::Ch;
        assert_eq!(b.sync_mode(), SyncMode::Flip);
        assert!(b.validate().is_ok());
        b.sync = Some(SyncMode::Swap);
        assert!(b.validate().is_err());
        let mut b = o.clone();
        b.sync = Some(SyncMode::Flip);
        b.deferred = true;
        assert!(b.validate().is_err());
        let mut b = o;
        b.depth = 0;
        assert_eq!(b.validate().unwrap_err().exit_code(), EXIT_USAGE);
        assert_eq!(
            CheckError::Unsupported("x".into()).exit_code(),
            EXIT_UNSUPPORTED
        );
    }
}
