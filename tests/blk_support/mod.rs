//! The `blk_*` tests' fixtures: `vhost_dirtylog::test_utils` (and its `blk` part), plus the
//! path of the daemon binary, which only an integration test can name.
#![allow(dead_code, unused_imports)]

use std::time::Duration;

pub use vhost_dirtylog::test_utils::blk::*;
pub use vhost_dirtylog::test_utils::{pages_covering, set_pages, DaemonDir, DaemonProcess};

/// The daemon binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-blk");
/// Timeout for a request to complete.
pub const T: Duration = Duration::from_secs(10);

/// Spawns the daemon binary on a fresh pattern image of `size` bytes with extra `args`.
pub fn spawn(size: u64, args: &[&str]) -> DaemonProcess {
    spawn_blk(BIN, disk_dir(size), args, "warn")
}
