//! The migration bitmap and the merges into it.
//!
//! ## Layout: blocks behind an append-only table
//! One bit per 4 KiB guest page, bit `p % 64` of word `p / 64`, the layout of the vhost-user log
//! and of KVM's dirty bitmap, so merging is word against word. The words live in fixed-size
//! blocks of [`BLOCK_PAGES`] pages (2^18 pages = 32 KiB of bitmap = 1 GiB of guest memory).
//! The bitmap reaches its blocks through a table (`Vec` of `Arc`ed blocks plus the page count)
//! that is replaced as a whole by [`MigrationBitmap::grow`], the way QEMU's `DirtyMemoryBlocks`
//! are: growth copies the *pointers* to the existing blocks into a new table, appends zeroed
//! blocks and publishes the new table atomically. No existing block is copied or moved, so a
//! merge that is running on the old table keeps writing into the same memory the new table
//! refers to, and no bit set during growth is lost.
//!
//! The table is published through [`arc_swap::ArcSwap`]: a reader's `load` is lock-free (no
//! lock on the sync, merge or iteration paths), and the old table is freed when its last reader
//! is done. Growers serialize on a mutex that only growers take. We chose this over a
//! fixed-capacity array of `OnceLock` blocks because capacity for the supported maximum
//! ([`MAX_PAGES`] = 2^40 pages, 52-bit guest-physical addresses) would be 4 Mi slots (64 MiB)
//! per bitmap whether the guest has 1 GiB or 4 PiB, and a smaller fixed capacity would cap
//! hotplug; the table costs one pointer per GiB of guest memory and one extra pointer load per
//! operation.
//!
//! Bits at and past [`MigrationBitmap::pages`] are always zero: every operation clamps to the
//! page count of the table it loaded, and blocks are born zeroed.
//!
//! ## Merges
//! All merges share one word loop (`merge_core`). It first checks groups of 8 source words
//! with plain loads ORed together, so a clean stretch of log costs about what reading it costs
//! (most of a sparse log is clean). For each word of a dirty group it asks the source for the
//! bits it *consumes* (a plain read for [`merge_lebitmap`](MigrationBitmap::merge_lebitmap), an
//! atomic swap for [`sync_from_log`](MigrationBitmap::sync_from_log), a read that is remembered
//! for [`fetch_log`](MigrationBitmap::fetch_log)), and ORs them into the bitmap with one
//! `fetch_or` per word, counting newly dirty pages as `popcount(new & !old)`. When the
//! destination page is a multiple of 64 (the common case: the log and the bitmap are both indexed
//! from guest-physical 0) source word `i` lands on bitmap word `start / 64 + i` as is. Otherwise
//! each bitmap word is `src[i] << off | src[i - 1] >> (64 - off)`, the second half carried along
//! the loop (and flushed before a skipped group): still one load and at most one RMW per word,
//! never a loop over bits.
//!
//! What a dirty word costs is its two atomic RMWs (the log swap and the bitmap OR), and neither
//! can go: the swap is what makes clearing lossless (DESIGN.md invariant 3), and the OR must be
//! atomic because other threads take bits from the bitmap concurrently. So the merge runs at
//! the speed of reading the log while dirty words are rare, and at roughly one pair of RMWs per
//! dirty word otherwise (`benches/merge.rs` measures both against a plain scan of the log).
//!
//! Sources are clamped, never trusted: bits past `npages`, past the source, or mapping past the
//! end of the bitmap are neither merged nor (for the log) cleared.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{SharedLog, VmmError};
// The log's own atomics: `std`'s, except under `cfg(loom)` (see `crate::log::sync`). The
// bitmap's blocks always use `std`'s.
use crate::log::sync::{fence, AtomicU8 as LogByte};
use crate::log::LogRegion;

/// Guest pages per bitmap block (2^18 pages: 32 KiB of bitmap covering 1 GiB of guest memory).
pub const BLOCK_PAGES: u64 = 1 << 18;
const BLOCK_WORDS: usize = (BLOCK_PAGES / 64) as usize;
const BLOCK_WORD_SHIFT: u32 = BLOCK_WORDS.trailing_zeros();

/// Largest number of pages a [`MigrationBitmap`] holds: 2^40, every 4 KiB page of a 52-bit
/// guest-physical address space.
pub const MAX_PAGES: u64 = 1 << 40;

/// Default chunk for [`MigrationBitmap::clear_fetched`]: 32768 pages, 128 MiB of guest memory
/// (8 KiB of log): small enough that the clear of a chunk lands just before its pages are
/// sent, large enough that per-chunk overhead vanishes.
pub const DEFAULT_CLEAR_CHUNK_PAGES: u64 = 32768;

type Block = Arc<[AtomicU64; BLOCK_WORDS]>;

