//! Backend side: the dirty log a vhost-user backend's dataplane marks.
//!
//! During live migration the VMM copies guest memory while the guest runs, then copies again
//! whatever changed. It learns what KVM changed from KVM's dirty log, but a vhost-user backend
//! writes guest memory from its own process (block reads land in guest buffers, used-ring
//! entries are written), invisible to KVM. The vhost-user protocol closes that gap with a shared
//! *log*: one bit per 4 KiB guest page (`VHOST_LOG_PAGE`), indexed by guest-physical address,
//! that the backend sets after each write and the VMM merges into its migration bitmap. A write
//! that is not marked is a page the destination never receives: silent guest corruption.
//!
//! The pieces, bottom up:
//! - [`LogRegion`]: the mapped log, validated once so every later access is in bounds.
//! - [`DirtyLog`]: the cheap-to-clone handle the dataplane marks through. The current region is
//!   an atomically swapped pointer protected by a small read-copy-update scheme (`rcu`: a
//!   reader costs two plain stores to its own cache line, no lock, no RMW); with logging off a
//!   mark is one relaxed load and a branch; a mark is one `fetch_or` per 64 pages with Release
//!   ordering, so the data the device wrote happens-before the bit the VMM reads.
//! - [`GuestDirtyBitmap`]: a `vm-memory` [`Bitmap`](vm_memory::bitmap::Bitmap) for guest
//!   memory regions. vm-memory and virtio-queue call it on every write they make (data and used
//!   ring), so devices get logging without writing a line for it.
//! - [`LogBatch`]: a per-worker batch for high write rates (a net device's receive bursts):
//!   records the log words a burst touches and flushes each with one Release `fetch_or` before
//!   the burst's used index is published (DPDK's per-virtqueue log cache); vm-memory's own
//!   marks are routed into it by [`LogBatch::scope`].
//!
//! Ordering contract (DESIGN.md invariant 2): the device's data store happens-before its mark
//! (Release RMW); the VMM clears a word with an Acquire swap before it copies the pages that word
//! covers, so a copy made after a cleared bit sees the data that bit stood for, and a write that
//! lands after the swap sets the bit again.

mod batch;
mod bitmap;
mod handle;
mod rcu;
mod region;
pub(crate) mod sync;

pub use batch::{BatchStats, LogBatch, BATCH_SPAN_WORDS, BATCH_WORDS};
pub use bitmap::{GuestDirtyBitmap, StockLogAttach};
pub use handle::{DirtyLog, LogStats};
pub use region::LogRegion;

#[cfg(test)]
mod tests;

/// log2 of the vhost-user log page size (`VHOST_LOG_PAGE` = 4 KiB): a guest-physical address
/// `gpa` is log page (and migration bitmap page) `gpa >> LOG_PAGE_SHIFT`. The one place the
/// crate names it; neither `vhost` nor `vhost-user-backend` exports it.
pub const LOG_PAGE_SHIFT: u32 = 12;
/// The vhost-user log page size (`VHOST_LOG_PAGE`): one log bit covers this many bytes.
pub const LOG_PAGE_SIZE: u64 = 1 << LOG_PAGE_SHIFT;

/// Bytes of log needed to cover guest-physical addresses `[0, gpa_end)`, rounded up to whole
/// 64-bit words as QEMU sizes it. `None` if the size overflows.
pub fn log_size_for(gpa_end: u64) -> Option<u64> {
    let pages = gpa_end.checked_add(LOG_PAGE_SIZE - 1)? >> LOG_PAGE_SHIFT;
    Some(pages.div_ceil(64) * 8)
}

/// The largest log the backend accepts, in bytes: one that covers the whole 52-bit
/// guest-physical address space (4 PiB, the most x86-64 and aarch64 can address: 2^40 pages,
/// 2^37 bytes of log). A bigger log describes memory no guest can have; QEMU once computed a
/// 512 TiB log from uninitialised ring fields. Logs up to this size are accepted but mapped
/// lazily and proven backed only as far as guest memory reaches, so an oversized (sparse) log
/// costs address space, not memory or time.
pub const MAX_LOG_BYTES: u64 = 1 << 37;

/// Why a log could not be attached or used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `mmap_size` was zero.
    #[error("log size is zero")]
    ZeroSize,
    /// `mmap_offset + mmap_size` overflows.
    #[error("log offset {offset:#x} + size {size:#x} overflows")]
    Overflow {
        /// Requested offset.
        offset: u64,
        /// Requested size.
        size: u64,
    },
    /// The requested size cannot be mapped in this address space.
    #[error("log size {size:#x} is too large to map")]
    TooLarge {
        /// Requested size.
        size: u64,
    },
    /// The log would not be aligned for 64-bit atomics.
    #[error("log offset {offset:#x} is not 8-byte aligned")]
    Misaligned {
        /// Offending offset.
        offset: u64,
    },
    /// `mmap_offset + mmap_size` lies past the end of the file.
    #[error("log range {offset:#x}+{size:#x} lies past the end of the fd ({file_len:#x} bytes)")]
    PastEnd {
        /// Requested offset.
        offset: u64,
        /// Requested size.
        size: u64,
        /// Actual length of the file behind the fd.
        file_len: u64,
    },
    /// The log does not cover the guest memory it must log.
    #[error("log of {have} bytes is too small for guest memory needing {need} bytes")]
    TooSmall {
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// The log is larger than any guest-physical address space ([`MAX_LOG_BYTES`]).
    #[error(
        "log of {size:#x} bytes covers more than the 52-bit guest-physical address space \
         (at most {max:#x} bytes); refusing it"
    )]
    Absurd {
        /// Size of the log mapping in bytes.
        size: u64,
        /// [`MAX_LOG_BYTES`].
        max: u64,
    },
    /// Part of the mapped log has no file behind it (the fd is shorter than the mapping).
    #[error(
        "the log mapping is not fully backed by its file (fd shorter than mmap_offset + mmap_size)"
    )]
    NotBacked,
    /// `fstat` on the log fd failed.
    #[error("cannot stat log fd: {0}")]
    Stat(#[source] std::io::Error),
    /// `mmap` failed.
    #[error("cannot map log: {0}")]
    Map(#[source] std::io::Error),
}

impl From<LogError> for std::io::Error {
    fn from(e: LogError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}
