//! Frontend-side toolkit: an in-process VMM and guest driver for vhost-user-blk backends.
//!
//! Testing a vhost-user backend's dirty logging needs the *other* side of the socket: guest RAM
//! the backend maps, a VMM that speaks the protocol (memory table, vrings, `SET_LOG_BASE`,
//! `LOG_ALL`, `GET_VRING_BASE`), and a guest driver that puts requests on a virtqueue and
//! checks what comes back. This module provides those pieces, small and explicit, for the
//! integration tests, the `vhost-dirtylog-check` conformance checker and the benches. It drives
//! *any* vhost-user-blk backend, not only ours, and treats it as untrusted: a backend that
//! answers nonsense (a used id that is not in flight, a used index running ahead of the ring, a
//! protocol error, a timeout) yields a [`DriverError`], never a panic.
//!
//! - [`GuestRam`]: memfd-backed guest memory with any region layout (holes, hotplug), read and
//!   write by guest-physical address, snapshots and page diffs.
//! - [`Connection`]: a `vhost::vhost_user::Frontend` doing the standard negotiation and the
//!   memory / vring / log messages in the shapes this toolkit's types produce.
//! - [`SplitQueue`]: a split virtqueue driver living in guest RAM: add a chain of
//!   `(gpa, len, device_writable)` buffers, kick, collect used entries (with the call eventfd
//!   and a timeout, or by polling), EVENT_IDX aware; many chains may be in flight.
//! - [`blk`]: virtio-blk on top: request builders (read, write, flush, get-id, discard,
//!   write-zeroes), status parsing, the config space, and [`BlkQueue`], a queue that manages
//!   request headers and status bytes for you.
//! - [`net`]: virtio-net on top: negotiation, RX queues with mergeable buffers (poison-filled,
//!   frames rebuilt from `num_buffers`), TX queues.
//!
//! A minimal session:
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vhost_dirtylog::driver::{blk::BlkQueue, Connection, GuestRam, QueueLayout, RegionSpec};
//!
//! let ram = Arc::new(GuestRam::new(&[RegionSpec::new(0, 1 << 20)])?);
//! let mut conn = Connection::connect("/tmp/blk.sock", Duration::from_secs(5))?;
//! conn.negotiate_blk()?;
//! conn.set_mem_table(&ram)?;
//! let mut q = BlkQueue::new(ram.clone(), QueueLayout::new(0, 64)?, 0x10000, conn.event_idx())?;
//! conn.start_queue(0, q.queue())?;
//! ram.fill(0x40000, 4096, 0xab)?;
//! let done = q.write(0, &[(0x40000, 4096)], Duration::from_secs(5))?;
//! assert!(done.is_ok());
//! # Ok::<(), vhost_dirtylog::driver::DriverError>(())
//! ```

pub mod blk;
mod conn;
pub mod net;
mod ram;
mod virtq;

pub use blk::BlkQueue;
pub use conn::Connection;
pub use ram::{memfd, GuestRam, RamSnapshot, RegionSpec, RemovedRegion};
pub use virtq::{Buf, QueueLayout, SplitQueue, UsedElem};

use std::time::Duration;

/// Everything that can go wrong on the frontend side.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A vhost-user message failed (socket, protocol, or the backend refused it).
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// A system call failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// A guest-physical address (range) outside guest RAM.
    #[error("guest-physical address {0:#x} is outside guest RAM")]
    BadAddress(u64),
    /// Invalid RAM or queue layout.
    #[error("invalid layout: {0}")]
    Layout(String),
    /// Not enough free descriptors (or request slots) for the chain.
    #[error("queue full: need {need} descriptors, {free} free")]
    QueueFull {
        /// Descriptors needed.
        need: usize,
        /// Descriptors free.
        free: usize,
    },
    /// Nothing completed in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The backend violated the protocol or the virtqueue rules.
    #[error("backend misbehaved: {0}")]
    Backend(String),
    /// A feature this operation needs was not negotiated.
    #[error("feature not negotiated: {0}")]
    Feature(&'static str),
    /// A caller-supplied argument is invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
}
