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
//! The table is published through [`arc_swap::ArcSwap`]: loading it is lock-free (growth
//! never blocks a sync, merge or iteration), and the old table is freed when its last reader
//! is done. Growers serialize on a mutex that only growers take. (Writers of *bits* serialize
//! on a separate writer lock, one block at a time; see "What a dirty word costs".) We chose this over a
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
//! All merges share one word loop (`merge_core`). It reads the source 64 words at a time: the
//! words of a chunk are ORed together with plain loads, eight at a time, so a clean stretch of
//! log costs about what reading it costs (most of a sparse log is clean); a dirty chunk gets a
//! mask of its non-zero words, which the loop walks with `trailing_zeros`, so the branch
//! predictor never has to guess which words of a sparse log are dirty. For each dirty word it
//! asks the source for the bits it *consumes* (a plain read for
//! [`merge_lebitmap`](MigrationBitmap::merge_lebitmap), an atomic swap for
//! [`sync_from_log`](MigrationBitmap::sync_from_log), a read that is remembered for
//! [`fetch_log`](MigrationBitmap::fetch_log)), ORs them into the bitmap and counts newly dirty
//! pages as `popcount(new & !old)`. The loop looks two chunks ahead, so the bitmap lines a
//! dirty chunk will be ORed into are prefetched while the chunks before it are merged. When the
//! destination page is a multiple of 64 (the common case: the log and the bitmap are both
//! indexed from guest-physical 0) source word `i` lands on bitmap word `start / 64 + i` as is,
//! in one pass. Otherwise each bitmap word is `src[i] << off | src[i - 1] >> (64 - off)`: the
//! chunk's dirty words are taken first, then the bitmap words they touch are assembled, the
//! top bits of a chunk's last word carried into the next chunk. Still one read of the source
//! and one store per bitmap word, never a loop over bits.
//!
//! ## What a dirty word costs
//! One locked instruction: the Acquire swap that takes it out of the log, which cannot go (the
//! backend ORs into the log concurrently, and the swap is what makes clearing lossless:
//! DESIGN.md invariant 3). The OR into the bitmap is a plain load and store, because every
//! writer of the bitmap holds its writer lock (see `Writer`; QEMU's
//! `cpu_physical_memory_sync_dirty_bitmap` does the same under `bitmap_mutex`), which halves the
//! locked instructions of a dense sync. `benches/merge.rs` measures the sync against a plain
//! scan of the log and against the *swap floor* (the scan plus one swap per dirty word, the
//! least any sync that keeps invariant 3 can cost).
//!
//! Sources are clamped, never trusted: bits past `npages`, past the source, or mapping past the
//! end of the bitmap are neither merged nor (for the log) cleared.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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

/// The bits of word `j` that lie inside a span from [`word_span`].
#[inline(always)]
fn span_mask(j: u64, (w0, w1, m0, m1): (u64, u64, u64, u64)) -> u64 {
    let mut mask = !0u64;
    if j == w0 {
        mask &= m0;
    }
    if j == w1 {
        mask &= m1;
    }
    mask
}

/// Calls `f(word, mask)` for every bitmap word overlapping pages `[first, end)` (`first < end`),
/// `mask` selecting the range's bits in it.
#[inline(always)]
fn for_masks(first: u64, end: u64, mut f: impl FnMut(u64, u64)) {
    let span = word_span(first, end);
    for w in span.0..=span.1 {
        f(w, span_mask(w, span));
    }
}

/// Exclusive write access to the bitmap's words, one block at a time.
///
/// Every operation that changes bits (the merges, [`MigrationBitmap::set_range`],
/// [`MigrationBitmap::test_and_clear`]) goes through a `Writer`. It takes the bitmap's writer
/// lock when it first touches a block and lets go of it when it moves to another block, so a
/// sync of a large guest holds off a concurrent `test_and_clear` for at most one block's worth
/// of words (4096), and never takes the lock for a stretch of clean log.
///
/// Under the lock a word is updated with a plain load and store instead of a locked RMW: QEMU's
/// `cpu_physical_memory_sync_dirty_bitmap` ORs into the migration bitmap the same way, under
/// `bitmap_mutex`. That leaves one locked instruction per dirty log word (the log swap, which
/// must stay: the backend writes the log concurrently), half of what an atomic OR costs on top.
/// Readers do not lock: each word changes by a single store, so a reader sees the word before
/// or after it.
struct Writer<'a> {
    t: &'a Table,
    lock: &'a Mutex<()>,
    guard: Option<MutexGuard<'a, ()>>,
    /// Index of the block the lock is held for (`usize::MAX`: none yet) and its words.
    block: usize,
    words: &'a [AtomicU64],
}

