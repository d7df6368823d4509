//! The accept loop of the `vhost-dirtylog-blk` program: one frontend at a time, forever.
//!
//! vhost-user-backend's `VhostUserDaemon` serves exactly one connection and its worker threads
//! belong to that connection, so [`BlkServer`] builds a fresh device, dirty-log adapter, guest
//! memory and daemon for every frontend, runs it to the disconnect, flushes the disk, tears the
//! threads down (dropping the daemon joins them) and accepts the next one. The disk stays open
//! across connections, so a frontend that reconnects (QEMU after a restart, or the migration
//! destination) sees the same data.
//!
//! Worker threads exist only while a frontend is connected: the server waits for the listener
//! to become readable before it builds the device (and vhost-user-backend its one thread per
//! queue), and re-reads the disk's size at that moment, so a disk grown while no frontend was
//! connected is offered at its new size to the next one ([`Disk::refresh_capacity`]).
//! While a frontend is served, further connections are accepted and closed with a log line
//! ([`refusing_others`](crate::daemon::socket::refusing_others), with the `daemon` feature).
//!
//! ## The negative-control switch (`test-drop-marks`)
//! Built with the cargo feature `test-drop-marks` *and* run with
//! `VHOST_DIRTYLOG_TEST_DROP_MARKS=1`, the daemon suppresses its log handle
//! ([`DirtyLog::suppress_logging_for_tests`](crate::log::DirtyLog)): it still advertises and
//! acknowledges LOG_ALL (so QEMU allows the migration) but never turns logging on, so nothing is
//! ever marked. The end-to-end migration test
//! uses it to prove it detects lost pages. Without the feature the variable is ignored and the
//! code does not exist.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::serve::{drop_marks_requested, wait_readable, wait_refusing_others};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::disk::{Disk, DiskError};
use super::{BlkConfig, BlkDevice, ConfigError, QueueStats};

/// Everything the daemon needs to know.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Disk image file or block device.
    pub image: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Use `O_DIRECT` for data transfers.
    pub direct: bool,
    /// Device settings.
    pub config: BlkConfig,
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// vhost-user-backend failed outside a connection (creating threads, accepting).
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// Serves one disk to successive frontends.
#[derive(Debug)]
pub struct BlkServer {
    disk: Arc<Disk>,
    config: BlkConfig,
    /// The device of the connected frontend, if any (for statistics).
    current: Mutex<Option<BlkDevice>>,
    /// Counters summed over finished connections, per queue.
    totals: Mutex<Vec<QueueStats>>,
    /// Frontends served so far (including the connected one).
    connections: std::sync::atomic::AtomicU64,
    #[cfg_attr(not(feature = "test-drop-marks"), allow(dead_code))]
    drop_marks: bool,
}

impl BlkServer {
    /// Opens the disk and checks the settings.
    pub fn new(opts: &BlkOptions) -> Result<Self, ServeError> {
        opts.config.validate()?;
        let disk = Disk::open(&opts.image, opts.read_only, opts.direct)?;
        log::info!(
            "serving {} ({} sectors, {}{}), {} queue(s) of up to {} entries",
            opts.image.display(),
            disk.capacity(),
            if opts.read_only {
                "read-only"
            } else {
                "read-write"
            },
            if opts.direct { ", O_DIRECT" } else { "" },
            opts.config.num_queues,
            opts.config.queue_size
        );
        Ok(BlkServer {
            disk: Arc::new(disk),
            config: opts.config.clone(),
            current: Mutex::new(None),
            totals: Mutex::new(vec![
                QueueStats::default();
                usize::from(opts.config.num_queues)
            ]),
            connections: 0.into(),
            drop_marks: drop_marks_requested(),
        })
    }

