//! Choosing the dataplane: [`AioMode`] (parsed from and printed as `--aio`) and
//! [`io_uring_available`], the once-per-process probe that a ring can be set up and supports
//! every opcode the engine uses.
//!
//! Separate from the engine because it runs before any device exists (configuration checks,
//! the daemon's start-up message) and touches no request. Re-exported from [`super`] and
//! from `crate::blk`.

use std::sync::OnceLock;

use io_uring::{opcode, IoUring, Probe};

/// How the device moves data between the disk and guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AioMode {
    /// io_uring when the kernel allows it, else synchronous (said once at start).
    #[default]
    Auto,
    /// io_uring, or fail at start.
    IoUring,
    /// One blocking `preadv`/`pwritev` per request, per queue (the pre-io_uring path).
    Sync,
}

impl std::str::FromStr for AioMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AioMode::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(AioMode::IoUring),
            "sync" | "threads" => Ok(AioMode::Sync),
            _ => Err(format!(
                "unknown aio mode {s:?}: expected io_uring, sync or auto"
            )),
        }
    }
}

impl std::fmt::Display for AioMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AioMode::Auto => "auto",
            AioMode::IoUring => "io_uring",
            AioMode::Sync => "sync",
        })
    }
}

/// Whether this process can use io_uring for the dataplane: a ring can be set up and it
/// supports every opcode the engine uses. Probed once per process; a failure (old kernel:
/// `ENOSYS`, seccomp or `kernel.io_uring_disabled`: `EPERM`) is logged once.
pub fn io_uring_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let r = probe();
            match &r {
                Ok(()) => log::info!(
                    "dataplane: io_uring{}",
                    if defer_taskrun_available() {
                        " (deferred task work)"
                    } else {
                        " (no deferred task work: kernel older than 6.1)"
                    }
                ),
                Err(e) => log::warn!(
                    "io_uring is not available ({e}); serving requests synchronously \
                     (preadv/pwritev, one at a time per queue)"
                ),
            }
            r
        })
        .clone()
}

/// Whether rings can be set up the way the engine wants them ([`deferred_ring`]); the engine
/// falls back to an ordinary ring otherwise.
fn defer_taskrun_available() -> bool {
    deferred_ring(8).is_ok()
}

/// A ring of `entries` with deferred task work and a single issuer, created disabled (see the
/// module docs of [`super`]): `SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG | R_DISABLED`.
/// Before Linux 6.1 the flags are rejected with `EINVAL`.
pub(super) fn deferred_ring(entries: u32) -> std::io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled()
        .build(entries)
}

fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    for (name, code) in [
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("READV", opcode::Readv::CODE),
        ("WRITEV", opcode::Writev::CODE),
        ("FSYNC", opcode::Fsync::CODE),
        ("FALLOCATE", opcode::Fallocate::CODE),
    ] {
        if !p.is_supported(code) {
            return Err(format!("the kernel lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}
