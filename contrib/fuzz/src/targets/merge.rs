//! `merge`: every [`MigrationBitmap`] operation against a per-page model.
//!
//! The bitmap starts with an arbitrary size (up to a few 2^18-page blocks, so block boundaries
//! are crossed) and takes arbitrary little-endian bitmaps at arbitrary page offsets and lengths
//! (`merge_lebitmap`, both the word-aligned fast path and the shift path), logs with arbitrary
//! contents and tail bytes (`sync_from_log`, and `fetch_log` followed by marks made "after the
//! fetch" and clears in arbitrary chunks), `test_and_clear`, `set_range`, `next_dirty`,
//! `iter_range`, `count_dirty` and `grow`. The model is a set of dirty page numbers; every
//! return value and, after every operation, the whole bitmap must match it, and every log must
//! hold exactly the bits the model says were not consumed.

use std::collections::BTreeSet;

use arbitrary::{Arbitrary, Unstructured};
use vhost_dirtylog::log::LogRegion;
use vhost_dirtylog::vmm::{MigrationBitmap, VmmError, BLOCK_PAGES, MAX_PAGES};

use super::Reached;

const MAX_OPS: usize = 24;
const MAX_WORDS: usize = 40;
/// Largest bitmap the target grows to (pages): four blocks.
const MAX_BM_PAGES: u64 = 4 * BLOCK_PAGES;

/// One fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Initial size.
    pub pages: Pages,
    /// The operations (at most `MAX_OPS`).
    pub ops: Vec<Op>,
}

/// A page number.
#[derive(Arbitrary, Debug)]
pub enum Page {
    /// Near a word or block boundary, or the bitmap's end.
    Near {
        /// 0..=3: block k's start; 4: the end of the bitmap; else word `anchor`.
        anchor: u8,
        /// Offset from the anchor.
        delta: i16,
    },
    /// A small page number.
    Small(u16),
    /// Anything.
    Raw(u64),
}

/// A page count.
#[derive(Arbitrary, Debug)]
pub enum Count {
    /// A small count.
    Small(u16),
    /// "Everything": `u64::MAX`.
    All,
    /// Anything.
    Raw(u64),
}

/// A bitmap size.
#[derive(Arbitrary, Debug)]
pub enum Pages {
    /// Up to four blocks.
    Bounded(u32),
    /// Anything (most values are too large and must be refused).
    Raw(u64),
}

/// A log for `sync_from_log` / `fetch_log`.
#[derive(Arbitrary, Debug)]
pub struct LogSpec {
    /// Whole words.
    pub words: Vec<u64>,
    /// Tail bytes (at most 7 are used).
    pub tail: Vec<u8>,
}

/// A clear step after a fetch.
#[derive(Arbitrary, Debug)]
pub enum Clear {
    /// `FetchedLog::clear_pages(first, npages)` (bitmap page numbers).
    Pages {
        /// First page.
        first: Page,
        /// Page count.
        npages: Count,
    },
    /// `clear_fetched(chunk)` (0 must be refused).
    All {
        /// Chunk in pages.
        chunk: u16,
    },
    /// A mark the backend makes after the fetch: log page (reduced).
    Mark(u16),
    /// Clearing with another log must be refused.
    WrongLog,
}

/// One operation.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// `merge_lebitmap`.
    MergeLe {
        /// Source words.
        words: Vec<u64>,
        /// Destination page of bit 0.
        start: Page,
        /// Bits to take.
        npages: Count,
    },
    /// `sync_from_log`.
    Sync {
        /// The log.
        log: LogSpec,
        /// Bitmap page of log page 0.
        base: Page,
    },
    /// `fetch_log`, then clears and marks.
    FetchClear {
        /// The log.
        log: LogSpec,
        /// Bitmap page of log page 0.
        base: Page,
        /// What happens after the fetch.
        steps: Vec<Clear>,
    },
    /// `test_and_clear`.
    TestAndClear {
        /// First page.
        first: Page,
        /// Page count.
        npages: Count,
    },
    /// `set_range` (bounded counts, or anything from near the end).
    SetRange {
        /// First page.
        first: Page,
        /// Page count (reduced unless `first` is near the end).
        npages: Count,
    },
    /// `next_dirty`.
    NextDirty(Page),
    /// `iter_range`.
    Iter {
        /// First page.
        first: Page,
        /// Page count.
        npages: Count,
    },
    /// `grow`.
    Grow(Pages),
}

