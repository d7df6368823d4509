//! `vhost-dirtylog-check`: drive **any** vhost-user-blk backend through a simulated live
//! migration and report every guest page it wrote without marking it in the dirty log.
//!
//! A live migration is only as good as the dirty log: a page the backend writes and does not
//! mark is never re-sent, and the guest resumes on the destination with stale memory — no
//! error, just corruption. Unit tests of a log implementation cannot show that a *backend*
//! gets it right end to end (every data path, the used ring, status bytes, log replacement,
//! memory-table changes, `LOG_ALL` toggling, `GET_VRING_BASE`), and a QEMU + KVM migration is
//! heavy and hides the cause. This module plays both the VMM and the guest against a backend's
//! socket and compares, byte for byte, the memory a destination would have received with the
//! memory the source ended up with.
//!
//! ## What a run does
//! 1. **Guest memory and rings.** memfd RAM in several regions with holes
//!    ([`CheckOptions::layout`]), handed over with `SET_MEM_TABLE`; `N` virtqueues started,
//!    each used ring placed so that its `avail_event` field starts a page of its own
//!    ([`CheckOptions::isolate_avail_event`]): a backend that forgets to log that one field is
//!    caught instead of hiding behind the logged used-index update on the same page.
//!    Features are negotiated as a VMM would; a backend that offers no `VHOST_F_LOG_ALL` or no
//!    `VHOST_USER_PROTOCOL_F_LOG_SHMFD` cannot be migrated at all, which is reported as such
//!    ([`CheckError::Unsupported`], exit status 3).
//! 2. **A known disk.** The disk (the first [`CheckOptions::disk_span`] bytes) is filled through
//!    the backend with a pattern where every 8-byte word encodes its disk offset and a block
//!    generation ([`pattern`]), so data in the wrong place or a stale page is recognisable.
//! 3. **A guest workload.** One thread per queue keeps many requests in flight: random disk
//!    offsets, random sizes (4 KiB..128 KiB), split over several descriptors placed in random
//!    buffers across all regions, so each request lands different data in different pages.
//!    Every completed read is checked against the pattern (a *device* bug, reported apart
//!    from logging bugs).
//! 4. **Pre-copy.** The checker hands over a [`SharedLog`](crate::vmm::SharedLog), turns
//!    `LOG_ALL` on (and re-sends the ring addresses, as QEMU does), copies all RAM into a
//!    destination buffer (round 0), then every round merges the backend's log into a
//!    [`MigrationBitmap`](crate::vmm::MigrationBitmap) and copies the dirty pages, each taken
//!    from the bitmap *before* it is copied (DESIGN.md invariant 2). `--deferred` uses
//!    `fetch_log` and per-chunk clears instead of `sync_from_log`.
//! 5. **Faults** ([`Fault`]) injected mid-run: a bigger log replacing the current one, memory
//!    hot-add / hot-remove / a full `SET_MEM_TABLE`, `LOG_ALL` off and on, and a frontend
//!    reconnect that resumes the rings from `GET_VRING_BASE`.
//! 6. **Stop and compare.** Every ring is stopped with `GET_VRING_BASE`, the logs are merged a
//!    last time and the dirty pages copied; after a settle time the destination is compared
//!    with the source. Every differing page is a **lost page**.
//!
//! ## Why the guest's own writes do not count against the backend
//! The in-process guest driver writes guest memory too (descriptors, ring indices, request
//! headers, data to be written). In a real VM the hypervisor's dirty log tracks those, not the
//! vhost-user log. The checker emulates that log ([`GuestRam::track_writes`]) and merges it
//! each round like a VMM merges KVM's, so a lost page can only be a write the backend made
//! without marking it (or made after it was stopped).
//!
//! [`GuestRam::track_writes`]: crate::driver::GuestRam::track_writes
//!
//! ## Exit status
//! [`EXIT_OK`] (0), [`EXIT_LOST`] (1, lost pages), [`EXIT_PROTOCOL`] (2, the backend broke the
//! protocol or the run could not complete), [`EXIT_UNSUPPORTED`] (3, no dirty logging),
//! [`EXIT_DATA`] (4, no lost page but reads returned wrong data), [`EXIT_USAGE`] (64).
//!
//! ```no_run
//! use vhost_dirtylog::check::{self, CheckOptions, Fault};
//!
//! let opts = CheckOptions {
//!     faults: vec![Fault::LogResize, Fault::Reconnect],
//!     ..CheckOptions::new("/tmp/blk.sock")
//! };
//! let report = check::run(&opts)?;
//! println!("{}", report.summary());
//! assert_eq!(report.lost_pages, 0);
//! # Ok::<(), check::CheckError>(())
//! ```

