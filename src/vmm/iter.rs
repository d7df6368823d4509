//! Reading the migration bitmap: test a page, count, find the next dirty page, iterate, copy.
//!
//! ## Why readers never lock
//! The sending thread walks the bitmap while the syncing thread merges into it. Every word
//! changes by a single store under the writer lock (`blocks.rs`), so a reader that loads a word
//! sees it before or after a change, never half of one: reads are relaxed loads of the table
//! the reader loaded (growth publishes a new table and never moves a block). What a reader
//! sees is a hint; to *take* a page for sending use
//! [`test_and_clear`](MigrationBitmap::test_and_clear), which locks.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::blocks::Table;
use super::MigrationBitmap;

impl MigrationBitmap {
    /// Whether `page` is dirty (a relaxed read: a hint; to take a page for sending use
    /// [`test_and_clear`](Self::test_and_clear)). False past the end.
    pub fn test(&self, page: u64) -> bool {
        let t = self.table.load();
        page < t.pages && t.word(page / 64).load(Ordering::Relaxed) & (1 << (page % 64)) != 0
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
}

/// Iterator over dirty pages, from [`MigrationBitmap::iter`] /
/// [`iter_range`](MigrationBitmap::iter_range).
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

#[cfg(test)]
mod tests {
    use super::*;

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
