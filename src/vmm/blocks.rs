//! The migration bitmap's storage: fixed-size blocks behind an append-only table, and the
//! writer lock every change of a bit goes through.
//!
//! ## Why blocks behind a table
//! One bit per 4 KiB guest page, bit `p % 64` of word `p / 64`, the layout of the vhost-user log
//! and of KVM's dirty bitmap, so merging is word against word. The words live in fixed-size blocks
//! of [`BLOCK_PAGES`] pages (2^18 pages = 32 KiB of bitmap = 1 GiB of guest memory). The bitmap
//! reaches its blocks through a table (`Vec` of `Arc`ed blocks plus the page count) that is
//! replaced as a whole by [`MigrationBitmap::grow`](super::MigrationBitmap::grow), the way QEMU's
//! `DirtyMemoryBlocks` are: growth copies the *pointers* to the existing blocks into a new table,
//! appends zeroed blocks and publishes the new table atomically. No existing block is copied or
//! moved, so a merge that is running on the old table keeps writing into the same memory the new
//! table refers to, and no bit set during growth is lost.
//!
//! The table is published through [`arc_swap::ArcSwap`]: loading it is lock-free (growth
//! never blocks a sync, merge or iteration), and the old table is freed when its last reader
//! is done. Growers serialize on a mutex that only growers take. (Writers of *bits* serialize
//! on a separate writer lock, one block at a time: [`Writer`].) We chose this over a
//! fixed-capacity array of `OnceLock` blocks because capacity for the supported maximum
//! ([`MAX_PAGES`] = 2^40 pages, 52-bit guest-physical addresses) would be 4 Mi slots (64 MiB)
//! per bitmap whether the guest has 1 GiB or 4 PiB, and a smaller fixed capacity would cap
//! hotplug; the table costs one pointer per GiB of guest memory and one extra pointer load per
//! operation.
//!
//! Bits at and past [`MigrationBitmap::pages`](super::MigrationBitmap::pages) are always zero:
//! every operation clamps to the page count of the table it loaded, and blocks are born zeroed.
//!
//! This file is the storage and nothing else: what is merged into it is `merge.rs` and
//! `sync.rs`, what reads it `iter.rs`.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::VmmError;
use crate::bits::{low_bits, span_mask, word_span};

/// Guest pages per bitmap block (2^18 pages: 32 KiB of bitmap covering 1 GiB of guest memory).
pub const BLOCK_PAGES: u64 = 1 << 18;
pub(super) const BLOCK_WORDS: usize = (BLOCK_PAGES / 64) as usize;
pub(super) const BLOCK_WORD_SHIFT: u32 = BLOCK_WORDS.trailing_zeros();

/// Largest number of pages a [`MigrationBitmap`](super::MigrationBitmap) holds: 2^40, every 4 KiB
/// page of a 52-bit guest-physical address space.
pub const MAX_PAGES: u64 = 1 << 40;

pub(super) type Block = Arc<[AtomicU64; BLOCK_WORDS]>;

pub(super) fn new_block() -> Result<Block, VmmError> {
    // A `TrustedLen` iterator: one allocation, filled in place (no 32 KiB stack temporary).
    let words: Arc<[AtomicU64]> = (0..BLOCK_WORDS).map(|_| AtomicU64::new(0)).collect();
    // Cannot fail (the slice has exactly `BLOCK_WORDS` elements); reported, not unwrapped.
    words.try_into().map_err(|_| VmmError::Alloc {
        bytes: BLOCK_WORDS * 8,
    })
}

/// One published version of the block table.
pub(super) struct Table {
    pub(super) blocks: Vec<Block>,
    pub(super) pages: u64,
}

/// Exclusive write access to the bitmap's words, one block at a time.
///
/// Every operation that changes bits (the merges,
/// [`MigrationBitmap::set_range`](super::MigrationBitmap::set_range),
/// [`MigrationBitmap::test_and_clear`](super::MigrationBitmap::test_and_clear)) goes through a
/// `Writer`. It takes the bitmap's writer lock when it first touches a block and lets go of it when
/// it moves to another block, so a sync of a large guest holds off a concurrent `test_and_clear`
/// for at most one block's worth of words (4096), and never takes the lock for a stretch of clean
/// log.
///
/// Under the lock a word is updated with a plain load and store instead of a locked RMW: QEMU's
/// `cpu_physical_memory_sync_dirty_bitmap` ORs into the migration bitmap the same way, under
/// `bitmap_mutex`. That leaves one locked instruction per dirty log word (the log swap, which
/// must stay: the backend writes the log concurrently), half of what an atomic OR costs on top.
/// Readers do not lock: each word changes by a single store, so a reader sees the word before
/// or after it.
pub(super) struct Writer<'a> {
    pub(super) t: &'a Table,
    lock: &'a Mutex<()>,
    guard: Option<MutexGuard<'a, ()>>,
    /// Index of the block the lock is held for (`usize::MAX`: none yet) and its words.
    block: usize,
    pub(super) words: &'a [AtomicU64],
}

impl<'a> Writer<'a> {
    #[inline]
    pub(super) fn new(t: &'a Table, lock: &'a Mutex<()>) -> Self {
        Writer {
            t,
            lock,
            guard: None,
            block: usize::MAX,
            words: &[],
        }
    }