fn new_block() -> Result<Block, VmmError> {
    // A `TrustedLen` iterator: one allocation, filled in place (no 32 KiB stack temporary).
    let words: Arc<[AtomicU64]> = (0..BLOCK_WORDS).map(|_| AtomicU64::new(0)).collect();
    // Cannot fail (the slice has exactly `BLOCK_WORDS` elements); reported, not unwrapped.
    words.try_into().map_err(|_| VmmError::Alloc {
        bytes: BLOCK_WORDS * 8,
    })
}

/// One published version of the block table.
struct Table {
    blocks: Vec<Block>,
    pages: u64,
}

/// First and last word of pages `[first, end)` (`first < end`) and the masks of the range's
/// bits in those two words.
#[inline(always)]
fn word_span(first: u64, end: u64) -> (u64, u64, u64, u64) {
    let last = end - 1;
    (
        first / 64,
        last / 64,
        !0u64 << (first % 64),
        !0u64 >> (63 - last % 64),
    )
}

/// Mask of the low `n` bits (`n <= 64`).
#[inline(always)]
fn low_bits(n: u64) -> u64 {
    if n >= 64 {
        !0
    } else {
        (1u64 << n) - 1
    }
}

impl Table {
    fn empty() -> Self {
        Table {
            blocks: Vec::new(),
            pages: 0,
        }
    }

    /// Bitmap word `w`; `w` must be below `pages.div_ceil(64)` (callers clamp first).
    #[inline(always)]
    fn word(&self, w: u64) -> &AtomicU64 {
        &self.blocks[(w >> BLOCK_WORD_SHIFT) as usize][w as usize & (BLOCK_WORDS - 1)]
    }

    /// ORs `v` into word `w` (Release: publishes what the caller acquired from the log) and
    /// returns how many of its bits were newly set.
    #[inline(always)]
    fn or_word(&self, w: u64, v: u64) -> u64 {
        let old = self.word(w).fetch_or(v, Ordering::Release);
        (v & !old).count_ones() as u64
    }

    /// ORs `bits` (bit `i` = page `page + i`, all inside the bitmap) into the bitmap.
    #[inline]
    fn or_bits(&self, page: u64, bits: u64) -> u64 {
        let (w, off) = (page / 64, (page % 64) as u32);
        let lo = bits << off;
        let hi = if off == 0 { 0 } else { bits >> (64 - off) };
        let mut newly = 0;
        if lo != 0 {
            newly += self.or_word(w, lo);
        }
        if hi != 0 {
            newly += self.or_word(w + 1, hi);
        }
        newly
    }

    /// `[first, first + npages)` clamped to the bitmap, or `None` if that is empty.
    #[inline]
    fn clamp(&self, first: u64, npages: u64) -> Option<(u64, u64)> {
        let end = first.saturating_add(npages).min(self.pages);
        (first < end).then_some((first, end))
    }

    /// Calls `f(word_index, word, mask)` for every bitmap word overlapping pages `[first, end)`
    /// (already clamped, non-empty), `mask` selecting the range's bits; walks block by block so
    /// the inner loop indexes one block.
    #[inline(always)]
    fn for_words<B>(
        &self,
        first: u64,
        end: u64,
        mut f: impl FnMut(u64, &AtomicU64, u64) -> ControlFlow<B>,
    ) -> Option<B> {
        let (w0, w1, m0, m1) = word_span(first, end);
        let mut w = w0;
        while w <= w1 {
            let block = &self.blocks[(w >> BLOCK_WORD_SHIFT) as usize];
            let last = w1.min(w | (BLOCK_WORDS as u64 - 1));
            for j in w..=last {
                let mut mask = !0u64;
                if j == w0 {
                    mask &= m0;
                }
                if j == w1 {
                    mask &= m1;
                }
                if let ControlFlow::Break(b) = f(j, &block[j as usize & (BLOCK_WORDS - 1)], mask) {
                    return Some(b);
                }
            }
            w = last + 1;
        }
        None
    }
}

/// Source words examined per zero check: a group of clean words costs `GROUP` plain loads ORed
/// together and one predictable branch, close to the cost of merely reading the log.
const GROUP: usize = 8;

