//! The accept loop of the `vhost-dirtylog-net` program: one frontend at a time, forever.
//!
//! As [`crate::blk::daemon`]: vhost-user-backend's `VhostUserDaemon` serves one connection and
//! its worker threads belong to it, so [`NetServer`] builds a fresh device, adapter, guest
//! memory and daemon for every frontend, registers the ports in the workers' epoll sets, runs
//! to the disconnect and tears the threads down. The ports stay open across connections (a
//! peer keeps its address; frames that arrive meanwhile wait in the socket queue).
//!
//! ## The negative-control switch (`test-drop-marks`)
//! Built with the cargo feature `test-drop-marks` *and* run with
//! `VHOST_DIRTYLOG_TEST_DROP_MARKS=1`, the daemon suppresses its log handle: it advertises and
//! acknowledges LOG_ALL but never marks. Tests use it to prove they catch lost pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::serve::{drop_marks_requested, wait_readable, wait_refusing_others};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::{lock, ConfigError, NetConfig, NetDevice, PairStats, Port};
use crate::backend::relay::Relay;

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// vhost-user-backend failed outside a connection (creating threads, accepting).
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// Serves one set of ports to successive frontends.
#[derive(Debug)]
pub struct NetServer {
    /// The private socket vhost-user-backend is served through (see `backend::relay`).
    relay: Relay,
    config: NetConfig,
    ports: Vec<Arc<dyn Port>>,
    current: Mutex<Option<NetDevice>>,
    totals: Mutex<Vec<PairStats>>,
    connections: AtomicU64,
    #[cfg_attr(not(feature = "test-drop-marks"), allow(dead_code))]
    drop_marks: bool,
}

impl NetServer {
    /// Checks the settings; `ports` has one port per queue pair. The relay's private socket
    /// goes in `$TMPDIR` (see [`new_in`](Self::new_in)).
    pub fn new(config: NetConfig, ports: Vec<Arc<dyn Port>>) -> Result<Self, ServeError> {
        Self::new_in(config, ports, &std::env::temp_dir())
    }

    /// As [`new`](Self::new), the relay's private socket (`backend::relay`) in `relay_dir`: a
    /// daemon passes its vhost-user socket's directory, where its sandbox lets it remove the
    /// socket at exit.
    pub fn new_in(
        config: NetConfig,
        ports: Vec<Arc<dyn Port>>,
        relay_dir: &std::path::Path,
    ) -> Result<Self, ServeError> {
        config.validate()?;
        if ports.len() != usize::from(config.queue_pairs) {
            return Err(ConfigError::Ports {
                ports: ports.len(),
                pairs: config.queue_pairs,
            }
            .into());
        }
        let n = usize::from(config.queue_pairs);
        let relay =
            Relay::new_in(relay_dir).map_err(|e| ServeError::Daemon(format!("relay: {e}")))?;
        Ok(NetServer {
            relay,
            config,
            ports,
            current: Mutex::new(None),
            totals: Mutex::new(vec![PairStats::default(); n]),
            connections: AtomicU64::new(0),
            drop_marks: drop_marks_requested(),
        })
    }

    /// Removes the files the server made for itself (the relay's private socket and
    /// directory), for a process about to exit (`exit` runs no destructors).
    pub fn cleanup(&self) {
        self.relay.remove_files();
    }

    /// The device of the connected frontend, if any.
    pub fn current(&self) -> Option<NetDevice> {
        lock(&self.current).clone()
    }

