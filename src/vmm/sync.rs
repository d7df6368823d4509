//! Consuming a vhost-user log into the migration bitmap: one atomic swap per dirty word.
//!
//! ## What a dirty word costs, and why it cannot cost less
//! One locked instruction: the Acquire swap that takes it out of the log, which cannot go (the
//! backend ORs into the log concurrently, and the swap is what makes clearing lossless:
//! DESIGN.md invariant 3). The OR into the bitmap is a plain load and store, because every
//! writer of the bitmap holds its writer lock (see `Writer` in `blocks.rs`; QEMU's
//! `cpu_physical_memory_sync_dirty_bitmap` does the same under `bitmap_mutex`), which halves the
//! locked instructions of a dense sync. `benches/merge.rs` measures the sync against a plain
//! scan of the log and against the *swap floor* (the scan plus one swap per dirty word, the
//! least any sync that keeps invariant 3 can cost).
//!
//! The word loop is `merge_core` (`merge.rs`); this file gives it the log's side: which words
//! are non-zero (relaxed loads) and how a word is taken (swap, or a masked `fetch_and` for bits
//! that must stay in the log). The helpers are generic over the atomic type so that under
//! `cfg(loom)` the model checks (`tests/loom.rs`) run this very code on loom's atomics.

use std::sync::atomic::{AtomicU64, Ordering};

use super::blocks::Writer;
use super::merge::{chunk_mask, merge_core, merge_tail};
use super::{MigrationBitmap, SharedLog};
use crate::log::sync::{AtomicU64 as LogWord, AtomicU8 as LogByte};
use crate::log::LogRegion;

/// The operations the merges need from an atomic 64-bit word, so one `take_word` / `all_zero`
/// serves the bitmap's words (`std`) and the log's (`crate::log::sync`: the same type, except
/// under `cfg(loom)`, where the model checks run this very code on loom's atomics).
pub(super) trait Word {
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

/// [`LeWords::nonzero_mask`](super::LeWords::nonzero_mask) for a log slice (at most 64 words): relaxed loads.
#[inline(always)]
pub(super) fn nonzero_mask<W: Word>(words: &[W]) -> u64 {
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
pub(super) fn all_zero<W: Word>(words: &[W]) -> bool {
    words
        .iter()
        .fold(0, |acc, w| acc | w.load(Ordering::Relaxed))
        == 0
}

impl MigrationBitmap {
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
        self.consume_log(log.as_ref(), base_page, take_log_word, |b, mask| {
            if b.load(Ordering::Relaxed) & mask == 0 {
                0
            } else {
                b.fetch_and(!mask, Ordering::Acquire) & mask
            }
        })
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
        self.consume_log(
            log,
            base_page,
            |w, mask| {
                let old = w.load(Ordering::Relaxed);
                let v = old & mask;
                if v != 0 {
                    w.store(old & !mask, Ordering::Relaxed);
                }
                v
            },
            |b, mask| {
                let old = b.load(Ordering::Relaxed);
                if old & mask != 0 {
                    b.store(old & !mask, Ordering::Relaxed);
                }
                old & mask
            },
        )
    }

    /// The loop both log consumers share: clean words skipped with plain loads, each dirty
    /// word's bits in the bitmap's range taken with `take_word(word, mask)` (a swap for a live
    /// log, a load and store for a retired one), tail bytes with `take_byte`; what is taken is
    /// ORed into the bitmap. Returns the number of newly dirty pages.
    #[inline(always)]
    fn consume_log(
        &self,
        log: &LogRegion,
        base_page: u64,
        take_word: impl Fn(&LogWord, u64) -> u64,
        take_byte: impl Fn(&LogByte, u8) -> u8,
    ) -> u64 {
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
            |i, mask| take_word(&words[i], mask),
        );
        let tail = log.tail();
        if !tail.is_empty() {
            newly += merge_tail(
                &mut w,
                tail,
                base_page.checked_add(src_bits),
                |_, b, mask| take_byte(b, mask),
            );
        }
        newly
    }
}