/// The word loop every merge uses (see the module docs).
///
/// `clean(i)` tells, without consuming anything, whether source words `i..i + GROUP` are all
/// zero (so the group is skipped); `take(i, mask)` returns the bits of source word `i` selected
/// by `mask` that the source gives up (and, for a log, has cleared). The loop never asks for
/// bits that map past `npages`, past `src_bits` or past the end of the bitmap. Returns the
/// number of newly dirty pages.
#[inline(always)]
fn merge_core(
    t: &Table,
    src_bits: u64,
    start_page: u64,
    npages: u64,
    clean: impl Fn(usize) -> bool,
    mut take: impl FnMut(usize, u64) -> u64,
) -> u64 {
    if start_page >= t.pages {
        return 0;
    }
    let n = npages.min(src_bits).min(t.pages - start_page);
    if n == 0 {
        return 0;
    }
    // `n <= src_bits`, the bit length of an in-memory slice, so the word count fits a usize.
    let nwords = n.div_ceil(64) as usize;
    // Words `0..full` are taken whole, in groups up to `grouped`; word `full` (the last) with
    // `last_mask`.
    let full = nwords - 1;
    let grouped = full - full % GROUP;
    let last_mask = low_bits(n - full as u64 * 64);
    let d0 = start_page / 64;
    let off = (start_page % 64) as u32;
    let mut newly = 0;
    if off == 0 {
        // Fast path (QEMU's word-aligned `set_dirty_lebitmap`): word i onto word d0 + i.
        let mut one = |i: usize, mask: u64| {
            let v = take(i, mask);
            if v != 0 {
                newly += t.or_word(d0 + i as u64, v);
            }
        };
        for g in (0..grouped).step_by(GROUP) {
            if !clean(g) {
                (g..g + GROUP).for_each(|i| one(i, !0));
            }
        }
        (grouped..full).for_each(|i| one(i, !0));
        one(full, last_mask);
    } else {
        // Shift path: bitmap word d0 + i = src[i] << off | src[i - 1] >> (64 - off), the
        // second half carried from the previous word.
        let back = 64 - off;
        let mut carry = 0u64;
        let mut one = |i: usize, mask: u64| {
            let v = take(i, mask);
            let out = (v << off) | carry;
            carry = v >> back;
            if out != 0 {
                newly += t.or_word(d0 + i as u64, out);
            }
        };
        for g in (0..grouped).step_by(GROUP) {
            if clean(g) {
                // Flush the carry into the group's first word (a no-op when it is zero).
                one(g, 0);
            } else {
                (g..g + GROUP).for_each(|i| one(i, !0));
            }
        }
        (grouped..full).for_each(|i| one(i, !0));
        one(full, last_mask);
        if carry != 0 {
            // Only bits of valid pages were taken, so this word exists.
            newly += t.or_word(d0 + nwords as u64, carry);
        }
    }
    newly
}

/// The byte-granular part of a log whose length is not a multiple of 8: `take(k, byte, mask)`
/// returns the consumed bits of tail byte `k` among `mask`; byte `k` covers bitmap pages
/// `first_page + 8k ..`.
fn merge_tail(
    t: &Table,
    tail: &[LogByte],
    first_page: Option<u64>,
    mut take: impl FnMut(usize, &LogByte, u8) -> u8,
) -> u64 {
    let Some(first_page) = first_page else {
        return 0;
    };
    let mut newly = 0;
    for (k, byte) in tail.iter().enumerate() {
        let page = first_page.saturating_add(k as u64 * 8);
        if page >= t.pages {
            break;
        }
        let mask = low_bits((t.pages - page).min(8)) as u8;
        let v = take(k, byte, mask);
        if v != 0 {
            newly += t.or_bits(page, v as u64);
        }
    }
    newly
}

/// The operations the merges need from an atomic 64-bit word, so one `take_word` / `all_zero`
/// serves the bitmap's words (`std`) and the log's (`crate::log::sync`: the same type, except
/// under `cfg(loom)`, where the model checks run this very code on loom's atomics).
trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn swap(&self, v: u64, order: Ordering) -> u64;
    fn fetch_and(&self, v: u64, order: Ordering) -> u64;
}

macro_rules! impl_word {
    ($t:ty) => {
        impl Word for $t {
            #[inline(always)]
            fn load(&self, order: Ordering) -> u64 {
                <$t>::load(self, order)
            }
            #[inline(always)]
            fn swap(&self, v: u64, order: Ordering) -> u64 {
                <$t>::swap(self, v, order)
            }
            #[inline(always)]
            fn fetch_and(&self, v: u64, order: Ordering) -> u64 {
                <$t>::fetch_and(self, v, order)
            }
        }
    };
}
impl_word!(AtomicU64);
#[cfg(loom)]
impl_word!(crate::log::sync::AtomicU64);

/// Consumes `mask`'s bits of a log word: a relaxed load skips a clean word, an Acquire swap
/// (or, for a partial word, an Acquire `fetch_and`) takes exactly the bits it clears.
#[inline(always)]
fn take_word<W: Word>(w: &W, mask: u64) -> u64 {
    if w.load(Ordering::Relaxed) & mask == 0 {
        0
    } else if mask == !0 {
        w.swap(0, Ordering::Acquire)
    } else {
        w.fetch_and(!mask, Ordering::Acquire) & mask
    }
}

/// A little-endian page bitmap [`MigrationBitmap::merge_lebitmap`] can read: bit `p % 64` of
/// word `p / 64` is page `p` (KVM's `KVM_GET_DIRTY_LOG` bitmap, the vhost-user log, another
/// migration bitmap's [`snapshot`](MigrationBitmap::snapshot)).
pub trait LeWords {
    /// Number of 64-bit words.
    fn word_count(&self) -> usize;
    /// Word `i` (`i < word_count()`).
    fn word(&self, i: usize) -> u64;
    /// Whether words `first..first + count` (all below `word_count()`) are zero; lets the
    /// merge skip clean stretches. Override it with a branch-free check where one is possible.
    #[inline(always)]
    fn all_zero(&self, first: usize, count: usize) -> bool {
        (first..first + count).fold(0, |acc, i| acc | self.word(i)) == 0
    }
}

