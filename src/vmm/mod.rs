//! VMM side: the log the VMM hands to a vhost-user backend, and the migration bitmap it is
//! merged into.
//!
//! A live migration copies guest memory while the guest runs, round after round, each round
//! re-sending what changed since the last one. The VMM learns what changed from two sources:
//! KVM's dirty log (guest CPU writes) and, for every vhost-user device, the shared-memory log the
//! backend marks after it writes guest memory from its own process. Both are folded into one
//! *migration bitmap* that the send loop walks. This module is that VMM half:
//!
//! - [`SharedLog`]: the log itself — a sealed memfd sized for the guest's physical address
//!   space, mapped in the VMM and described in the form `vhost`'s frontend sends with
//!   `VHOST_USER_SET_LOG_BASE` ([`SharedLog::dirty_log_region`]).
//! - [`MigrationBitmap`]: one bit per 4 KiB guest page (page `gpa >> LOG_PAGE_SHIFT`), stored in
//!   fixed-size blocks behind an append-only, atomically swapped block table, so memory hotplug
//!   grows it without copying a block and without a lock on any reader.
//! - [`LogFlip`]: flip sync, cloud-hypervisor's way: two logs handed to the backend in turn
//!   with `SET_LOG_BASE`; the retired one is merged with plain loads and cleared with plain
//!   stores (no atomic swap per word).
//! - The merges: [`MigrationBitmap::sync_from_log`] (consume the log: one atomic swap per
//!   non-zero word, as QEMU's `vhost_dev_sync_region` does),
//!   [`MigrationBitmap::fetch_log`] + [`FetchedLog::clear_pages`] (copy now, clear later in
//!   chunks, in the spirit of `KVM_CLEAR_DIRTY_LOG`) and [`MigrationBitmap::merge_lebitmap`]
//!   (any little-endian page bitmap, e.g. KVM's, with QEMU's `set_dirty_lebitmap` word-aligned
//!   fast path and a shift path for unaligned starts).
//!
//! ## Why words, swaps and popcounts
//! A 64 GiB guest has 16 Mi pages: a per-page loop costs tens of milliseconds per round, during
//! which the guest keeps dirtying memory. The log and the bitmap share one layout (bit `p % 64`
//! of little-endian word `p / 64`), so the merge works on 64 pages at a time: plain loads skip
//! clean words (64 at a time), one atomic swap takes a dirty word out of the log, one OR puts
//! it into the bitmap, and `count_ones` of the bits that were not already set counts the newly
//! dirty pages (what the migration rate estimate needs). Nothing allocates or loops over bits.
//! The swap is the one locked instruction a dirty word must cost (the backend ORs into the log
//! concurrently); the OR into the bitmap is a plain load and store under the bitmap's writer
//! lock, taken once per 1 GiB block, as QEMU ORs into its migration bitmap under
//! `bitmap_mutex`. Readers of the bitmap never lock.
//!
//! ## The rules this module keeps (DESIGN.md)
//! - **Never drop a bit you did not consume (invariant 3).** A log word is cleared only by an
//!   atomic read-modify-write that returns exactly the bits it cleared, and those bits are ORed
//!   into the bitmap. A plain `store(0)` after a load would erase a mark the backend made in
//!   between: a page the destination never receives. Log bits that map past the end of the
//!   bitmap are *not* cleared: they stay in the log until the bitmap grows to cover them.
//! - **Clear before copy (invariant 2).** The swap that clears a log word has Acquire ordering
//!   (pairing with the backend's Release mark), and the bitmap bits are set and taken under the
//!   bitmap's writer lock ([`MigrationBitmap::test_and_clear`] takes it too), so the thread that
//!   copies a page after taking its bit sees the data the backend wrote before marking it; a
//!   write after the
//!   swap sets the bit again and is sent next round. In deferred mode the same holds for the
//!   clear of a chunk ([`FetchedLog::clear_pages`]), which must come before that chunk is sent.
//! - **Hostile sizes are errors, indices are clamped (invariant 4).** Zero or oversized guest
//!   memory and failed system calls are [`VmmError`]s. Every page index and length is clamped to
//!   the bitmap (pages past its end are ignored, documented per method); nothing panics.
//!
//! ## Resizing the log for memory hotplug
//! The log must cover all guest memory, so hotplug needs a bigger log. A log cannot be resized
//! in place safely (the backend has it mapped), so the VMM replaces it, and nothing marked in
//! either log may be lost:
//!
//! ```no_run
//! # fn example(
//! #     frontend: &vhost::vhost_user::Frontend,
//! #     bitmap: &vhost_dirtylog::vmm::MigrationBitmap,
//! #     old: vhost_dirtylog::vmm::SharedLog,
//! #     new_gpa_end: u64,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use vhost::VhostBackend;
//! use vhost_dirtylog::vmm::SharedLog;
//!
//! let new = SharedLog::new(new_gpa_end)?;       // 1. a larger log
//! bitmap.grow(new.guest_pages())?;              // 2. room for the new pages
//! // 3. hand it over; with LOG_SHMFD, `set_log_base` returns after the backend's reply, and
//! //    this crate's backend replies only once no mark can still be writing into the old log
//! //    (`DirtyLog::replace_region` waits for marks in flight).
//! frontend.set_log_base(0, Some(new.dirty_log_region()))?;
//! bitmap.drain_log(&old);                       // 4. everything marked in the old log
//! drop(old);                                    // 5. only now
//! // from here on, sync `new` every round
//! # Ok(()) }
//! ```
//! Marks made before the backend switched are in the old log and reach the bitmap at step 4;
//! marks made after are in the new log. Keep syncing the old log until step 4 if rounds run
//! meanwhile; sync of a log whose bits lie past the bitmap end leaves them in the log, so
//! growing the bitmap before the hand-over (step 2) is what makes them mergeable.