    /// Bitmap word `w` (below `t.pages.div_ceil(64)`: callers clamp), locked for writing.
    #[inline(always)]
    pub(super) fn word(&mut self, w: u64) -> &'a AtomicU64 {
        let b = (w >> BLOCK_WORD_SHIFT) as usize;
        if b != self.block {
            self.enter(b);
        }
        &self.words[w as usize & (BLOCK_WORDS - 1)]
    }

    #[cold]
    #[inline(never)]
    fn enter(&mut self, b: usize) {
        // Release before re-taking, so a waiting `test_and_clear` can get in between blocks.
        self.guard = None;
        // A panic cannot leave a word half-written (every update is one store): a poisoned
        // lock is as good as a clean one.
        self.guard = Some(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
        self.block = b;
        self.words = &self.t.blocks[b][..];
    }

    /// ORs `v` into word `w` and returns how many of its bits were newly set. The store is
    /// Release (free on x86), so even a reader that skips the lock and loads with Acquire sees
    /// what the caller acquired from the log.
    #[inline(always)]
    pub(super) fn or(&mut self, w: u64, v: u64) -> u64 {
        or_word(self.word(w), v)
    }

    /// Bitmap words `first..first + len`, locked for writing, if they lie in one block (all
    /// inside the bitmap: callers clamp).
    #[inline(always)]
    pub(super) fn span(&mut self, first: u64, len: usize) -> Option<&'a [AtomicU64]> {
        let at = first as usize & (BLOCK_WORDS - 1);
        if at + len > BLOCK_WORDS {
            return None;
        }
        self.word(first);
        Some(&self.words[at..at + len])
    }

    /// Clears `mask`'s bits of word `w` and returns those that were set.
    #[inline(always)]
    pub(super) fn take(&mut self, w: u64, mask: u64) -> u64 {
        let word = self.word(w);
        let old = word.load(Ordering::Relaxed);
        let taken = old & mask;
        if taken != 0 {
            word.store(old & !mask, Ordering::Relaxed);
        }
        taken
    }
}

/// ORs `v` into a bitmap word the caller holds the writer lock for, with a plain load and a
/// Release store, and returns how many of `v`'s bits were newly set.
#[inline(always)]
pub(super) fn or_word(word: &AtomicU64, v: u64) -> u64 {
    let old = word.load(Ordering::Relaxed);
    word.store(old | v, Ordering::Release);
    (v & !old).count_ones() as u64
}

/// Asks the CPU to bring `word`'s cache line close, for writing. No-op off x86-64.
#[inline(always)]
fn prefetch_write(word: &AtomicU64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW/PREFETCHT0 only hint the cache: they never fault, read or write
    // program-visible memory, and SSE (which `_mm_prefetch` needs) is part of x86-64. The
    // pointer comes from a live reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        _mm_prefetch::<_MM_HINT_ET0>(word.as_ptr() as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = word;
}

impl Table {
    pub(super) fn empty() -> Self {
        Table {
            blocks: Vec::new(),
            pages: 0,
        }
    }

    /// Bitmap word `w`; `w` must be below `pages.div_ceil(64)` (callers clamp first).
    #[inline(always)]
    pub(super) fn word(&self, w: u64) -> &AtomicU64 {
        &self.blocks[(w >> BLOCK_WORD_SHIFT) as usize][w as usize & (BLOCK_WORDS - 1)]
    }

    /// Prefetches, for writing, the cache lines of bitmap words `first + k` for the bits `k`
    /// of `mask` (one prefetch per group of 8 words). A hint only: no lock, no effect on
    /// correctness; words past the bitmap are skipped.
    #[inline(always)]
    pub(super) fn prefetch(&self, first: u64, mut mask: u64) {
        let limit = self.blocks.len() as u64 * BLOCK_WORDS as u64;
        while mask != 0 {
            let k = mask.trailing_zeros() as u64;
            mask &= !low_bits((k | 7) + 1);
            let w = first + k;
            if w < limit {
                prefetch_write(self.word(w));
            }
        }
    }

    /// `[first, first + npages)` clamped to the bitmap, or `None` if that is empty.
    #[inline]
    pub(super) fn clamp(&self, first: u64, npages: u64) -> Option<(u64, u64)> {
        let end = first.saturating_add(npages).min(self.pages);
        (first < end).then_some((first, end))
    }

    /// Calls `f(word_index, word, mask)` for every bitmap word overlapping pages `[first, end)`
    /// (already clamped, non-empty), `mask` selecting the range's bits; walks block by block so
    /// the inner loop indexes one block.
    #[inline(always)]
    pub(super) fn for_words<B>(
        &self,
        first: u64,
        end: u64,
        mut f: impl FnMut(u64, &AtomicU64, u64) -> ControlFlow<B>,
    ) -> Option<B> {
        let span = word_span(first, end);
        let mut w = span.0;
        while w <= span.1 {
            let block = &self.blocks[(w >> BLOCK_WORD_SHIFT) as usize];
            let last = span.1.min(w | (BLOCK_WORDS as u64 - 1));
            for j in w..=last {
                let mask = span_mask(j, span);
                if let ControlFlow::Break(b) = f(j, &block[j as usize & (BLOCK_WORDS - 1)], mask) {
                    return Some(b);
                }
            }
            w = last + 1;
        }
        None
    }
}