/// Whether every word of a log slice is zero: relaxed loads ORed together, one branch.
#[inline(always)]
fn all_zero<W: Word>(words: &[W]) -> bool {
    words
        .iter()
        .fold(0, |acc, w| acc | w.load(Ordering::Relaxed))
        == 0
}

impl LeWords for [u64] {
    #[inline(always)]
    fn word_count(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        self[i]
    }
    #[inline(always)]
    fn all_zero(&self, first: usize, count: usize) -> bool {
        self[first..first + count].iter().fold(0, |acc, w| acc | w) == 0
    }
}

/// Read with Acquire loads and left unchanged; to *consume* a log use
/// [`MigrationBitmap::sync_from_log`].
impl LeWords for [AtomicU64] {
    #[inline(always)]
    fn word_count(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        self[i].load(Ordering::Acquire)
    }
    #[inline(always)]
    fn all_zero(&self, first: usize, count: usize) -> bool {
        all_zero(&self[first..first + count])
    }
}

impl<const N: usize> LeWords for [u64; N] {
    #[inline(always)]
    fn word_count(&self) -> usize {
        N
    }
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        self[i]
    }
}

impl LeWords for Vec<u64> {
    #[inline(always)]
    fn word_count(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        self[i]
    }
    #[inline(always)]
    fn all_zero(&self, first: usize, count: usize) -> bool {
        self[..].all_zero(first, count)
    }
}

impl LeWords for Vec<AtomicU64> {
    #[inline(always)]
    fn word_count(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        self[i].load(Ordering::Acquire)
    }
    #[inline(always)]
    fn all_zero(&self, first: usize, count: usize) -> bool {
        self[..].all_zero(first, count)
    }
}

/// The VMM's migration bitmap: one bit per 4 KiB guest page, set = "must be sent (again)".
///
/// Every method takes `&self` and is lock-free except [`grow`](Self::grow), which only
/// serializes against other growers: the syncing thread, the sending thread and a hotplug
/// thread can share one bitmap (e.g. in an `Arc`).
///
/// Storage: blocks of [`BLOCK_PAGES`] pages (32 KiB, 1 GiB of guest memory each) behind an
/// append-only block table published with `arc-swap`, as QEMU's `DirtyMemoryBlocks` do:
/// growing for memory hotplug allocates new blocks and a new table of pointers, and never
/// copies, moves or locks an existing block, so syncs running during the growth keep writing
/// into live memory. (A fixed-capacity table of `OnceLock` blocks would avoid the table swap
/// but cost 64 MiB of slots per bitmap to cover [`MAX_PAGES`].)
///
/// Ordering: bits are set with Release RMWs after the log was consumed with Acquire, and taken
/// with Acquire ([`test_and_clear`](Self::test_and_clear)), so whoever takes a page's bit and
/// then copies the page sees the data the backend wrote before marking it.
///
/// Page indices are absolute guest page numbers (`gpa >> 12`). Ranges are clamped to
/// [`pages`](Self::pages): pages past the end are ignored by every method and counted nowhere,
/// and no index, however large, panics.
///
/// ```
/// use vhost_dirtylog::vmm::MigrationBitmap;
///
/// let bm = MigrationBitmap::new(1000)?;
/// // KVM-style bitmap for pages 100.. (not word aligned: takes the shift path)
/// assert_eq!(bm.merge_lebitmap(&[0b1011u64], 100, 64), 3);
/// assert_eq!(bm.iter().collect::<Vec<_>>(), [100, 101, 103]);
/// assert_eq!(bm.next_dirty(102), Some(103));
/// assert_eq!(bm.test_and_clear(100, 2), 2); // take pages 100 and 101 to send them
/// assert_eq!(bm.count_dirty(), 1);
/// # Ok::<(), vhost_dirtylog::vmm::VmmError>(())
/// ```
pub struct MigrationBitmap {
    table: ArcSwap<Table>,
    grow_lock: Mutex<()>,
}

impl std::fmt::Debug for MigrationBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.load();
        f.debug_struct("MigrationBitmap")
            .field("pages", &t.pages)
            .field("blocks", &t.blocks.len())
            .finish()
    }
}

impl MigrationBitmap {
    /// A clean bitmap of `pages` pages (zero is allowed: grow it later).
    ///
    /// Errors: as for [`grow`](Self::grow).
    pub fn new(pages: u64) -> Result<Self, VmmError> {
        let bm = MigrationBitmap {
            table: ArcSwap::from_pointee(Table::empty()),
            grow_lock: Mutex::new(()),
        };
        bm.grow(pages)?;
        Ok(bm)
    }

