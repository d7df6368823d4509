//! The accept loop of the `vhost-dirtylog-blk` program: one frontend at a time, forever.
//!
//! vhost-user-backend's `VhostUserDaemon` serves exactly one connection and its worker threads
//! belong to that connection, so [`BlkServer`] builds a fresh device, dirty-log adapter, guest
//! memory and daemon for every frontend, runs it to the disconnect, flushes the disk, tears the
//! threads down (dropping the daemon joins them) and accepts the next one. The disk stays open
//! across connections, so a frontend that reconnects (QEMU after a restart, or the migration
//! destination) sees the same data.
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
use std::sync::Arc;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::disk::{Disk, DiskError};
use super::{BlkConfig, BlkDevice, ConfigError};

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
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("connection ended: {e}"),
        }
        // Dropping the daemon signals the worker threads and joins them.
        drop(daemon);
        device.reclaim_exit_fds();
        if let Err(e) = self.disk.flush() {
            log::warn!("flush after disconnect failed: {e}");
        }
        Ok(())
    }

    /// Serves frontends one after the other, forever (until an unrecoverable error).
    pub fn serve(&self, mut listener: Listener) -> Result<(), ServeError> {
        loop {
            self.serve_one(&mut listener)?;
        }
    }
}

#[cfg(not(feature = "test-drop-marks"))]
fn drop_marks_requested() -> bool {
    false
}

#[cfg(feature = "test-drop-marks")]
fn drop_marks_requested() -> bool {
    let on = std::env::var_os("VHOST_DIRTYLOG_TEST_DROP_MARKS").is_some_and(|v| v == "1");
    if on {
        log::warn!(
            "TEST MODE: VHOST_DIRTYLOG_TEST_DROP_MARKS=1: dirty logging is advertised but never \
             turned on; migrations WILL lose pages"
        );
    }
    on
}