impl<'a> Writer<'a> {
    fn new(t: &'a Table, lock: &'a Mutex<()>) -> Self {
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
    fn word(&mut self, w: u64) -> &'a AtomicU64 {
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
    fn or(&mut self, w: u64, v: u64) -> u64 {
        or_word(self.word(w), v)
    }

    /// Bitmap words `first..first + len`, locked for writing, if they lie in one block (all
    /// inside the bitmap: callers clamp).
    #[inline(always)]
    fn span(&mut self, first: u64, len: usize) -> Option<&'a [AtomicU64]> {
        let at = first as usize & (BLOCK_WORDS - 1);
        if at + len > BLOCK_WORDS {
            return None;
        }
        self.word(first);
        Some(&self.words[at..at + len])
    }

    /// ORs `vals[k]` into bitmap word `first + k` for every bit `k` of `mask` (all inside the
    /// bitmap) and returns how many bits were newly set: [`or`](Self::or) for a chunk, with the
    /// block lookup and the lock check done once per block instead of once per word.
    #[inline(always)]
    fn or_chunk(&mut self, first: u64, vals: &[u64; CHUNK], mut mask: u64) -> u64 {
        let mut newly = 0;
        while mask != 0 {
            let at = first + mask.trailing_zeros() as u64;
            self.word(at);
            // The part of the chunk inside the block of `at`.
            let block_first = at & !(BLOCK_WORDS as u64 - 1);
            let room = block_first + BLOCK_WORDS as u64 - first;
            let part = mask & low_bits(room);
            mask &= !part;
            let words = self.words;
            let or_one =
                |k: usize, v: u64| or_word(&words[(first + k as u64 - block_first) as usize], v);
            if part == !0 {
                newly += vals
                    .iter()
                    .enumerate()
                    .map(|(k, v)| or_one(k, *v))
                    .sum::<u64>();
            } else {
                let mut m = part;
                while m != 0 {
                    let k = m.trailing_zeros() as usize;
                    m &= m - 1;
                    newly += or_one(k, vals[k]);
                }
            }
        }
        newly
    }

    /// Clears `mask`'s bits of word `w` and returns those that were set.
    #[inline(always)]
    fn take(&mut self, w: u64, mask: u64) -> u64 {
        let word = self.word(w);
        let old = word.load(Ordering::Relaxed);
        let taken = old & mask;
        if taken != 0 {
            word.store(old & !mask, Ordering::Relaxed);
        }
        taken
    }

    /// ORs `bits` (bit `i` = page `page + i`, all inside the bitmap) into the bitmap.
    #[inline]
    fn or_bits(&mut self, page: u64, bits: u64) -> u64 {
        let (w, off) = (page / 64, (page % 64) as u32);
        let lo = bits << off;
        let hi = spill(bits, off);
        let mut newly = 0;
        if lo != 0 {
            newly += self.or(w, lo);
        }
        if hi != 0 {
            newly += self.or(w + 1, hi);
        }
        newly
    }
}