    /// Number of pages the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.table.load().pages
    }

    /// Grows the bitmap to `pages` pages (memory hotplug) and returns the previous page count.
    /// A `pages` at or below the current count changes nothing.
    ///
    /// The new pages start clean; to send the new memory in full, as QEMU does for a new RAM
    /// block, follow with `set_range(old, pages - old)`. Existing blocks are neither copied nor
    /// moved, and operations running concurrently on the previous table are not disturbed
    /// (they stay within the previous page count).
    ///
    /// Errors: more than [`MAX_PAGES`] pages, or the block table cannot be allocated (the
    /// bitmap is then unchanged). Blocks themselves are ordinary 32 KiB allocations.
    pub fn grow(&self, pages: u64) -> Result<u64, VmmError> {
        if pages > MAX_PAGES {
            return Err(VmmError::TooManyPages {
                pages,
                max: MAX_PAGES,
            });
        }
        let _grower = self.grow_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.table.load_full();
        if pages <= cur.pages {
            return Ok(cur.pages);
        }
        // `pages <= 2^40`, so the block count is at most 2^22.
        let nblocks = pages.div_ceil(BLOCK_PAGES) as usize;
        let mut blocks = Vec::new();
        blocks
            .try_reserve_exact(nblocks)
            .map_err(|_| VmmError::Alloc {
                bytes: nblocks * std::mem::size_of::<Block>(),
            })?;
        blocks.extend(cur.blocks.iter().cloned());
        while blocks.len() < nblocks {
            blocks.push(new_block()?);
        }
        self.table.store(Arc::new(Table { blocks, pages }));
        Ok(cur.pages)
    }

    /// Whether `page` is dirty (a relaxed read: a hint; to take a page for sending use
    /// [`test_and_clear`](Self::test_and_clear)). False past the end.
    pub fn test(&self, page: u64) -> bool {
        let t = self.table.load();
        page < t.pages && t.word(page / 64).load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// Marks pages `[first, first + npages)` dirty (clamped) and returns how many were clean
    /// before. One masked `fetch_or` per word.
    pub fn set_range(&self, first: u64, npages: u64) -> u64 {
        let t = self.table.load();
        let Some((first, end)) = t.clamp(first, npages) else {
            return 0;
        };
        let mut newly = 0;
        t.for_words(first, end, |_, w, mask| {
            let old = w.fetch_or(mask, Ordering::Release);
            newly += (mask & !old).count_ones() as u64;
            ControlFlow::<()>::Continue(())
        });
        newly
    }

    /// Marks every page dirty (the first pre-copy round sends everything) and returns how many
    /// were clean before.
    pub fn set_all(&self) -> u64 {
        self.set_range(0, u64::MAX)
    }

    /// Takes pages `[first, first + npages)` (clamped): clears them and returns how many were
    /// dirty. One Acquire swap per fully covered non-zero word, an Acquire `fetch_and` for a
    /// partial one, so a bit set concurrently is either returned here or stays set. Copy the
    /// pages *after* this call.
    pub fn test_and_clear(&self, first: u64, npages: u64) -> u64 {
        let t = self.table.load();
        let Some((first, end)) = t.clamp(first, npages) else {
            return 0;
        };
        let mut taken = 0;
        t.for_words(first, end, |_, w, mask| {
            taken += take_word(w, mask).count_ones() as u64;
            ControlFlow::<()>::Continue(())
        });
        taken
    }

    /// Clears pages `[first, first + npages)` (clamped); [`test_and_clear`](Self::test_and_clear)
    /// without the count.
    pub fn clear_range(&self, first: u64, npages: u64) {
        self.test_and_clear(first, npages);
    }

    /// Number of dirty pages (relaxed reads; exact when nothing runs concurrently).
    pub fn count_dirty(&self) -> u64 {
        let t = self.table.load();
        // Bits past `pages` are always zero, so whole blocks can be counted.
        t.blocks
            .iter()
            .flat_map(|b| b.iter())
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// The first dirty page at or after `from`, or `None` (also when `from` is past the end).
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let t = self.table.load();
        let (first, end) = t.clamp(from, u64::MAX)?;
        t.for_words(first, end, |j, w, mask| {
            let bits = w.load(Ordering::Relaxed) & mask;
            if bits != 0 {
                ControlFlow::Break(j * 64 + bits.trailing_zeros() as u64)
            } else {
                ControlFlow::Continue(())
            }
        })
    }

    /// Iterates over the dirty pages, in ascending order, without clearing them.
    pub fn iter(&self) -> DirtyPages {
        self.iter_range(0, u64::MAX)
    }

    /// Iterates over the dirty pages in `[first, first + npages)` (clamped), in ascending
    /// order, without clearing them. The iterator works on the table it started with: pages
    /// added by a later [`grow`](Self::grow) are not visited.
    pub fn iter_range(&self, first: u64, npages: u64) -> DirtyPages {
        let table = self.table.load_full();
        let (first, end) = table.clamp(first, npages).unwrap_or((0, 0));
        let (word, bits) = if first < end {
            let w = first / 64;
            (
                w,
                table.word(w).load(Ordering::Relaxed) & (!0u64 << (first % 64)),
            )
        } else {
            (0, 0)
        };
        DirtyPages {
            table,
            word,
            bits,
            end,
        }
    }

    /// A copy of the bitmap as little-endian words (`pages().div_ceil(64)` of them).
    pub fn snapshot(&self) -> Vec<u64> {
        let t = self.table.load();
        (0..t.pages.div_ceil(64))
            .map(|w| t.word(w).load(Ordering::Relaxed))
            .collect()
    }

    /// ORs a little-endian page bitmap into this one: bit `i` of `src` is page
    /// `start_page + i`, for `i < npages`. Returns the number of newly dirty pages.
    ///
    /// QEMU's `cpu_physical_memory_set_dirty_lebitmap`: when `start_page` is a multiple of 64
    /// each source word is ORed onto one bitmap word; otherwise each bitmap word is assembled
    /// from two source words with shifts. Clean source words cost one load. Clamped: bits past
    /// `npages`, past the end of `src` or past the end of the bitmap are ignored.
    pub fn merge_lebitmap<S: LeWords + ?Sized>(
        &self,
        src: &S,
        start_page: u64,
        npages: u64,
    ) -> u64 {
        let t = self.table.load();
        let src_bits = (src.word_count() as u64).saturating_mul(64);
        merge_core(
            &t,
            src_bits,
            start_page,
            npages,
            |i| src.all_zero(i, GROUP),
            |i, mask| src.word(i) & mask,
        )
    }

    /// Consumes a vhost-user log into the bitmap: log page `i` is bitmap page `base_page + i`
    /// (`base_page` is 0 when, as usual, both are indexed by guest-physical address). Returns
    /// the number of newly dirty pages.
    ///
    /// Clean words cost one relaxed load. A dirty word is taken with `swap(0, Acquire)`, so
    /// exactly the bits it cleared are ORed into the bitmap and a mark the backend makes at any
    /// moment is either taken now or stays in the log (DESIGN.md invariants 2 and 3). Log bits
    /// that map past the end of the bitmap are left in the log (taken by a masked
    /// `fetch_and`), to be merged once the bitmap has grown. Log tail bytes (a log whose size is
    /// not a multiple of 8) are consumed the same way, byte by byte.
    pub fn sync_from_log<L: AsRef<LogRegion> + ?Sized>(&self, log: &L, base_page: u64) -> u64 {
        let log = log.as_ref();
        let t = self.table.load();
        let words = log.words();
        let src_bits = words.len() as u64 * 64;
        let mut newly = merge_core(
            &t,
            src_bits,
            base_page,
            u64::MAX,
            |i| all_zero(&words[i..i + GROUP]),
            |i, mask| take_word(&words[i], mask),
        );
        let tail = log.tail();
        if !tail.is_empty() {
            newly += merge_tail(&t, tail, base_page.checked_add(src_bits), |_, b, mask| {
                if b.load(Ordering::Relaxed) & mask == 0 {
                    0
                } else {
                    b.fetch_and(!mask, Ordering::Acquire) & mask
                }
            });
        }
        newly
    }

    /// Merges a log the backend no longer writes (replaced by a new one with `SET_LOG_BASE`
    /// and acknowledged), so nothing marked in it before the switch is lost; see the resize
    /// flow in the [module docs](super). Same as `sync_from_log(retired, 0)`.
    pub fn drain_log(&self, retired: &SharedLog) -> u64 {
        self.sync_from_log(retired, 0)
    }

    /// Deferred mode, step 1: ORs the log into the bitmap *without clearing it*, and remembers
    /// exactly which bits it saw. Returns them for [`clear_fetched`](Self::clear_fetched) /
    /// [`FetchedLog::clear_pages`]; the number of newly dirty pages is
    /// [`FetchedLog::newly_dirty`].
    ///
    /// Like `KVM_CLEAR_DIRTY_LOG`, this splits the round into a cheap read of the whole log
    /// and clears that can be done chunk by chunk right before each chunk is sent, so a page
    /// the backend dirties again between fetch and send is sent once, not twice.
    ///
    /// Contract: clear a chunk's fetched bits *before* sending any page of that chunk, and let
    /// nothing else consume this log (another sync) between fetch and clear. Allocates the
    /// record (one `u64` per log word); reuse one with [`fetch_log_into`](Self::fetch_log_into).
    pub fn fetch_log<L: AsRef<LogRegion> + ?Sized>(&self, log: &L, base_page: u64) -> FetchedLog {
        let mut fetched = FetchedLog::default();
        self.fetch_log_into(log, base_page, &mut fetched);
        fetched
    }

    /// [`fetch_log`](Self::fetch_log) into an existing record, reusing its memory (no
    /// allocation once it has held a log of this size). Returns the number of newly dirty pages.
    /// Whatever `fetched` held before is forgotten: bits it had not cleared yet simply stay in
    /// the log (already merged) and are fetched again.
    pub fn fetch_log_into<L: AsRef<LogRegion> + ?Sized>(
        &self,
        log: &L,
        base_page: u64,
        fetched: &mut FetchedLog,
    ) -> u64 {
        let log = log.as_ref();
        let t = self.table.load();
        let words = log.words();
        fetched.reset(log, base_page);
        let seen = &mut fetched.seen;
        let src_bits = words.len() as u64 * 64;
        let clean = |i: usize| all_zero(&words[i..i + GROUP]);
        let mut newly = merge_core(&t, src_bits, base_page, u64::MAX, clean, |i, mask| {
            let v = words[i].load(Ordering::Relaxed) & mask;
            if v != 0 {
                // Acquire for the marks we saw, only where there are any.
                fence(Ordering::Acquire);
                seen[i] = v;
            }
            v
        });
        let seen_tail = &mut fetched.seen_tail;
        newly += merge_tail(
            &t,
            log.tail(),
            base_page.checked_add(src_bits),
            |k, b, mask| {
                let v = b.load(Ordering::Relaxed) & mask;
                if v != 0 {
                    fence(Ordering::Acquire);
                    seen_tail[k] = v;
                }
                v
            },
        );
        fetched.newly_dirty = newly;
        newly
    }

    /// Deferred mode, step 2, all at once: clears the bits `fetched` saw from `log`, chunk by
    /// chunk of `chunk_pages` pages (use [`DEFAULT_CLEAR_CHUNK_PAGES`]), and returns how many
    /// bits were cleared. Each word is cleared with `fetch_and(!seen, AcqRel)`: a bit the
    /// backend set after the fetch is kept. To interleave clearing with sending, call
    /// [`FetchedLog::clear_pages`] per chunk instead.
    ///
    /// Errors: `chunk_pages == 0`, or `fetched` came from another log.
    pub fn clear_fetched<L: AsRef<LogRegion> + ?Sized>(
        &self,
        log: &L,
        fetched: &mut FetchedLog,
        chunk_pages: u64,
    ) -> Result<u64, VmmError> {
        if chunk_pages == 0 {
            return Err(VmmError::ZeroChunk);
        }
        let log = log.as_ref();
        fetched.check_log(log)?;
        let (base, end) = (
            fetched.base_page,
            fetched.base_page.saturating_add(log.pages()),
        );
        let mut cleared = 0;
        let mut first = base;
        while first < end {
            cleared += fetched.clear_pages(log, first, chunk_pages)?;
            first = first.saturating_add(chunk_pages);
        }
        Ok(cleared)
    }
}