mod bench;
mod dest;
pub mod pattern;
mod plan;
mod report;
mod session;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

pub use bench::{bench, BenchOptions, BenchPhase, BenchReport};
pub use dest::VmmStats;
pub use plan::{default_layout, parse_duration, parse_layout, parse_size};
pub use report::{group, BackendInfo, FaultRecord, LostPage, Report, StopStats};
pub use session::run;

use crate::driver::{DriverError, RegionSpec};

/// Exit status: no lost page, no bad data.
pub const EXIT_OK: i32 = 0;
/// Exit status: at least one lost page.
pub const EXIT_LOST: i32 = 1;
/// Exit status: protocol error, backend failure, or the run could not complete.
pub const EXIT_PROTOCOL: i32 = 2;
/// Exit status: the backend does not support dirty logging.
pub const EXIT_UNSUPPORTED: i32 = 3;
/// Exit status: no lost page, but the device returned wrong data or I/O errors.
pub const EXIT_DATA: i32 = 4;
/// Exit status: invalid options.
pub const EXIT_USAGE: i32 = 64;

/// The guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
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
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Mixed => "mixed",
        }
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
}

impl Fault {
    /// Every fault, in the order `all` runs them.
    pub const ALL: [Fault; 4] = [
        Fault::LogResize,
        Fault::MemTable,
        Fault::LogToggle,
        Fault::Reconnect,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::LogResize => "log-resize",
            Fault::MemTable => "mem-table",
            Fault::LogToggle => "log-toggle",
            Fault::Reconnect => "reconnect",
        }
    }

    /// Parses a comma-separated list of fault names, `all` or `none`.
    pub fn parse_list(s: &str) -> Result<Vec<Fault>, String> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "none" => {}
                "all" => out.extend(Fault::ALL),
                _ => match Fault::ALL.iter().find(|f| f.name() == name) {
                    Some(f) => out.push(*f),
                    None => {
                        return Err(format!(
                            "unknown fault {name:?} (log-resize, mem-table, log-toggle, reconnect, all, none)"
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

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a check run needs; [`CheckOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Guest RAM regions (sorted or not; must not overlap). The first holds the rings.
    pub layout: Vec<RegionSpec>,
    /// Queues to drive; `None`: up to 2, as many as the backend has.
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
    /// Smallest request (a multiple of 4 KiB).
    pub min_io: u64,
    /// Largest request (a multiple of 4 KiB).
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
}

impl CheckOptions {
    /// Defaults for the backend at `socket`: 64 MiB of RAM in 3 regions with holes, up to 2
    /// queues of 256 entries, 32 requests in flight each, random reads of 4 KiB..128 KiB, 3
    /// seconds of pre-copy rounds every 50 ms, no fault.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        CheckOptions {
            socket: socket.into(),
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
        }
    }

    pub(crate) fn validate(&self) -> Result<(), CheckError> {
        let bad = |m: &str| Err(CheckError::Invalid(m.to_string()));
        if self.min_io < 4096 || self.min_io % 4096 != 0 || self.max_io % 4096 != 0 {
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
        Ok(())
    }
}

/// Why a run could not produce a verdict.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The backend cannot be migrated at all (no `VHOST_F_LOG_ALL` / `LOG_SHMFD`).
    #[error("backend does not support dirty logging: migration impossible ({0})")]
    Unsupported(String),
    /// The backend broke the protocol, failed a request, stalled, or went away.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local failure (memory, file descriptors).
    #[error("{0}")]
    Setup(String),
    /// The options cannot work (with this backend).
    #[error("invalid options: {0}")]
    Invalid(String),
}

impl CheckError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CheckError::Unsupported(_) => EXIT_UNSUPPORTED,
            CheckError::Protocol(_) | CheckError::Setup(_) => EXIT_PROTOCOL,
            CheckError::Invalid(_) => EXIT_USAGE,
        }
    }
}

impl From<DriverError> for CheckError {
    fn from(e: DriverError) -> Self {
        CheckError::Protocol(e.to_string())
    }
}

#[cfg(test)]
mod tests {
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
        let mut b = o;
        b.depth = 0;
        assert_eq!(b.validate().unwrap_err().exit_code(), EXIT_USAGE);
        assert_eq!(
            CheckError::Unsupported("x".into()).exit_code(),
            EXIT_UNSUPPORTED
        );
    }
}
