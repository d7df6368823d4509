//! # vhost-dirtylog
//!
//! Dirty-page logging for vhost-user device backends, and the VMM-side merge, so that a guest
//! whose devices run in separate vhost-user processes can be live-migrated without losing a page.
//!
//! A vhost-user backend writes guest memory from its own threads; KVM's dirty log never sees
//! those writes. The vhost-user protocol gives the backend a shared-memory *log* (one bit per
//! 4 KiB guest page) to mark what it wrote, and the VMM folds that log into its migration bitmap
//! every pre-copy round. This crate implements both ends, built on the rust-vmm crates:
//!
//! - [`log`]: the backend side — the mapped log, the lock-free [`log::DirtyLog`] handle the
//!   dataplane marks through, and [`log::GuestDirtyBitmap`], a `vm-memory` bitmap that makes every
//!   vm-memory / virtio-queue write log itself.
//!
//! - [`backend`]: the adapter that gives any `vhost-user-backend` device dirty logging.
//! - [`vmm`]: the VMM side — the shared log it allocates, the migration bitmap, and the
//!   `set_dirty_lebitmap`-style merge, sync, iteration and deferred clearing.
//!
//! Those three are the library core and all that builds with `default-features = false`: a VMM
//! or a backend author links only them, on the rust-vmm crates. The rest is behind features
//! (all on by default, so a checkout's examples and tests work):
//!
//! | feature | modules | what |
//! |---|---|---|
//! | `blk` | `blk`, `virtio_blk` | the vhost-user-blk device and daemon loop (`vhost-dirtylog-blk`) |
//! | `net` | `net`, `virtio_net` | the vhost-user-net device and daemon loop (`vhost-dirtylog-net`): socket and TAP ports |
//! | `driver` | `driver`, `virtio_blk`, `virtio_net` | frontend toolkit: in-process VMM, memfd guest RAM, split virtqueue, virtio-blk and virtio-net drivers |
//! | `check` | `check` | the migration checker (`vhost-dirtylog-check`); implies `driver` and `serde` |
//! | `test-utils` | `test_utils` | fixtures shared by tests, benches, examples and the fuzz crate |
//! | `daemon` | `daemon` | what a daemon binary needs beyond its device: socket ownership and locks, seccomp + Landlock sandbox |
//! | `serde` | | `Serialize` for statistics and reports |
//! | `cli` | | argument parsing and logging for the binaries only |
//!
//! The invariants every part keeps (no lost dirty page, data before mark, the VMM never drops a
//! bit it did not consume, hostile input is an error, free when idle) are in the repository's
//! `DESIGN.md`, each with the tests that fail if it breaks.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

mod bits;

pub mod backend;
#[cfg(feature = "blk")]
pub mod blk;
#[cfg(feature = "check")]
pub mod check;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "driver")]
pub mod driver;
pub mod log;
#[cfg(feature = "net")]
pub mod net;
#[cfg(any(feature = "blk", feature = "net"))]
mod serve;
#[cfg(feature = "test-utils")]
pub mod test_utils;
#[cfg(any(feature = "blk", feature = "driver"))]
pub mod virtio_blk;
#[cfg(any(feature = "net", feature = "driver"))]
pub mod virtio_net;
pub mod vmm;

/// The README's Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