/// Iterator over dirty pages, from [`MigrationBitmap::iter`] / [`iter_range`](MigrationBitmap::iter_range).
///
/// Reads words with relaxed loads as it goes (a page dirtied behind the cursor is not
/// revisited; one ahead of it is seen). Holds the bitmap's block table, not a lock.
pub struct DirtyPages {
    table: Arc<Table>,
    word: u64,
    /// Not yet returned bits of `word`.
    bits: u64,
    /// One past the last page to visit.
    end: u64,
}

impl std::fmt::Debug for DirtyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyPages")
            .field("word", &self.word)
            .field("end", &self.end)
            .finish()
    }
}

impl Iterator for DirtyPages {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        loop {
            if self.bits != 0 {
                let page = self.word * 64 + self.bits.trailing_zeros() as u64;
                self.bits &= self.bits - 1;
                if page >= self.end {
                    self.bits = 0;
                    self.word = self.end.div_ceil(64);
                    return None;
                }
                return Some(page);
            }
            self.word += 1;
            if self.word.saturating_mul(64) >= self.end {
                self.word = self.end.div_ceil(64);
                return None;
            }
            self.bits = self.table.word(self.word).load(Ordering::Relaxed);
        }
    }
}

/// The bits [`MigrationBitmap::fetch_log`] saw in a log (and merged), to be cleared from the
/// log later, chunk by chunk.
///
/// Each bit is cleared at most once: clearing consumes the record, so clearing a chunk twice
/// never erases a mark the backend made after the first clear.
#[derive(Default)]
pub struct FetchedLog {
    /// Bits seen per log word, not yet cleared.
    seen: Vec<u64>,
    /// Bits seen per log tail byte, not yet cleared.
    seen_tail: [u8; 8],
    /// Identity of the log: address of its first byte and its length.
    log_addr: usize,
    log_len: usize,
    base_page: u64,
    newly_dirty: u64,
}

