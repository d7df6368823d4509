//! The lock-free handle the dataplane marks through.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[cfg(doc)]
use vhost::vhost_user::VhostUserVirtioFeatures;

use super::batch::Entry;
use super::rcu;
use super::sync::{AtomicBool, AtomicPtr, AtomicU64, Mutex};
use super::{LogError, LogRegion, LOG_PAGE_SHIFT};
use crate::bits::word_mask;

#[derive(Default)]
struct Shared {
    /// LOG_ALL: marks are dropped on the floor (one relaxed load) while false.
    enabled: AtomicBool,
    /// The current log: a pointer obtained from `Arc::into_raw`, or null. Published with
    /// SeqCst swaps under `writer`; read inside [`rcu::read`] sections only, and the `Arc` it
    /// stands for is released only after [`rcu::synchronize`], so a reader's pointer is live.
    current: AtomicPtr<LogRegion>,
    /// Serialises replacements (never taken on the mark path).
    /// Under it: the base address of the log mapping that was made all-dirty because of
    /// writes made with logging on and no log (`no_log`); wider views of that mapping attached
    /// later (the stock handler attaches one view per region, growing) are made all-dirty over
    /// their new part too.
    writer: Mutex<Option<usize>>,
    /// Negative-control builds only: LOG_ALL is acknowledged but logging never turns on.
    #[cfg(feature = "test-drop-marks")]
    suppressed: AtomicBool,
    /// Pages a mark asked for that lie past the end of the log.
    out_of_range_pages: AtomicU64,
    /// Marks that had at least one page past the end of the log.
    out_of_range_marks: AtomicU64,
    /// Marks made while logging was on but no log was attached.
    marks_without_log: AtomicU64,
    /// Set by such a mark: the next attached log gets every page marked (see `no_log`).
    unlogged_writes: AtomicBool,
    /// Page ranges (`first..=last`) of marks that reached past the end of the current log
    /// while logging was on: memory added past the log's end until a bigger log arrives. They
    /// are marked in the next log that covers them ([`DirtyLog::replace_region`]), so such a
    /// write is carried over instead of lost. Only the cold out-of-range path locks it.
    carried: Mutex<Vec<(u64, u64)>>,
    warned_range: AtomicBool,
    warned_nolog: AtomicBool,
}

/// Counters of marks that could not be recorded. All zero in a healthy run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LogStats {
    /// Pages asked for past the end of the log (never written).
    pub out_of_range_pages: u64,
    /// Marks that reached past the end of the log.
    pub out_of_range_marks: u64,
    /// Marks made with logging on but no log attached.
    pub marks_without_log: u64,
    /// Page ranges past the end of the log still waiting for a log that covers them (marks
    /// past the end are carried into the next log; see [`DirtyLog::replace_region`]).
    pub carried_ranges: u64,
}

/// The handle a backend's dataplane marks written guest memory through.
///
/// Cheap to clone (one `Arc`), `Send + Sync`, lock-free. The frontend's log is attached with
/// [`replace_region`](Self::replace_region) (on `SET_LOG_BASE`), logging is switched with
/// [`set_logging`](Self::set_logging) (on `SET_FEATURES` with or without
/// [`VhostUserVirtioFeatures::LOG_ALL`]), and every guest write is followed by
/// [`mark`](Self::mark).
///
/// ```
/// use vhost_dirtylog::log::{DirtyLog, LogRegion};
/// use std::sync::Arc;
///
/// let log = DirtyLog::new();
/// log.replace_region(Some(Arc::new(LogRegion::anonymous(64).unwrap())));
/// log.mark(0x1000, 8); // logging off: ignored
/// log.set_logging(true);
/// log.mark(0x2ff8, 16); // straddles pages 2 and 3
/// let region = log.region().unwrap();
/// assert!(!region.test_page(1) && region.test_page(2) && region.test_page(3));
/// ```
#[derive(Clone)]
pub struct DirtyLog {
    shared: Arc<Shared>,
}

impl Default for DirtyLog {
    fn default() -> Self {
        rcu::init();
        DirtyLog {
            shared: Arc::default(),
        }
    }
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("logging", &self.is_logging())
            .field("region", &self.region())
            .field("stats", &self.stats())
            .finish()
    }
}

