//! Deferred mode: merge the log now, clear it later, chunk by chunk, right before each chunk is
//! sent.
//!
//! ## Why defer the clear
//! A page the backend dirties again between a sync and the moment it is sent is sent twice:
//! once this round (its data already stale), once next round. Splitting the round as
//! `KVM_CLEAR_DIRTY_LOG` does (a cheap read of the whole log now, the clear of each chunk just
//! before the chunk is sent) sends such a page once. The fetch remembers exactly which bits it
//! saw ([`FetchedLog`], a sparse record: 16 bytes per dirty log word, nothing per clean one), and
//! the clear takes back only those bits with `fetch_and(!seen, AcqRel)`, so a mark made after
//! the fetch stays in the log for the next round (DESIGN.md invariant 3), and the Acquire orders
//! the send after every mark the clear absorbed (invariant 2).
//!
//! The fetch is the shared merge loop (`merge.rs`) with a `take` that reads instead of
//! swapping.

use std::sync::atomic::Ordering;

use super::blocks::Writer;
use super::merge::{merge_core, merge_tail};
use super::sync::nonzero_mask;
use super::{MigrationBitmap, VmmError};
use crate::bits::{span_mask, word_span};
use crate::log::sync::fence;
use crate::log::LogRegion;

/// Default chunk for [`MigrationBitmap::clear_fetched`]: 32768 pages, 128 MiB of guest memory
/// (8 KiB of log): small enough that the clear of a chunk lands just before its pages are
/// sent, large enough that per-chunk overhead vanishes.
pub const DEFAULT_CLEAR_CHUNK_PAGES: u64 = 32768;

impl MigrationBitmap {
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