impl std::fmt::Debug for FetchedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchedLog")
            .field("base_page", &self.base_page)
            .field("log_len", &self.log_len)
            .field("pending_pages", &self.pending_pages())
            .field("newly_dirty", &self.newly_dirty)
            .finish()
    }
}

impl FetchedLog {
    /// An empty record (nothing to clear); fill it with [`MigrationBitmap::fetch_log_into`].
    pub fn new() -> Self {
        Self::default()
    }

    fn reset(&mut self, log: &LogRegion, base_page: u64) {
        self.seen.clear();
        // Reuses the capacity: no allocation when the log has not grown.
        self.seen.resize(log.words().len(), 0);
        self.seen_tail = [0; 8];
        self.log_addr = log.words().as_ptr() as usize;
        self.log_len = log.len_bytes();
        self.base_page = base_page;
        self.newly_dirty = 0;
    }

    fn check_log(&self, log: &LogRegion) -> Result<(), VmmError> {
        if log.words().as_ptr() as usize != self.log_addr || log.len_bytes() != self.log_len {
            return Err(VmmError::FetchMismatch);
        }
        Ok(())
    }

    /// Pages the fetch found newly dirty in the bitmap.
    pub fn newly_dirty(&self) -> u64 {
        self.newly_dirty
    }

    /// The bitmap page of log page 0, as passed to the fetch.
    pub fn base_page(&self) -> u64 {
        self.base_page
    }

