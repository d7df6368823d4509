//! Test fixtures shared by the integration tests, the benches, the examples and the fuzz crate
//! (feature `test-utils`, as virtio-queue names its own).
//!
//! Testing a vhost-user backend needs the same few pieces everywhere, and they are kept here
//! once so that every test exercises the same code:
//!
//! - [`NullDevice`]: a one-queue device that does nothing, generic over the guest-memory
//!   bitmap, so the caller is the dataplane (writes guest memory through the daemon's view of
//!   it) — under [`DirtyLogBackend`](crate::backend::DirtyLogBackend) or bare under the stock
//!   daemon for comparison.
//! - [`memfd`]: the one anonymous-memory-file helper (the driver's; guest RAM uses it too).
//! - [`InProcessDaemon`]: the stock `VhostUserDaemon` serving a device on a socket in a scratch
//!   directory, on a thread; [`DaemonProcess`]: a daemon program as a child process, killed on
//!   drop. Both are reached with the in-process frontend, [`driver::Connection`].
//! - [`set_pages`] / [`set_bits`]: the pages set in a log (as a [`LogRegion`] or as bytes).
//! - [`blk`] (feature `blk`): a patterned disk image, the vhost-user-blk daemon in-process or
//!   spawned, and [`blk::Vm`], an in-process guest with started queues.
//!
//! The frontend itself is [`driver`]: these fixtures never speak vhost-user on their own.
//!
//! Set-up helpers panic when the set-up fails (they are for tests, where a failed set-up is a
//! failed test); what a test checks is returned.
//!
//! [`driver`]: crate::driver
//! [`driver::Connection`]: crate::driver::Connection
//! [`LogRegion`]: crate::log::LogRegion

#[cfg(feature = "blk")]
pub mod blk;
mod daemon;
#[cfg(feature = "net")]
pub mod net;
mod null;
mod pages;

pub use crate::driver::memfd;
pub use daemon::{DaemonDir, DaemonProcess, InProcessDaemon, DAEMON_TIMEOUT};
pub use null::{NullDevice, NullMem};
pub use pages::{pages_covering, set_bits, set_pages};