    /// Accepts one frontend on `listener` and serves it until it disconnects. A protocol error
    /// ends the connection (logged), not the server.
    pub fn serve_one(&self, listener: &mut Listener) -> Result<(), ServeError> {
        wait_readable(listener)
            .map_err(|e| ServeError::Daemon(format!("waiting for a frontend: {e}")))?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend =
            NetDevice::into_backend(self.config.clone(), self.ports.clone(), mem.clone())?;
        let device = backend.inner().clone();
        #[cfg(feature = "test-drop-marks")]
        if self.drop_marks {
            backend.log().suppress_logging_for_tests();
        }
        let mut daemon = VhostUserDaemon::new("vhost-dirtylog-net".to_string(), backend, mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        device
            .attach(&daemon)
            .map_err(|e| ServeError::Daemon(format!("registering the ports: {e}")))?;
        let frontend = accept(listener)?;
        // QEMU's virtio-net sends SET_VRING_ENABLE before SET_FEATURES, which the stock
        // handler answers by closing the connection: the relay answers it (`backend::relay`).
        let relayed = self
            .relay
            .start(&mut daemon, frontend)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        log::info!("frontend connected");
        self.connections.fetch_add(1, Ordering::Relaxed);
        *lock(&self.current) = Some(device.clone());
        match wait_refusing_others(listener, || daemon.wait()) {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("connection ended: {e}"),
        }
        drop(daemon);
        relayed.join();
        device.reclaim_exit_fds();
        let mut totals = lock(&self.totals);
        for (i, t) in totals.iter_mut().enumerate() {
            if let Some(s) = device.pair_stats(i) {
                t.add(&s);
            }
        }
        *lock(&self.current) = None;
        Ok(())
    }

    /// Serves frontends one after the other, forever (until an unrecoverable error).
    pub fn serve(&self, mut listener: Listener) -> Result<(), ServeError> {
        loop {
            self.serve_one(&mut listener)?;
        }
    }

    /// A human-readable statistics report: per queue pair, the connected frontend's counters
    /// and the totals over all connections.
    pub fn stats_report(&self) -> String {
        use std::fmt::Write;
        let current = self.current();
        let totals = lock(&self.totals).clone();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "statistics: {} frontend(s) served, {}",
            self.connections.load(Ordering::Relaxed),
            if current.is_some() {
                "one connected"
            } else {
                "none connected"
            }
        );
        let _ = writeln!(
            out,
            "{:>4} {:>12} {:>14} {:>12} {:>14} {:>10} {:>10} {:>8}   (connected frontend / all connections)",
            "pair", "rx-frames", "rx-bytes", "tx-frames", "tx-bytes", "tx-blocked", "tx-dropped", "errors"
        );
        for (i, total) in totals.iter().enumerate() {
            let now = current
                .as_ref()
                .and_then(|d| d.pair_stats(i))
                .unwrap_or_default();
            let mut all = *total;
            all.add(&now);
            for (s, what) in [(now, "now"), (all, "total")] {
                let _ = writeln!(
                    out,
                    "{i:>4} {:>12} {:>14} {:>12} {:>14} {:>10} {:>10} {:>8}   {what}",
                    s.rx_frames,
                    s.rx_bytes,
                    s.tx_frames,
                    s.tx_bytes,
                    s.tx_blocked,
                    s.tx_dropped,
                    s.errors()
                );
            }
        }
        if let Some(d) = &current {
            let l = d.dirty_log().stats();
            let _ = writeln!(
                out,
                "dirty log (connected frontend): logging {}, out-of-range marks {} ({} pages), \
                 marks without a log {}",
                if d.dirty_log().is_logging() {
                    "on"
                } else {
                    "off"
                },
                l.out_of_range_marks,
                l.out_of_range_pages,
                l.marks_without_log
            );
        }
        out
    }
}

/// Accepts the waiting frontend (the listener may be non-blocking: retried until one is there).
fn accept(listener: &mut Listener) -> Result<std::os::unix::net::UnixStream, ServeError> {
    loop {
        match listener.accept() {
            Ok(Some(s)) => {
                s.set_nonblocking(false)
                    .map_err(|e| ServeError::Daemon(format!("accepting a frontend: {e}")))?;
                return Ok(s);
            }
            Ok(None) => wait_readable(listener)
                .map_err(|e| ServeError::Daemon(format!("waiting for a frontend: {e}")))?,
            Err(e) => return Err(ServeError::Daemon(format!("accepting a frontend: {e}"))),
        }
    }
}