/// ORs `v` into a bitmap word the caller holds the writer lock for, with a plain load and a
/// Release store, and returns how many of `v`'s bits were newly set.
#[inline(always)]
fn or_word(word: &AtomicU64, v: u64) -> u64 {
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

/// The bits of `v << off` that fall into the next word (`0` when `off == 0`).
#[inline(always)]
fn spill(v: u64, off: u32) -> u64 {
    ((u128::from(v) << off) >> 64) as u64
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

    /// Prefetches, for writing, the cache lines of bitmap words `first + k` for the bits `k`
    /// of `mask` (one prefetch per group of 8 words). A hint only: no lock, no effect on
    /// correctness; words past the bitmap are skipped.
    #[inline(always)]
    fn prefetch(&self, first: u64, mut mask: u64) {
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

/// Source words examined at a time: a clean chunk costs `CHUNK` plain loads ORed together and
/// one well-predicted branch, close to the cost of merely reading the log; a dirty one gets a
/// mask of its non-zero words, which the loop visits with `trailing_zeros`, so the branch
/// predictor never has to guess which words of a sparse log are dirty.
const CHUNK: usize = 64;

/// How many chunks ahead `merge_core` looks for dirty words and prefetches their bitmap lines.
const AHEAD: usize = 2;

/// The word loop every merge uses (see the module docs).
///
/// `nonzero(i, n)` returns, without consuming anything, the mask of the non-zero words among
/// source words `i..i + n` (`n <= CHUNK`; bit `k` = word `i + k`); `take(i, mask)` returns the
/// bits of source word `i` selected by `mask` that the source gives up (and, for a log, has
/// cleared). The loop never asks for bits that map past `npages`, past `src_bits` or past the
/// end of the bitmap. Returns the number of newly dirty pages.
///
/// Works a chunk of `CHUNK` source words at a time. Source word `i` lands on bitmap word
/// `d0 + i` shifted left by `off`. Aligned (`off == 0`), a chunk is one pass: each dirty word is
/// taken and ORed into its bitmap word right away. Otherwise (or when the chunk's bitmap words
/// straddle a block boundary) it takes two steps: the chunk's dirty words are taken into a local
/// array, then the bitmap words they touch are assembled and ORed in; the top `off` bits of a
/// word belong to the next bitmap word and are carried there (across chunks too), so each
/// bitmap word still gets one store.
#[inline(always)]
fn merge_core(
    w: &mut Writer,
    src_bits: u64,
    start_page: u64,
    npages: u64,
    nonzero: impl Fn(usize, usize) -> u64,
    mut take: impl FnMut(usize, u64) -> u64,
) -> u64 {
    let pages = w.t.pages;
    if start_page >= pages {
        return 0;
    }
    let n = npages.min(src_bits).min(pages - start_page);
    if n == 0 {
        return 0;
    }
    // `n <= src_bits`, the bit length of an in-memory slice, so the word count fits a usize.
    let nwords = n.div_ceil(64) as usize;
    // Every word is taken whole except the last, which is taken with `last_mask`.
    let last = nwords - 1;
    let last_mask = low_bits(n - last as u64 * 64);
    let (d0, off) = (start_page / 64, (start_page % 64) as u32);
    let mut vals = [0u64; CHUNK];
    let mut newly = 0;
    // Shift path: the bits the last word of the previous chunk spilled into the first bitmap
    // word of this one.
    let mut carry = 0u64;
    // The masks of the next `AHEAD` chunks, found (and their bitmap lines prefetched) ahead
    // of time, so those misses overlap the work in between instead of each stalling the swap
    // that follows it. Chunk `j` starts at source word `j * CHUNK`.
    let chunks = nwords.div_ceil(CHUNK);
    let mut ahead = [0u64; AHEAD];
    let look = |j: usize| -> u64 {
        if j >= chunks {
            return 0;
        }
        let first = j * CHUNK;
        let m = nonzero(first, CHUNK.min(nwords - first));
        if m != 0 {
            w.t.prefetch(d0 + first as u64, m);
        }
        m
    };
    for (j, m) in ahead.iter_mut().enumerate() {
        *m = look(j);
    }
    for j in 0..chunks {
        let c0 = j * CHUNK;
        let len = CHUNK.min(nwords - c0);
        let dirty = ahead[j % AHEAD];
        ahead[j % AHEAD] = look(j + AHEAD);
        if dirty == 0 && carry == 0 {
            continue;
        }
        let mut take_at = |k: usize| take(c0 + k, if c0 + k == last { last_mask } else { !0 });
        if off == 0 {
            if let Some(dst) = w.span(d0 + c0 as u64, len) {
                // Aligned fast path, one pass: each swap is followed by its OR, which keeps
                // the core busy while the next locked instruction waits.
                let mut one = |k: usize| or_word(&dst[k], take_at(k));
                if dirty == !0 {
                    newly += (0..CHUNK).map(&mut one).sum::<u64>();
                } else {
                    let mut m = dirty;
                    while m != 0 {
                        let k = m.trailing_zeros() as usize;
                        m &= m - 1;
                        newly += one(k);
                    }
                }
                continue;
            }
        }
        if dirty == !0 {
            // A fully dirty chunk (dense logs): a straight loop beats walking the mask.
            for (k, v) in vals.iter_mut().enumerate() {
                *v = take_at(k);
            }
        } else {
            vals = [0; CHUNK];
            let mut m = dirty;
            while m != 0 {
                let k = m.trailing_zeros() as usize;
                m &= m - 1;
                vals[k] = take_at(k);
            }
        }
        let mut out = dirty;
        if off != 0 {
            // Bitmap word k = vals[k] << off | vals[k - 1] >> (64 - off), word 0 taking the
            // carry; the words that get bits are the dirty ones and those right after them.
            let spilled = spill(vals[len - 1], off);
            out |= dirty << 1 | u64::from(carry != 0);
            if len < CHUNK {
                out &= low_bits(len as u64);
            }
            if let Some(dst) = w.span(d0 + c0 as u64, len) {
                let mut m = out;
                while m != 0 {
                    let k = m.trailing_zeros() as usize;
                    m &= m - 1;
                    let below = if k == 0 {
                        carry
                    } else {
                        spill(vals[k - 1], off)
                    };
                    newly += or_word(&dst[k], vals[k] << off | below);
                }
                carry = spilled;
                continue;
            }
            // The chunk straddles two blocks: shift in place, from the top, and let `or_chunk`
            // split it.
            for k in (1..len).rev() {
                vals[k] = vals[k] << off | spill(vals[k - 1], off);
            }
            vals[0] = vals[0] << off | carry;
            carry = spilled;
        }
        newly += w.or_chunk(d0 + c0 as u64, &vals, out);
    }
    if carry != 0 {
        // Only bits of pages inside the bitmap were taken, so this word exists.
        newly += w.or(d0 + nwords as u64, carry);
    }
    newly
}

/// The byte-granular part of a log whose length is not a multiple of 8: `take(k, byte, mask)`
/// returns the consumed bits of tail byte `k` among `mask`; byte `k` covers bitmap pages
/// `first_page + 8k ..`.
fn merge_tail(
    w: &mut Writer,
    tail: &[LogByte],
    first_page: Option<u64>,
    mut take: impl FnMut(usize, &LogByte, u8) -> u8,
) -> u64 {
    let Some(first_page) = first_page else {
        return 0;
    };
    let pages = w.t.pages;
    let mut newly = 0;
    for (k, byte) in tail.iter().enumerate() {
        let page = first_page.saturating_add(k as u64 * 8);
        if page >= pages {
            break;
        }
        let mask = low_bits((pages - page).min(8)) as u8;
        let v = take(k, byte, mask);
        if v != 0 {
            newly += w.or_bits(page, v as u64);
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
    /// Mask of the non-zero words among `first..first + count` (`count <= 64`, all below
    /// `word_count()`): bit `k` set iff word `first + k` is not zero. The default checks
    /// [`all_zero`](Self::all_zero) first, so a clean stretch costs only that check.
    #[inline(always)]
    fn nonzero_mask(&self, first: usize, count: usize) -> u64 {
        if self.all_zero(first, count) {
            return 0;
        }
        chunk_mask(count, |k| self.word(first + k))
    }
}

/// `1` if `v != 0`, else `0`, without a branch.
#[inline(always)]
fn nonzero_bit(v: u64) -> u64 {
    (v | v.wrapping_neg()) >> 63
}

/// The mask of the non-zero words among `count <= 64` words read by `load(k)`, in two levels:
/// which groups of 8 have a non-zero word (ORs of plain loads), then which words of those
/// groups. Branch-free apart from the loop over dirty groups, and only dirty groups pay for a
/// per-word test.
#[inline(always)]
fn chunk_mask(count: usize, load: impl Fn(usize) -> u64) -> u64 {
    if count < CHUNK {
        return (0..count).fold(0, |m, k| m | nonzero_bit(load(k)) << k);
    }
    let mut groups = 0u64;
    for g in 0..CHUNK / 8 {
        let any = (0..8).fold(0, |a, k| a | load(g * 8 + k));
        groups |= nonzero_bit(any) << g;
    }
    let mut mask = 0;
    while groups != 0 {
        let g = groups.trailing_zeros() as usize;
        groups &= groups - 1;
        let words = (0..8).fold(0, |m, k| m | nonzero_bit(load(g * 8 + k)) << k);
        mask |= words << (g * 8);
    }
    mask
}

/// [`LeWords::nonzero_mask`] for a log slice (at most 64 words): relaxed loads.
#[inline(always)]
fn nonzero_mask<W: Word>(words: &[W]) -> u64 {
    chunk_mask(words.len(), |k| words[k].load(Ordering::Relaxed))
}

/// Takes a whole log word the chunk loop found non-zero: one Acquire swap.
#[inline(always)]
fn take_log_word<W: Word>(w: &W, mask: u64) -> u64 {
    if mask == !0 {
        w.swap(0, Ordering::Acquire)
    } else {
        take_word(w, mask)
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

/// Owned and fixed-size sources read as the slice they hold (same fast `all_zero`).
macro_rules! le_words_as_slice {
    ($(impl$([$($g:tt)*])? for $t:ty => $s:ty;)*) => {$(
        impl$(<$($g)*>)? LeWords for $t {
            #[inline(always)]
            fn word_count(&self) -> usize {
                <$s as LeWords>::word_count(&self[..])
            }
            #[inline(always)]
            fn word(&self, i: usize) -> u64 {
                <$s as LeWords>::word(&self[..], i)
            }
            #[inline(always)]
            fn all_zero(&self, first: usize, count: usize) -> bool {
                <$s as LeWords>::all_zero(&self[..], first, count)
            }
        }
    )*};
}
le_words_as_slice! {
    impl[const N: usize] for [u64; N] => [u64];
    impl for Vec<u64> => [u64];
    impl for Vec<AtomicU64> => [AtomicU64];
}

/// The VMM's migration bitmap: one bit per 4 KiB guest page, set = "must be sent (again)".
///
/// Every method takes `&self`: the syncing thread, the sending thread and a hotplug thread
/// can share one bitmap (e.g. in an `Arc`). Readers ([`test`](Self::test),
/// [`next_dirty`](Self::next_dirty), [`iter`](Self::iter), [`count_dirty`](Self::count_dirty),
/// [`snapshot`](Self::snapshot)) never lock. Writers (the merges, [`set_range`](Self::set_range),
/// [`test_and_clear`](Self::test_and_clear)) serialize on a writer lock that a merge holds for
/// one 1 GiB block at a time, so under it a word is updated with a plain load and store, as
/// QEMU's migration bitmap is under `bitmap_mutex`: one locked instruction fewer per dirty
/// word of a sync. [`grow`](Self::grow) only serializes against other growers.
///
/// Storage: blocks of [`BLOCK_PAGES`] pages (32 KiB, 1 GiB of guest memory each) behind an
/// append-only block table published with `arc-swap`, as QEMU's `DirtyMemoryBlocks` do:
/// growing for memory hotplug allocates new blocks and a new table of pointers, and never
/// copies, moves or locks an existing block, so syncs running during the growth keep writing
/// into live memory. (A fixed-capacity table of `OnceLock` blocks would avoid the table swap
/// but cost 64 MiB of slots per bitmap to cover [`MAX_PAGES`].)
///
/// Ordering: bits are set under the writer lock after the log was consumed with Acquire, and
/// taken under the same lock ([`test_and_clear`](Self::test_and_clear)), so whoever takes a
/// page's bit and then copies the page sees the data the backend wrote before marking it.
///
/// A [`LeWords`] source passed to [`merge_lebitmap`](Self::merge_lebitmap) is read while the
/// writer lock is held: its methods must not write to this bitmap.
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
    /// Serializes the writers of bits (see `Writer`); readers never take it.
    writer: Mutex<()>,
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
            writer: Mutex::new(()),
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
    /// before. Under the writer lock, one plain masked OR per word.
    pub fn set_range(&self, first: u64, npages: u64) -> u64 {
        let t = self.table.load();
        let Some((first, end)) = t.clamp(first, npages) else {
            return 0;
        };
        let mut w = Writer::new(&t, &self.writer);
        let mut newly = 0;
        for_masks(first, end, |j, mask| newly += w.or(j, mask));
        newly
    }

    /// Marks every page dirty (the first pre-copy round sends everything) and returns how many
    /// were clean before.
    pub fn set_all(&self) -> u64 {
        self.set_range(0, u64::MAX)
    }

    /// Takes pages `[first, first + npages)` (clamped): clears them and returns how many were
    /// dirty. Under the writer lock (which every setter holds too), so a bit set concurrently
    /// is either returned here or stays set, and the lock orders this call after the sync that
    /// set the bit. Copy the pages *after* this call.
    pub fn test_and_clear(&self, first: u64, npages: u64) -> u64 {
        let t = self.table.load();
        let Some((first, end)) = t.clamp(first, npages) else {
            return 0;
        };
        let mut w = Writer::new(&t, &self.writer);
        let mut taken = 0;
        for_masks(first, end, |j, mask| {
            taken += w.take(j, mask).count_ones() as u64;
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
        let mut w = Writer::new(&t, &self.writer);
        merge_core(
            &mut w,
            src_bits,
            start_page,
            npages,
            |i, n| src.nonzero_mask(i, n),
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
        let mut w = Writer::new(&t, &self.writer);
        let mut newly = merge_core(
            &mut w,
            src_bits,
            base_page,
            u64::MAX,
            |i, n| nonzero_mask(&words[i..i + n]),
            |i, mask| take_log_word(&words[i], mask),
        );
        let tail = log.tail();
        if !tail.is_empty() {
            newly += merge_tail(
                &mut w,
                tail,
                base_page.checked_add(src_bits),
                |_, b, mask| {
                    if b.load(Ordering::Relaxed) & mask == 0 {
                        0
                    } else {
                        b.fetch_and(!mask, Ordering::Acquire) & mask
                    }
                },
            );
        }
        newly
    }

    /// Merges a log the backend no longer writes (replaced by a new one with `SET_LOG_BASE`
    /// and acknowledged), so nothing marked in it before the switch is lost; see the resize
    /// flow in the [module docs](super). Same as `sync_from_log(retired, 0)`.
    pub fn drain_log(&self, retired: &SharedLog) -> u64 {
        self.sync_from_log(retired, 0)
    }

    /// Flip sync (`super::flip`): merges a *retired* log (one no backend can write any more:
    /// replaced by a replied `SET_LOG_BASE`) with plain loads, and clears exactly the bits it
    /// merged with plain stores, so the log can be handed out again. Same loop as
    /// [`sync_from_log`](Self::sync_from_log), the swap replaced by a load and a store; bits
    /// that map past the end of the bitmap are neither merged nor cleared. Returns the number
    /// of newly dirty pages.
    ///
    /// Crate-private (DESIGN.md invariant 3): only `LogFlip` knows that the log is retired.
    pub(crate) fn merge_retired(&self, log: &LogRegion, base_page: u64) -> u64 {
        let t = self.table.load();
        let words = log.words();
        let src_bits = words.len() as u64 * 64;
        let mut w = Writer::new(&t, &self.writer);
        let mut newly = merge_core(
            &mut w,
            src_bits,
            base_page,
            u64::MAX,
            |i, n| nonzero_mask(&words[i..i + n]),
            |i, mask| {
                let old = words[i].load(Ordering::Relaxed);
                let v = old & mask;
                if v != 0 {
                    words[i].store(old & !mask, Ordering::Relaxed);
                }
                v
            },
        );
        let tail = log.tail();
        if !tail.is_empty() {
            newly += merge_tail(
                &mut w,
                tail,
                base_page.checked_add(src_bits),
                |_, b, mask| {
                    let old = b.load(Ordering::Relaxed);
                    if old & mask != 0 {
                        b.store(old & !mask, Ordering::Relaxed);
                    }
                    old & mask
                },
            );
        }
        newly
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
    /// record (16 bytes per dirty log word); reuse one with
    /// [`fetch_log_into`](Self::fetch_log_into).
    pub fn fetch_log<L: AsRef<LogRegion> + ?Sized>(&self, log: &L, base_page: u64) -> FetchedLog {
        let mut fetched = FetchedLog::default();
        self.fetch_log_into(log, base_page, &mut fetched);
        fetched
    }

    /// [`fetch_log`](Self::fetch_log) into an existing record, reusing its memory (no
    /// allocation once it has held as many dirty words). Returns the number of newly dirty
    /// pages.
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
        let mut w = Writer::new(&t, &self.writer);
        let dirty = |i: usize, n: usize| nonzero_mask(&words[i..i + n]);
        let mut newly = merge_core(&mut w, src_bits, base_page, u64::MAX, dirty, |i, mask| {
            let v = words[i].load(Ordering::Relaxed) & mask;
            if v != 0 {
                // Acquire for the marks we saw, only where there are any.
                fence(Ordering::Acquire);
                seen.push((i, v));
            }
            v
        });
        let seen_tail = &mut fetched.seen_tail;
        newly += merge_tail(
            &mut w,
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
    /// The log words the fetch found dirty, in increasing word order (the merge loop visits
    /// words in order), with the bits seen and not yet cleared. Sparse, so a fetch costs in
    /// proportion to the dirty words, not to the size of the log.
    seen: Vec<(usize, u64)>,
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
        // Keeps the capacity: no allocation unless more words are dirty than ever before.
        self.seen.clear();
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
        let w: u64 = self.seen.iter().map(|(_, v)| v.count_ones() as u64).sum();
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
            let span = word_span(first, end.min(whole));
            let from = self.seen.partition_point(|&(w, _)| (w as u64) < span.0);
            for (w, seen) in self.seen[from..].iter_mut() {
                if *w as u64 > span.1 {
                    break;
                }
                let s = *seen & span_mask(*w as u64, span);
                if s != 0 {
                    words[*w].fetch_and(!s, Ordering::AcqRel);
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

    /// A 64-word chunk whose bitmap words straddle a block boundary takes the two-step path
    /// (`or_chunk` splits it); aligned and shifted starts, sparse and dense sources, against a
    /// per-page model.
    #[test]
    fn chunks_straddling_a_block_boundary_match_model() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for start in [
            BLOCK_PAGES - 640,
            BLOCK_PAGES - 640 + 37,
            BLOCK_PAGES - 64 * 63 - 1,
        ] {
            for dense in [false, true] {
                let src: Vec<u64> = (0..150)
                    .map(|_| {
                        if dense {
                            rnd() | 1
                        } else {
                            rnd() & rnd() & rnd()
                        }
                    })
                    .collect();
                let bm = MigrationBitmap::new(BLOCK_PAGES * 2).unwrap();
                bm.set_range(start + 5, 3); // some bits already set
                let npages = 150 * 64 - 7;
                let before: Vec<bool> = (0..npages).map(|i| bm.test(start + i)).collect();
                let newly = bm.merge_lebitmap(&src[..], start, npages);
                let mut expect_newly = 0;
                for i in 0..npages {
                    let bit = src[(i / 64) as usize] >> (i % 64) & 1 != 0;
                    assert_eq!(bm.test(start + i), bit || before[i as usize], "page {i}");
                    expect_newly += u64::from(bit && !before[i as usize]);
                }
                assert_eq!(newly, expect_newly);
                assert!(!bm.test(start + npages) && !bm.test(start - 1));
                assert_eq!(bm.count_dirty(), bm.iter().count() as u64);
            }
        }
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