    /// Number of fetched bits not yet cleared from the log.
    pub fn pending_pages(&self) -> u64 {
        let w: u64 = self.seen.iter().map(|v| v.count_ones() as u64).sum();
        let t: u64 = self.seen_tail.iter().map(|v| v.count_ones() as u64).sum();
        w + t
    }

    /// Clears from `log` the fetched bits of bitmap pages `[first_page, first_page + npages)`
    /// and returns how many were cleared. Call it right *before* sending those pages.
    ///
    /// One `fetch_and(!seen, AcqRel)` per word with fetched bits in the range (words with none
    /// are skipped without touching the log): bits the backend set after the fetch stay in the
    /// log for the next round, and the Acquire orders the send after every mark the clear
    /// absorbed. Pages outside the log or the range are ignored.
    ///
    /// Errors: `log` is not the log this record was fetched from.
    pub fn clear_pages<L: AsRef<LogRegion> + ?Sized>(
        &mut self,
        log: &L,
        first_page: u64,
        npages: u64,
    ) -> Result<u64, VmmError> {
        let log = log.as_ref();
        self.check_log(log)?;
        // To log pages, clamped to the log.
        let end = first_page
            .saturating_add(npages)
            .saturating_sub(self.base_page)
            .min(log.pages());
        let first = first_page.saturating_sub(self.base_page);
        if first >= end {
            return Ok(0);
        }
        let words = log.words();
        let whole = words.len() as u64 * 64;
        let mut cleared = 0;
        if first < whole {
            let (w0, w1, m0, m1) = word_span(first, end.min(whole));
            for w in w0..=w1 {
                let mut mask = !0u64;
                if w == w0 {
                    mask &= m0;
                }
                if w == w1 {
                    mask &= m1;
                }
                let seen = &mut self.seen[w as usize];
                let s = *seen & mask;
                if s != 0 {
                    words[w as usize].fetch_and(!s, Ordering::AcqRel);
                    *seen &= !s;
                    cleared += s.count_ones() as u64;
                }
            }
        }
        if end > whole {
            let tail = log.tail();
            let (b0, b1, m0, m1) = {
                let (f, e) = (first.max(whole) - whole, end - whole);
                let (b0, b1) = (f / 8, (e - 1) / 8);
                (b0, b1, 0xffu8 << (f % 8), 0xffu8 >> (7 - (e - 1) % 8))
            };
            for b in b0..=b1 {
                let mut mask = 0xffu8;
                if b == b0 {
                    mask &= m0;
                }
                if b == b1 {
                    mask &= m1;
                }
                let seen = &mut self.seen_tail[b as usize];
                let s = *seen & mask;
                if s != 0 {
                    tail[b as usize].fetch_and(!s, Ordering::AcqRel);
                    *seen &= !s;
                    cleared += s.count_ones() as u64;
                }
            }
        }
        Ok(cleared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_constants() {
        assert_eq!(BLOCK_WORDS, 4096);
        assert_eq!(1u64 << BLOCK_WORD_SHIFT, BLOCK_WORDS as u64);
    }

    #[test]
    fn shift_path_crosses_words_and_blocks() {
        let bm = MigrationBitmap::new(BLOCK_PAGES * 2).unwrap();
        // Two full source words starting 3 pages before a block boundary.
        let start = BLOCK_PAGES - 3;
        assert_eq!(bm.merge_lebitmap(&[!0u64, 1], start, 65), 65);
        assert_eq!(bm.count_dirty(), 65);
        assert_eq!(bm.next_dirty(0), Some(start));
        assert!(bm.test(start + 64) && !bm.test(start + 65));
        assert_eq!(bm.iter().count(), 65);
    }

    #[test]
    fn iterator_respects_range_end() {
        let bm = MigrationBitmap::new(300).unwrap();
        bm.set_all();
        assert_eq!(bm.count_dirty(), 300);
        let v: Vec<u64> = bm.iter_range(62, 5).collect();
        assert_eq!(v, [62, 63, 64, 65, 66]);
        assert_eq!(bm.iter_range(299, 100).collect::<Vec<_>>(), [299]);
        assert_eq!(bm.iter_range(300, 1).count(), 0);
    }
}
