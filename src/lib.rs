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
//! - [`blk`]: the vhost-user-blk device and daemon loop used as the real backend
//!   (`vhost-dirtylog-blk`).
//! - [`driver`]: a frontend-side toolkit — in-process VMM, memfd guest RAM, split virtqueue and
//!   virtio-blk driver — used by the tests, the checker and the benches.
//! - [`vmm`]: the VMM side — the shared log it allocates, the migration bitmap, and the
//!   `set_dirty_lebitmap`-style merge, sync, iteration and deferred clearing.
//!
//! See `DESIGN.md`-level invariants in the README: no lost dirty page, data before mark, the VMM
//! never drops a bit it did not consume, hostile input is an error, free when idle.

#![deny(missing_docs)]

mod bits;

pub mod backend;
pub mod blk;
pub mod check;
pub mod driver;
pub mod log;
pub mod vmm;

/// The README's Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
