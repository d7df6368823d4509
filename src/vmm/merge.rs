//! The merge loop every merge into the migration bitmap shares, and the sources it reads.
//!
//! ## Why one loop, 64 words at a time
//! All merges ([`merge_lebitmap`](MigrationBitmap::merge_lebitmap) here,
//! [`sync_from_log`](MigrationBitmap::sync_from_log) in `sync.rs`,
//! [`fetch_log`](MigrationBitmap::fetch_log) in `fetch.rs`) share one word loop (`merge_core`),
//! so the hard part (alignment, carries, block boundaries, clamping) is written and tested
//! once. It reads the source 64 words at a time: the words of a chunk are ORed together with
//! plain loads, eight at a time, so a clean stretch of log costs about what reading it costs
//! (most of a sparse log is clean); a dirty chunk gets a mask of its non-zero words, which the
//! loop walks with `trailing_zeros`, so the branch predictor never has to guess which words of
//! a sparse log are dirty. For each dirty word it asks the source for the bits it *consumes*
//! (a plain read for `merge_lebitmap`, an atomic swap for `sync_from_log`, a read that is
//! remembered for `fetch_log`), ORs them into the bitmap and counts newly dirty pages as
//! `popcount(new & !old)`. The loop looks two chunks ahead, so the bitmap lines a dirty chunk
//! will be ORed into are prefetched while the chunks before it are merged. When the
//! destination page is a multiple of 64 (the common case: the log and the bitmap are both
//! indexed from guest-physical 0) source word `i` lands on bitmap word `start / 64 + i` as is,
//! in one pass. Otherwise each bitmap word is `src[i] << off | src[i - 1] >> (64 - off)`: the
//! chunk's dirty words are taken first, then the bitmap words they touch are assembled, the
//! top bits of a chunk's last word carried into the next chunk. Still one read of the source
//! and one store per bitmap word, never a loop over bits.
//!
//! Sources are clamped, never trusted: bits past `npages`, past the source, or mapping past the
//! end of the bitmap are neither merged nor (for the log) cleared.
//!
//! Everything on this path is `#[inline(always)]` (or generic): each merge gets its own copy of
//! the loop with its `nonzero` / `take` closures folded in.

use std::sync::atomic::{AtomicU64, Ordering};

use super::blocks::{or_word, Writer, BLOCK_WORDS};
use super::sync::all_zero;
use super::MigrationBitmap;
use crate::bits::{low_bits, spill};
// The log's own atomics: `std`'s, except under `cfg(loom)` (see `crate::log::sync`).
use crate::log::sync::AtomicU8 as LogByte;

/// Source words examined at a time: a clean chunk costs `CHUNK` plain loads ORed together and
/// one well-predicted branch, close to the cost of merely reading the log; a dirty one gets a
/// mask of its non-zero words, which the loop visits with `trailing_zeros`, so the branch
/// predictor never has to guess which words of a sparse log are dirty.
pub(super) const CHUNK: usize = 64;

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
pub(super) fn merge_core(
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
                    // A plain loop (not `map(&mut one).sum()`): `one` stays inlined in every
                    // merge's copy of this loop, the fetch's included.
                    for k in 0..CHUNK {
                        newly += one(k);
                    }
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
pub(super) fn merge_tail(
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

/// The chunk-sized and bit-granular ORs the merge loop needs from a [`Writer`].
impl Writer<'_> {
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
pub(super) fn chunk_mask(count: usize, load: impl Fn(usize) -> u64) -> u64 {
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

impl MigrationBitmap {
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
}

#[cfg(test)]
mod tests {
    use super::super::BLOCK_PAGES;
    use super::*;

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
}
