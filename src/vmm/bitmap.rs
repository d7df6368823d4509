//! The migration bitmap type: construction, growth, and setting and taking ranges of pages.
//!
//! [`MigrationBitmap`] is split by job over the files of this module, each with the reasons for its
//! design: `blocks.rs` (block storage, the table that grows for hotplug, the writer lock),
//! `merge.rs` (the shared merge loop and [`LeWords`](super::LeWords) sources), `sync.rs` (consuming
//! a vhost-user log with swaps), `fetch.rs` (deferred clearing) and `iter.rs` (readers). This file
//! holds the type and the operations on ranges of pages that every user needs.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::blocks::{new_block, Block, Table, Writer, BLOCK_PAGES, MAX_PAGES};
use super::VmmError;
use crate::bits::for_masks;

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
/// A [`LeWords`](super::LeWords) source passed to [`merge_lebitmap`](Self::merge_lebitmap) is read
/// while the writer lock is held: its methods must not write to this bitmap.
///
/// Page indices are absolute guest page numbers (`gpa >> LOG_PAGE_SHIFT`, see
/// [`LOG_PAGE_SHIFT`](crate::log::LOG_PAGE_SHIFT)). Ranges are clamped to
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
    pub(super) table: ArcSwap<Table>,
    grow_lock: Mutex<()>,
    /// Serializes the writers of bits (see `Writer`); readers never take it.
    pub(super) writer: Mutex<()>,
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
}

#[cfg(test)]
mod tests {
    use super::super::blocks::{BLOCK_WORDS, BLOCK_WORD_SHIFT};

    #[test]
    fn block_constants() {
        assert_eq!(BLOCK_WORDS, 4096);
        assert_eq!(1u64 << BLOCK_WORD_SHIFT, BLOCK_WORDS as u64);
    }
}