    /// The disk being served.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Accepts one frontend on `listener` and serves it until it disconnects.
    ///
    /// A protocol error ends the connection (logged), not the server: `Ok` is returned either
    /// way; `Err` means the server itself cannot go on (threads, the listener).
    pub fn serve_one(&self, listener: &mut Listener) -> Result<(), ServeError> {
        wait_readable(listener)
            .map_err(|e| ServeError::Daemon(format!("waiting for a frontend: {e}")))?;
        match self.disk.refresh_capacity() {
            Ok((old, new)) if old != new => log::info!(
                "disk size changed from {old} to {new} sectors; offering {new} to this frontend"
            ),
            Ok((_, new)) => log::debug!("a frontend is waiting; the disk has {new} sectors"),
            Err(e) => log::warn!("cannot re-read the disk size, keeping the old one: {e}"),
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkDevice::into_backend(self.disk.clone(), self.config.clone(), mem.clone())?;
        let device = backend.inner().clone();
        #[cfg(feature = "test-drop-marks")]
        if self.drop_marks {
            backend.log().suppress_logging_for_tests();
        }
        let mut daemon = VhostUserDaemon::new("vhost-dirtylog-blk".to_string(), backend, mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        if let Err(e) = device.attach(&daemon) {
            log::warn!("cannot attach the io_uring dataplane ({e}); serving synchronously");
        }
        daemon
            .start(listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        log::info!("frontend connected");
        self.connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(device.clone());
        let ended = wait_refusing_others(listener, || daemon.wait());
        match ended {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("connection ended: {e}"),
        }
        // The workers finish the requests still in the disk (the frontend is gone, but the
        // memory, rings and log are still mapped) before they are stopped: each queue's
        // io_uring can only be completed by its worker, and a request given up on could land
        // in guest memory unmarked later. As QEMU's drain, this waits as long as the disk takes.
        // (What `wait_idle` waits for: requests in the io_uring engines.)
        let in_disk: usize = (0..usize::from(self.config.num_queues))
            .map(|q| device.in_flight(q))
            .sum();
        if in_disk > 0 {
            log::info!("waiting for {in_disk} request(s) still in the disk");
            let mut waited = 0;
            while !device.wait_idle(std::time::Duration::from_secs(5)) {
                waited += 5;
                log::warn!("requests still in the disk {waited} s after the disconnect");
            }
        }
        // Dropping the daemon signals the worker threads and joins them.
        drop(daemon);
        device.reclaim_exit_fds();
        {
            let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
            for (i, t) in totals.iter_mut().enumerate() {
                if let Some(q) = device.queue_stats(i) {
                    t.add(&q);
                }
            }
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        if let Err(e) = self.disk.flush() {
            log::warn!("flush after disconnect failed: {e}");
        }
        Ok(())
    }

    /// A human-readable statistics report: per queue, the connected frontend's counters and the
    /// totals over all connections; then the dirty log's out-of-range counters.
    ///
    /// Columns: `requests` completed, `errors`, `bytes` of data moved, `in-flight` requests (of
    /// the connected frontend, at the moment of the report), `pages-marked` (guest pages the
    /// queue wrote with dirty logging on).
    pub fn stats_report(&self) -> String {
        use std::fmt::Write;
        let current = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let totals = self
            .totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "statistics: {} frontend(s) served, {}; disk {} sectors",
            self.connections.load(std::sync::atomic::Ordering::Relaxed),
            if current.is_some() {
                "one connected"
            } else {
                "none connected"
            },
            self.disk.capacity()
        );
        let _ = writeln!(
            out,
            "{:>5} {:>12} {:>8} {:>16} {:>9} {:>13}   (connected frontend / all connections)",
            "queue", "requests", "errors", "bytes", "in-flight", "pages-marked"
        );
        for (i, total) in totals.iter().enumerate() {
            let now = current.as_ref().and_then(|d| d.queue_stats(i));
            let in_flight = current
                .as_ref()
                .and_then(|d| d.queue_in_flight(i))
                .unwrap_or(0);
            let mut all = *total;
            if let Some(n) = &now {
                all.add(n);
            }
            let n = now.unwrap_or_default();
            let _ = writeln!(
                out,
                "{i:>5} {:>12} {:>8} {:>16} {in_flight:>9} {:>13}   now",
                n.completed, n.errors, n.bytes, n.pages_marked
            );
            let _ = writeln!(
                out,
                "{:>5} {:>12} {:>8} {:>16} {:>9} {:>13}   total",
                "", all.completed, all.errors, all.bytes, "", all.pages_marked
            );
        }
        if let Some(d) = &current {
            let l = d.dirty_log().stats();
            let _ =
                writeln!(
                out,
                "dirty log (connected frontend): logging {}, out-of-range marks {} ({} pages), \
                 marks without a log {}",
                if d.dirty_log().is_logging() { "on" } else { "off" },
                l.out_of_range_marks,
                l.out_of_range_pages,
                l.marks_without_log
            );
        }
        out
    }

    /// Serves frontends one after the other, forever (until an unrecoverable error).
    pub fn serve(&self, mut listener: Listener) -> Result<(), ServeError> {
        loop {
            self.serve_one(&mut listener)?;
        }
    }
}
