//! Bit-range helpers for page bitmaps laid out as little-endian 64-bit words.
//!
//! Both halves of the crate work on the same layout: page `p` is bit `p % 64` of word `p / 64`,
//! in the vhost-user log ([`crate::log`], which marks ranges) and in the migration bitmap
//! ([`crate::vmm`], which merges, clears and iterates ranges). A range of pages touches a
//! *first* word (partly, from some bit up), whole words in between, and a *last* word (partly,
//! up to some bit). The masks of those partial words are where off-by-one errors live, so they
//! are written once, here, and the mark loop and the merges use the same ones (QEMU keeps its
//! `util/bitmap.c` apart from `ram_addr.h` for the same reason).
//!
//! Everything is `#[inline(always)]` or `#[inline]`: these sit inside the mark and merge loops
//! and must cost no more than the shifts they are made of.

/// Mask with bits `lo..=hi` set (`lo <= hi < 64`): the bits of a range inside one word.
#[inline]
pub(crate) fn word_mask(lo: u64, hi: u64) -> u64 {
    (!0u64 >> (63 - hi)) & (!0u64 << lo)
}

/// The bits of page `first`'s word at and above `first` (the first word of a range).
#[inline(always)]
pub(crate) fn first_word_mask(first: u64) -> u64 {
    !0u64 << (first % 64)
}

/// The bits of page `last`'s word at and below `last` (the last word of a range).
#[inline(always)]
pub(crate) fn last_word_mask(last: u64) -> u64 {
    !0u64 >> (63 - last % 64)
}

/// A range of pages `[first, end)` (`first < end`) as words: `(w0, w1, m0, m1)`, the index of
/// its first and last word and the masks of the range's bits in those two words (when
/// `w0 == w1`, the range's bits are `m0 & m1`).
#[inline(always)]
pub(crate) fn word_span(first: u64, end: u64) -> (u64, u64, u64, u64) {
    let last = end - 1;
    (
        first / 64,
        last / 64,
        first_word_mask(first),
        last_word_mask(last),
    )
}

/// The bits of word `j` that lie inside a span from [`word_span`].
#[inline(always)]
pub(crate) fn span_mask(j: u64, (w0, w1, m0, m1): (u64, u64, u64, u64)) -> u64 {
    let mut mask = !0u64;
    if j == w0 {
        mask &= m0;
    }
    if j == w1 {
        mask &= m1;
    }
    mask
}

/// Calls `f(word, mask)` for every word overlapping pages `[first, end)` (`first < end`),
/// `mask` selecting the range's bits in it.
#[inline(always)]
pub(crate) fn for_masks(first: u64, end: u64, mut f: impl FnMut(u64, u64)) {
    let span = word_span(first, end);
    for w in span.0..=span.1 {
        f(w, span_mask(w, span));
    }
}

/// Mask of the low `n` bits (`n <= 64`; `64` or more gives all bits).
#[inline(always)]
pub(crate) fn low_bits(n: u64) -> u64 {
    if n >= 64 {
        !0
    } else {
        (1u64 << n) - 1
    }
}

/// The bits of `v << off` that fall into the next word (`0` when `off == 0`): what a word
/// shifted onto an unaligned destination carries into the word after it.
#[inline(always)]
pub(crate) fn spill(v: u64, off: u32) -> u64 {
    ((u128::from(v) << off) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_mask_edges() {
        assert_eq!(word_mask(0, 63), !0);
        assert_eq!(word_mask(0, 0), 1);
        assert_eq!(word_mask(63, 63), 1 << 63);
        assert_eq!(word_mask(3, 5), 0b111000);
    }

    #[test]
    fn spans_match_per_bit_model() {
        for first in 0..200u64 {
            for end in first + 1..first + 200 {
                let span = word_span(first, end);
                let mut seen = 0;
                for_masks(first, end, |w, mask| {
                    for b in 0..64 {
                        let p = w * 64 + b;
                        assert_eq!(mask >> b & 1 != 0, (first..end).contains(&p), "{p}");
                    }
                    seen += 1;
                });
                assert_eq!(seen, span.1 - span.0 + 1);
                if span.0 == span.1 {
                    assert_eq!(span.2 & span.3, word_mask(first % 64, (end - 1) % 64));
                }
            }
        }
    }

    #[test]
    fn low_bits_and_spill() {
        assert_eq!(low_bits(0), 0);
        assert_eq!(low_bits(5), 0b11111);
        assert_eq!(low_bits(64), !0);
        assert_eq!(low_bits(100), !0);
        assert_eq!(spill(!0, 0), 0);
        assert_eq!(spill(1 << 63, 1), 1);
        assert_eq!(spill(0b11 << 62, 3), 0b110);
    }
}