/// Decodes `data` and runs it.
pub fn run(data: &[u8]) -> Reached {
    match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => exec(&input, false),
        Err(_) => Reached::default(),
    }
}

struct State {
    bm: MigrationBitmap,
    pages: u64,
    model: BTreeSet<u64>,
    reached: Reached,
    corrupt: bool,
}

fn pages_value(p: &Pages) -> u64 {
    match *p {
        Pages::Bounded(v) => v as u64 % (MAX_BM_PAGES + 1),
        Pages::Raw(v) => v,
    }
}

/// Runs `input`. With `corrupt`, one bit is flipped behind the bitmap's back after the first
/// merge that set anything (a negative control: the checks must then fail).
pub fn exec(input: &Input, corrupt: bool) -> Reached {
    let want = pages_value(&input.pages);
    if want > MAX_BM_PAGES {
        // Sizes up to MAX_PAGES are legal but would allocate gigabytes: only check refusals.
        if want > MAX_PAGES {
            let res = MigrationBitmap::new(want);
            assert!(
                matches!(res, Err(VmmError::TooManyPages { .. })),
                "bitmap of {want} pages must be refused"
            );
        }
        return Reached::default();
    }
    let bm = MigrationBitmap::new(want).expect("a bitmap of at most four blocks");
    let mut st = State {
        bm,
        pages: want,
        model: BTreeSet::new(),
        reached: Reached::default(),
        corrupt,
    };
    for op in input.ops.iter().take(MAX_OPS) {
        st.apply(op);
        st.check();
    }
    st.reached
}