// One job per file (each file's docs give the reasons for its design):
mod bitmap; // the `MigrationBitmap` type, growth, set / take ranges
mod blocks; // block storage, the block table, the writer lock
mod fetch; // deferred mode: fetch now, clear chunk by chunk later
mod flip; // flip sync: two logs handed out in turn, the retired one read plainly
mod iter; // readers: test, count, next dirty page, iterate, snapshot
mod merge; // the shared merge loop and `LeWords` sources
mod shared_log; // the memfd log the VMM hands to the backend
mod sync; // consuming a log: one atomic swap per dirty word

pub use bitmap::MigrationBitmap;
pub use blocks::{BLOCK_PAGES, MAX_PAGES};
pub use fetch::{FetchedLog, DEFAULT_CLEAR_CHUNK_PAGES};
pub use flip::{FlipState, FlipStats, LogFlip};
pub use iter::DirtyPages;
pub use merge::LeWords;
pub use shared_log::{SharedLog, MAX_GPA_END};

use crate::log::LogError;

/// Why a VMM-side log or bitmap operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A dirty log was requested for zero bytes of guest memory.
    #[error("guest memory size is zero: a dirty log must cover at least one page")]
    ZeroSize,
    /// The guest-physical end address is past what a log is supported for.
    #[error(
        "guest memory end {gpa_end:#x} exceeds the supported maximum {max:#x} (52-bit guest-physical addresses)"
    )]
    GpaTooLarge {
        /// Requested guest-physical end address.
        gpa_end: u64,
        /// Largest supported end address.
        max: u64,
    },
    /// A migration bitmap was asked to hold more pages than it supports.
    #[error("{pages} pages exceed the {max} pages a migration bitmap supports")]
    TooManyPages {
        /// Requested number of pages.
        pages: u64,
        /// Largest supported number of pages.
        max: u64,
    },
    /// The bitmap's memory could not be allocated.
    #[error("out of memory allocating {bytes} bytes for the migration bitmap")]
    Alloc {
        /// Size of the failed allocation.
        bytes: usize,
    },
    /// `memfd_create` failed.
    #[error("cannot create the log memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// `ftruncate` of the log memfd failed.
    #[error("cannot size the log memfd to {size} bytes: {source}")]
    Truncate {
        /// Requested log size in bytes.
        size: u64,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// Sealing the log memfd failed.
    #[error("cannot seal the log memfd: {0}")]
    Seal(#[source] std::io::Error),
    /// Mapping the log failed.
    #[error("cannot map the log: {0}")]
    Map(#[from] LogError),
    /// A clear was requested with a chunk of zero pages.
    #[error("clear chunk size is zero pages")]
    ZeroChunk,
    /// A [`FetchedLog`] was used to clear a log it was not fetched from.
    #[error("the fetched bits were taken from a different log than the one being cleared")]
    FetchMismatch,
    /// A [`LogFlip`] step was called in the wrong state (e.g. `commit` without `begin`).
    #[error("log flip: `{op}` is not allowed while the flip is {state}")]
    FlipOrder {
        /// The step that was called.
        op: &'static str,
        /// The state the flip was in.
        state: &'static str,
    },
    /// The caller's `SET_LOG_BASE` in [`LogFlip::flip`] failed; the flip was aborted.
    #[error("SET_LOG_BASE for the log flip failed: {0}")]
    SetLogBase(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A retired log has marks past the end of the migration bitmap; nothing was merged.
    #[error(
        "retired log has a mark at page {page}, past the migration bitmap's {bitmap_pages} pages: grow the bitmap first"
    )]
    LogPastBitmap {
        /// The first such page.
        page: u64,
        /// The bitmap's size in pages.
        bitmap_pages: u64,
    },
}