impl DirtyLog {
    /// A handle with no log attached and logging off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that guest-physical bytes `[gpa, gpa + len)` were written.
    ///
    /// Call it after the data is in guest memory. With logging off this is one relaxed load
    /// and a branch. With logging on it sets one bit per 4 KiB page, one Release `fetch_or`
    /// per 64 pages, without locks, allocation or system calls. Pages past the end of the log
    /// (and a range that overflows the address space) are counted in [`stats`](Self::stats),
    /// warned about once, and never written.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if !self.shared.enabled.load(Ordering::Relaxed) {
            return;
        }
        self.mark_on(gpa, len);
    }

    /// [`mark`](Self::mark) for marks made through a
    /// [`GuestDirtyBitmap`](super::GuestDirtyBitmap): with logging on, a mark made inside a
    /// [`LogBatch::scope`](super::LogBatch::scope) of a batch of this log is recorded into that
    /// batch instead (the thread-local route is looked up only after the flag said "on").
    #[inline]
    pub(crate) fn mark_routed(&self, gpa: u64, len: u64) {
        if !self.shared.enabled.load(Ordering::Relaxed) {
            return;
        }
        if super::batch::record_routed(self, gpa, len) {
            return;
        }
        self.mark_on(gpa, len);
    }

    /// A mark, logging known to be on.
    #[inline]
    pub(crate) fn mark_on(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (last, overflow) = match gpa.checked_add(len - 1) {
            Some(l) => (l, 0),
            // The tail beyond u64::MAX is not an address at all: count it, mark the rest.
            None => (u64::MAX, 1),
        };
        let first_page = gpa >> LOG_PAGE_SHIFT;
        let last_page = last >> LOG_PAGE_SHIFT;
        let dropped = rcu::read(|| {
            let p = self.shared.current.load(Ordering::Acquire);
            // SAFETY: a non-null `current` came from `Arc::into_raw` and its reference is
            // dropped only after `rcu::synchronize`, which waits for this read section.
            let r = unsafe { p.as_ref() }?;
            let dropped = r.mark_pages(first_page, last_page) + overflow;
            if dropped != 0 {
                // Inside the read section (see `carry_out_of_range`).
                self.carry_out_of_range(dropped, first_page, last_page);
            }
            Some(dropped)
        });
        let Some(dropped) = dropped else {
            self.no_log(first_page, last_page);
            return;
        };
        if dropped != 0 {
            self.warn_out_of_range(first_page, last_page, dropped);
        }
    }

    /// Applies a [`LogBatch`](super::LogBatch)'s words (`(word index, bits)`) to the log that
    /// is current now, inside one RCU read section: one Release `fetch_or` per word. Words
    /// past the end of the log are counted and carried as a plain mark's pages are; with no
    /// log attached the words go through the no-log path if logging is on, and are dropped if
    /// it is off (see `LogBatch`'s "LOG_ALL turned off before the flush"). Returns the number
    /// of atomic RMWs issued on the log.
    pub(crate) fn apply_words(&self, entries: &[Cell<Entry>]) -> u64 {
        let done = rcu::read(|| {
            let p = self.shared.current.load(Ordering::Acquire);
            // SAFETY: as in `mark_on`: a published pointer is live for this read section.
            let r = unsafe { p.as_ref() }?;
            Some(self.or_words(r, entries))
        });
        match done {
            Some((rmws, 0)) => rmws,
            Some((rmws, dropped)) => {
                let (first, last) = entries.iter().fold((u64::MAX, 0), |(f, l), e| {
                    let w = e.get().0;
                    (f.min(w * 64), l.max(w * 64 + 63))
                });
                self.warn_out_of_range(first, last, dropped);
                rmws
            }
            None if self.shared.enabled.load(Ordering::Relaxed) => self.no_log_words(entries),
            None => 0,
        }
    }

    /// ORs batch words into `r` (inside the caller's read section). Returns (RMWs, pages past
    /// the end of `r`, which are carried).
    #[inline]
    fn or_words(&self, r: &LogRegion, entries: &[Cell<Entry>]) -> (u64, u64) {
        let words = r.words();
        let (mut rmws, mut dropped) = (0, 0);
        for e in entries {
            let (w, mask) = e.get();
            match usize::try_from(w).ok().and_then(|i| words.get(i)) {
                Some(word) => {
                    word.fetch_or(mask, Ordering::Release);
                    rmws += 1;
                }
                None => {
                    let (n, d) = self.or_word_past_words(r, w, mask);
                    rmws += n;
                    dropped += d;
                }
            }
        }
        (rmws, dropped)
    }

    /// A batch word beyond the log's whole words: its runs of pages go through
    /// `LogRegion::mark_pages` (tail bytes of a log whose size is not a multiple of 8), and
    /// pages past the end are carried. Inside the caller's read section.
    #[cold]
    #[inline(never)]
    fn or_word_past_words(&self, r: &LogRegion, w: u64, mut mask: u64) -> (u64, u64) {
        let (mut rmws, mut dropped) = (0, 0);
        while mask != 0 {
            let lo = u64::from(mask.trailing_zeros());
            let n = u64::from((mask >> lo).trailing_ones());
            let (first, last) = (w * 64 + lo, w * 64 + lo + n - 1);
            let d = r.mark_pages(first, last);
            if d != 0 {
                // Only the pages past the end (the rest is in this log).
                self.carry_out_of_range(d, first.max(r.pages()), last);
                dropped += d;
            }
            rmws += 1;
            mask &= !word_mask(lo, lo + n - 1);
        }
        (rmws, dropped)
    }

    /// [`no_log`](Self::no_log) for a batch's words: counted once per word, the next log made
    /// all-dirty, and the words applied precisely if a log appeared meanwhile.
    #[cold]
    #[inline(never)]
    fn no_log_words(&self, entries: &[Cell<Entry>]) -> u64 {
        let s = &self.shared;
        s.marks_without_log
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        s.unlogged_writes.store(true, Ordering::SeqCst);
        let rmws = rcu::read(|| {
            let p = s.current.load(Ordering::SeqCst);
            // SAFETY: as in `mark_on`: a published pointer is live for this read section.
            unsafe { p.as_ref() }.map_or(0, |r| self.or_words(r, entries).0)
        });
        self.warn_no_log();
        rmws
    }

    /// A mark that reached past the end of the log: memory the current log does not cover
    /// (added with `ADD_MEM_REG` / `SET_MEM_TABLE` while logging, before the frontend sends a
    /// bigger log). The pages are remembered and marked in the next log that covers them, as
    /// writes before the first log are (DESIGN.md invariant 1). Must run inside the read
    /// section in which the mark found this log, so a `replace_region` that retires the log
    /// waits for it (grace period) before it applies the carried ranges to the new log;
    /// recorded after the read section, the range could miss the new log that covers it
    /// (`tests/loom.rs::out_of_range_mark_vs_bigger_log`). At most [`MAX_CARRIED`] ranges
    /// are kept; past that they are merged into one (over-marking is harmless, memory stays
    /// bounded).
    #[cold]
    #[inline(never)]
    fn carry_out_of_range(&self, pages: u64, first_page: u64, last_page: u64) {
        let s = &self.shared;
        s.out_of_range_pages.fetch_add(pages, Ordering::Relaxed);
        s.out_of_range_marks.fetch_add(1, Ordering::Relaxed);
        let mut c = s.carried.lock().unwrap_or_else(|e| e.into_inner());
        carry(&mut c, first_page, last_page);
    }

    /// The first out-of-range mark's warning (outside the read section: it may do I/O).
    #[cold]
    #[inline(never)]
    fn warn_out_of_range(&self, first_page: u64, last_page: u64, pages: u64) {
        if !self.shared.warned_range.swap(true, Ordering::Relaxed) {
            log::warn!(
                "dirty log: mark of log pages {first_page:#x}..={last_page:#x} reaches {pages} page(s) past the end of the log; \
                 they are carried into the next log that covers them (further occurrences are only counted)"
            );
        }
    }

    /// Marks the carried ranges in `r` (a log just made current), keeping what `r` does not
    /// cover for the next one. Called under `writer`, after the grace period that retired the
    /// previous log, so every range recorded against it is here.
    fn apply_carried(&self, r: &LogRegion) {
        let mut c = self
            .shared
            .carried
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if c.is_empty() {
            return;
        }
        let pages = r.pages();
        let before = c.len();
        c.retain_mut(|(first, last)| {
            r.mark_pages(*first, *last);
            *first = (*first).max(pages);
            *first <= *last
        });
        log::info!(
            "dirty log: {} carried page range(s) marked in the new log, {} still past its end",
            before - c.len(),
            c.len()
        );
    }

    /// Makes the current log cover guest-physical addresses `[0, gpa_end)` if its mapping
    /// allows: a stock-mapped log is put to use (and proven backed) only as far as guest
    /// memory reaches, so when memory grows the view is widened here (the adapter calls this
    /// from `update_memory`). Returns `Ok(true)` if the current log covers `gpa_end` now,
    /// `Ok(false)` if there is no log or its mapping is too small (writes past it are carried
    /// into the next log), and an error if the wider part of the mapping is not backed by its
    /// file (nothing is marked there; writes past the proven part are carried instead).
    pub fn cover(&self, gpa_end: u64) -> Result<bool, LogError> {
        let Some(cur) = self.region() else {
            return Ok(false);
        };
        let need = super::bitmap::need_bytes(gpa_end);
        if need <= cur.len_bytes() as u64 {
            return Ok(true);
        }
        let want = usize::try_from(need.next_multiple_of(8)).unwrap_or(usize::MAX);
        match cur.widened(want) {
            Some(Ok(wide)) => {
                let covers = need <= wide.len_bytes() as u64;
                log::info!(
                    "dirty log: guest memory grew to GPA {gpa_end:#x}: {} bytes of the log in use",
                    wide.len_bytes()
                );
                self.replace_region(Some(Arc::new(wide)));
                Ok(covers)
            }
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// A write while logging is on but no log is attached. QEMU does this on a device start
    /// during migration: `SET_FEATURES` (LOG_ALL) and the rings come before `SET_LOG_BASE`.
    /// The write cannot be recorded, so it is remembered as "something unlogged happened" and
    /// the next log attached gets *every* page marked: the VMM resends all memory once rather
    /// than miss one page. Store-buffer handshake with `replace_region`: we set the flag, then
    /// look for a log again; it publishes the log, then reads the flag (both SeqCst), so either
    /// we find the new log and mark precisely, or it sees the flag.
    #[cold]
    #[inline(never)]
    fn no_log(&self, first_page: u64, last_page: u64) {
        let s = &self.shared;
        s.marks_without_log.fetch_add(1, Ordering::Relaxed);
        s.unlogged_writes.store(true, Ordering::SeqCst);
        rcu::read(|| {
            let p = s.current.load(Ordering::SeqCst);
            // SAFETY: as in `mark_on`: a published pointer is live for this read section.
            if let Some(r) = unsafe { p.as_ref() } {
                r.mark_pages(first_page, last_page);
            }
        });
        self.warn_no_log();
    }

    #[cold]
    #[inline(never)]
    fn warn_no_log(&self) {
        if !self.shared.warned_nolog.swap(true, Ordering::Relaxed) {
            log::warn!(
                "dirty log: logging is on but no log is attached; the next log will have every page marked"
            );
        }
    }

    /// Turns logging on or off (the frontend acked or dropped
    /// [`VhostUserVirtioFeatures::LOG_ALL`], bit 26 of the virtio features).
    ///
    /// Turning it on issues a process-wide memory barrier (`membarrier(2)`) before returning,
    /// so a dataplane thread whose relaxed check raced with the switch has its earlier data
    /// stores visible before the frontend hears the reply and starts copying; this keeps the
    /// mark path free of fences while no write can slip between "VMM copied the page" and
    /// "backend saw logging on".
    pub fn set_logging(&self, on: bool) {
        #[cfg(feature = "test-drop-marks")]
        let on = on && !self.shared.suppressed.load(Ordering::Relaxed);
        let was = self.shared.enabled.swap(on, Ordering::SeqCst);
        if on && !was {
            rcu::process_barrier();
        }
        if on != was {
            log::info!("dirty log: logging {}", if on { "on" } else { "off" });
        }
    }

    /// Negative control (cargo feature `test-drop-marks`, never in release builds): from now on
    /// `set_logging(true)` is ignored, so the backend advertises and acknowledges LOG_ALL but
    /// marks nothing. End-to-end tests use it to prove they detect lost pages.
    #[cfg(feature = "test-drop-marks")]
    pub fn suppress_logging_for_tests(&self) {
        self.shared.suppressed.store(true, Ordering::Relaxed);
        self.set_logging(false);
    }

    /// Whether logging is on.
    pub fn is_logging(&self) -> bool {
        self.shared.enabled.load(Ordering::Relaxed)
    }

    /// Makes `region` the current log (or detaches with `None`) and returns the previous one.
    ///
    /// Returns only after every mark that could still be writing into the previous region has
    /// finished (a read-copy-update grace period, see the `rcu` module), so once the caller
    /// replies to the frontend, the old log holds every mark it will ever get and the VMM can
    /// drain it. Marks that start after the swap go to the new region.
    pub fn replace_region(&self, region: Option<Arc<LogRegion>>) -> Option<Arc<LogRegion>> {
        let mut all_dirty = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        let new = region.map_or(ptr::null_mut(), |r| Arc::into_raw(r) as *mut LogRegion);
        let old = self.shared.current.swap(new, Ordering::SeqCst);
        // SAFETY: `new` came from `Arc::into_raw` just above and we still own that reference
        // (it is published, and only a later replacement under `writer` takes it back).
        if let Some(r) = unsafe { new.as_ref() } {
            // SAFETY: `old` is null or came from `Arc::into_raw` in an earlier call; we own
            // that reference until we take it back below, so it is live here.
            let old_ref = unsafe { old.as_ref() };
            let widened_from = old_ref
                .filter(|o| *all_dirty == Some(r.base_addr()) && o.same_mapping(r))
                .map(|o| o.pages());
            if self.shared.unlogged_writes.swap(false, Ordering::SeqCst) {
                log::warn!(
                    "dirty log: writes happened with logging on and no log; marking all {} pages of the new log",
                    r.pages()
                );
                r.mark_pages(0, r.pages() - 1);
                *all_dirty = Some(r.base_addr());
            } else if let Some(from) = widened_from {
                // A wider view of the log that was made all-dirty: its new part too (the
                // unlogged write may have been anywhere in guest memory).
                if from < r.pages() {
                    r.mark_pages(from, r.pages() - 1);
                }
            } else {
                *all_dirty = None;
            }
        }
        // SAFETY: as above: `new` is published and only a later replacement under `writer`
        // (which we hold) could take its reference back, so it is live for this call.
        let new_ref = unsafe { new.as_ref() };
        if old.is_null() {
            if let Some(r) = new_ref {
                self.apply_carried(r);
            }
            return None;
        }
        // Grace period: every mark that could have loaded `old` has finished, and its
        // fetch_ors are visible to whoever we tell next (the frontend, through the reply).
        rcu::synchronize();
        if let Some(r) = new_ref {
            self.apply_carried(r);
        }
        // SAFETY: `old` came from `Arc::into_raw` in an earlier call and, now unpublished and
        // past the grace period, no reader holds it: we take its reference back exactly once.
        Some(unsafe { Arc::from_raw(old) })
    }

    /// The current log, if any.
    pub fn region(&self) -> Option<Arc<LogRegion>> {
        rcu::read(|| {
            let p = self.shared.current.load(Ordering::Acquire);
            if p.is_null() {
                return None;
            }
            // SAFETY: as in `mark_on`: `p` is live for this read section, so bumping its
            // strong count and building a new `Arc` from it is sound.
            unsafe {
                Arc::increment_strong_count(p);
                Some(Arc::from_raw(p))
            }
        })
    }

    /// Counters of marks that could not be recorded.
    pub fn stats(&self) -> LogStats {
        let s = &self.shared;
        LogStats {
            out_of_range_pages: s.out_of_range_pages.load(Ordering::Relaxed),
            out_of_range_marks: s.out_of_range_marks.load(Ordering::Relaxed),
            marks_without_log: s.marks_without_log.load(Ordering::Relaxed),
            carried_ranges: s.carried.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
        }
    }

    /// True if both handles are the same log.
    pub fn ptr_eq(&self, other: &DirtyLog) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Most page ranges carried past the end of the log; more are merged into one.
pub(crate) const MAX_CARRIED: usize = 256;

/// Adds `first..=last` to the carried ranges, merging it with an overlapping or adjacent one,
/// or, with [`MAX_CARRIED`] ranges already, merging everything into one range.
fn carry(c: &mut Vec<(u64, u64)>, first: u64, last: u64) {
    for r in c.iter_mut() {
        if first <= r.1.saturating_add(1) && r.0 <= last.saturating_add(1) {
            *r = (r.0.min(first), r.1.max(last));
            return;
        }
    }
    if c.len() < MAX_CARRIED {
        c.push((first, last));
        return;
    }
    let lo = c.iter().map(|r| r.0).min().unwrap_or(first).min(first);
    let hi = c.iter().map(|r| r.1).max().unwrap_or(last).max(last);
    c.clear();
    c.push((lo, hi));
}

impl Drop for Shared {
    fn drop(&mut self) {
        // (A load rather than `get_mut`, which loom's atomics do not have; with `&mut self`
        // nothing can race with it.)
        let p = self.current.load(Ordering::Relaxed);
        if !p.is_null() {
            // SAFETY: `p` came from `Arc::into_raw`; with `&mut self` no reader can exist.
            drop(unsafe { Arc::from_raw(p) });
        }
    }
}