fn bit(words: &[u64], i: u64) -> bool {
    words[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// A log with these words and tail bytes (None for an empty spec).
fn make_log(spec: &LogSpec) -> Option<LogRegion> {
    let words = &spec.words[..spec.words.len().min(MAX_WORDS)];
    let tail = &spec.tail[..spec.tail.len().min(7)];
    let size = words.len() * 8 + tail.len();
    if size == 0 {
        return None;
    }
    let log = LogRegion::anonymous(size).expect("small anonymous log");
    // Set exactly the spec's bits on the fresh (zeroed) log, through the public mark path (the
    // log's atomics are not public: nothing outside the crate can clear a bit without taking it).
    let word_bits = words.iter().enumerate().flat_map(|(i, &v)| {
        (0..64)
            .filter(move |b| v >> b & 1 != 0)
            .map(move |b| i as u64 * 64 + b)
    });
    let tail_base = words.len() as u64 * 64;
    let tail_bits = tail.iter().enumerate().flat_map(move |(k, &v)| {
        (0..8)
            .filter(move |b| v >> b & 1 != 0)
            .map(move |b| tail_base + k as u64 * 8 + b)
    });
    for p in word_bits.chain(tail_bits) {
        assert_eq!(log.mark_pages(p, p), 0, "page {p} inside the log");
    }
    Some(log)
}

/// The set bits of a log, as log page numbers.
fn log_bits(log: &LogRegion) -> Vec<u64> {
    vhost_dirtylog::test_utils::set_pages(log).collect()
}

impl State {
    fn page(&self, p: &Page) -> u64 {
        match *p {
            Page::Near { anchor, delta } => {
                let base = match anchor {
                    0..=3 => anchor as u64 * BLOCK_PAGES,
                    4 => self.pages,
                    w => w as u64 * 64,
                };
                base.saturating_add_signed(delta as i64)
            }
            Page::Small(v) => v as u64,
            Page::Raw(v) => v,
        }
    }

    fn count(c: &Count) -> u64 {
        match *c {
            Count::Small(v) => v as u64,
            Count::All => u64::MAX,
            Count::Raw(v) => v,
        }
    }

    /// Sets `page` in the model if it is inside the bitmap; whether it was newly set.
    fn model_set(&mut self, page: Option<u64>) -> bool {
        match page {
            Some(p) if p < self.pages => self.model.insert(p),
            _ => false,
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::MergeLe {
                words,
                start,
                npages,
            } => {
                let words = &words[..words.len().min(MAX_WORDS)];
                let start = self.page(start);
                let n = Self::count(npages);
                let newly = self.bm.merge_lebitmap(words, start, n);
                let mut want = 0;
                let src_bits = words.len() as u64 * 64;
                for i in 0..src_bits.min(n) {
                    if bit(words, i) && self.model_set(start.checked_add(i)) {
                        want += 1;
                    }
                }
                assert_eq!(
                    newly, want,
                    "merge_lebitmap(start {start}, npages {n}): newly dirty"
                );
                self.reached.hit(if start.is_multiple_of(64) {
                    "merge-aligned"
                } else {
                    "merge-shifted"
                });
                if newly > 0 && self.corrupt {
                    self.corrupt = false;
                    let p = *self.model.iter().next().unwrap();
                    self.bm.test_and_clear(p, 1);
                }
            }
            Op::Sync { log, base } => {
                let Some(region) = make_log(log) else { return };
                let base = self.page(base);
                let before = log_bits(&region);
                let newly = self.bm.sync_from_log(&region, base);
                let mut want = 0;
                let mut left = Vec::new();
                for &p in &before {
                    match base.checked_add(p) {
                        Some(bp) if bp < self.pages => {
                            if self.model.insert(bp) {
                                want += 1;
                            }
                        }
                        _ => left.push(p),
                    }
                }
                assert_eq!(newly, want, "sync_from_log(base {base}): newly dirty");
                assert_eq!(
                    log_bits(&region),
                    left,
                    "sync_from_log must clear exactly the bits it merged"
                );
                if region.len_bytes() % 8 != 0 {
                    self.reached.hit("sync-tail");
                }
                if !base.is_multiple_of(64) {
                    self.reached.hit("sync-shifted");
                }
            }
            Op::FetchClear { log, base, steps } => self.fetch_clear(log, base, steps),
            Op::TestAndClear { first, npages } => {
                let first = self.page(first);
                let n = Self::count(npages);
                let taken = self.bm.test_and_clear(first, n);
                let end = first.saturating_add(n);
                let gone: Vec<u64> = self.model.range(first..end.max(first)).copied().collect();
                for p in &gone {
                    self.model.remove(p);
                }
                assert_eq!(taken, gone.len() as u64, "test_and_clear({first}, {n})");
                if taken > 0 {
                    self.reached.hit("test-and-clear");
                }
            }
            Op::SetRange { first, npages } => {
                let first = self.page(first);
                let mut n = Self::count(npages);
                // Keep the model cheap: long ranges only near the end (they are clamped).
                if first.saturating_add(n) > self.pages && self.pages.saturating_sub(first) > 4096 {
                    n %= 4096;
                }
                let newly = self.bm.set_range(first, n);
                let end = first.saturating_add(n).min(self.pages);
                let mut want = 0;
                for p in first..end.max(first) {
                    if self.model.insert(p) {
                        want += 1;
                    }
                }
                assert_eq!(newly, want, "set_range({first}, {n})");
            }
            Op::NextDirty(from) => {
                let from = self.page(from);
                let got = self.bm.next_dirty(from);
                let want = self.model.range(from..).next().copied();
                assert_eq!(got, want, "next_dirty({from})");
                if got.is_some() {
                    self.reached.hit("next-dirty");
                }
            }
            Op::Iter { first, npages } => {
                let first = self.page(first);
                let n = Self::count(npages);
                let got: Vec<u64> = self.bm.iter_range(first, n).collect();
                let end = first.saturating_add(n);
                let want: Vec<u64> = self.model.range(first..end.max(first)).copied().collect();
                assert_eq!(got, want, "iter_range({first}, {n})");
            }
            Op::Grow(p) => {
                let want = pages_value(p);
                if want > MAX_BM_PAGES && want <= MAX_PAGES {
                    return; // legal but too big for this target
                }
                match self.bm.grow(want) {
                    Ok(old) => {
                        assert!(want <= MAX_PAGES);
                        assert_eq!(old, self.pages, "grow returns the previous size");
                        self.pages = self.pages.max(want);
                        if want > old {
                            self.reached.hit("grow");
                        }
                    }
                    Err(e) => {
                        assert!(want > MAX_PAGES, "grow({want}) refused: {e}");
                        assert!(matches!(e, VmmError::TooManyPages { .. }));
                    }
                }
                assert_eq!(self.bm.pages(), self.pages);
            }
        }
    }

    fn fetch_clear(&mut self, spec: &LogSpec, base: &Page, steps: &[Clear]) {
        let Some(region) = make_log(spec) else { return };
        let other = LogRegion::anonymous(region.len_bytes()).unwrap();
        let base = self.page(base);
        let before = log_bits(&region);
        let mut fetched = self.bm.fetch_log(&region, base);
        // Fetched: the log pages that map into the bitmap.
        let mut pending: BTreeSet<u64> = BTreeSet::new();
        let mut want = 0;
        for &p in &before {
            if let Some(bp) = base.checked_add(p).filter(|&bp| bp < self.pages) {
                pending.insert(p);
                if self.model.insert(bp) {
                    want += 1;
                }
            }
        }
        assert_eq!(fetched.newly_dirty(), want, "fetch_log(base {base}): newly");
        assert_eq!(fetched.pending_pages(), pending.len() as u64);
        assert_eq!(
            log_bits(&region),
            before,
            "fetch_log must not clear the log"
        );
        let mut log_model: BTreeSet<u64> = before.into_iter().collect();
        for step in steps.iter().take(16) {
            match step {
                Clear::Pages { first, npages } => {
                    let first = self.page(first);
                    let n = Self::count(npages);
                    let cleared = fetched
                        .clear_pages(&region, first, n)
                        .expect("clear_pages with its own log");
                    let end = first.saturating_add(n);
                    // Bitmap pages [first, end) -> log pages.
                    let gone: Vec<u64> = pending
                        .iter()
                        .copied()
                        .filter(|&p| {
                            let bp = base + p; // cannot overflow: fetched pages map into the bitmap
                            bp >= first && bp < end
                        })
                        .collect();
                    for p in &gone {
                        pending.remove(p);
                        log_model.remove(p);
                    }
                    assert_eq!(cleared, gone.len() as u64, "clear_pages({first}, {n})");
                    if cleared > 0 {
                        self.reached.hit("clear-pages");
                    }
                }
                Clear::All { chunk } => {
                    let res = self.bm.clear_fetched(&region, &mut fetched, *chunk as u64);
                    if *chunk == 0 {
                        assert!(matches!(res, Err(VmmError::ZeroChunk)), "{res:?}");
                        continue;
                    }
                    assert_eq!(res.unwrap(), pending.len() as u64, "clear_fetched count");
                    for p in std::mem::take(&mut pending) {
                        log_model.remove(&p);
                    }
                    self.reached.hit("clear-fetched");
                }
                Clear::Mark(p) => {
                    let p = *p as u64 % region.pages();
                    region.mark_pages(p, p);
                    log_model.insert(p);
                    self.reached.hit("mark-after-fetch");
                }
                Clear::WrongLog => {
                    let res = fetched.clear_pages(&other, 0, u64::MAX);
                    assert!(matches!(res, Err(VmmError::FetchMismatch)), "{res:?}");
                }
            }
            assert_eq!(fetched.pending_pages(), pending.len() as u64);
            let got = log_bits(&region);
            let want: Vec<u64> = log_model.iter().copied().collect();
            assert_eq!(got, want, "log after a deferred clear step");
        }
    }

    fn check(&self) {
        assert_eq!(self.bm.pages(), self.pages);
        assert_eq!(
            self.bm.count_dirty(),
            self.model.len() as u64,
            "count_dirty"
        );
        let got: Vec<u64> = self.bm.iter().collect();
        let want: Vec<u64> = self.model.iter().copied().collect();
        assert_eq!(got, want, "bitmap content");
    }
}
