//! VMM-side merges against a naive per-page model, under concurrency, growth and log resize.
//!
//! Every bitmap operation is checked differentially against a `Vec<bool>` model with random
//! offsets (word aligned or not, around block boundaries), lengths and densities. The
//! concurrent tests mark through the backend's real `DirtyLog` while the VMM syncs, and check
//! that the migration bitmap ends up with exactly the pages the writers marked: no page lost
//! (DESIGN.md invariants 1 and 3).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use vhost_dirtylog::log::{DirtyLog, LogRegion, LOG_PAGE_SIZE};
use vhost_dirtylog::vmm::{
    FetchedLog, MigrationBitmap, SharedLog, VmmError, BLOCK_PAGES, DEFAULT_CLEAR_CHUNK_PAGES,
    MAX_GPA_END, MAX_PAGES,
};

// ---------------------------------------------------------------------------------------------
// Model and generators
// ---------------------------------------------------------------------------------------------

/// The naive per-page model of a migration bitmap.
#[derive(Debug, Clone)]
struct Model(Vec<bool>);

impl Model {
    fn pages(&self) -> u64 {
        self.0.len() as u64
    }
    fn range(&self, first: u64, n: u64) -> std::ops::Range<usize> {
        let end = first.saturating_add(n).min(self.pages());
        let first = first.min(end);
        first as usize..end as usize
    }
    fn set(&mut self, first: u64, n: u64) -> u64 {
        let r = self.range(first, n);
        let mut newly = 0;
        for p in r {
            newly += !self.0[p] as u64;
            self.0[p] = true;
        }
        newly
    }
    fn take(&mut self, first: u64, n: u64) -> u64 {
        let r = self.range(first, n);
        let mut taken = 0;
        for p in r {
            taken += self.0[p] as u64;
            self.0[p] = false;
        }
        taken
    }
    fn set_page(&mut self, p: u64) -> u64 {
        if p < self.pages() && !self.0[p as usize] {
            self.0[p as usize] = true;
            1
        } else {
            0
        }
    }
    fn words(&self) -> Vec<u64> {
        let mut w = vec![0u64; self.0.len().div_ceil(64)];
        for (p, _) in self.0.iter().enumerate().filter(|(_, d)| **d) {
            w[p / 64] |= 1 << (p % 64);
        }
        w
    }
    fn dirty(&self) -> Vec<u64> {
        (0..self.pages()).filter(|p| self.0[*p as usize]).collect()
    }
}

fn check_same(bm: &MigrationBitmap, model: &Model) {
    assert_eq!(bm.pages(), model.pages());
    assert_eq!(bm.snapshot(), model.words(), "bitmap differs from model");
    assert_eq!(
        bm.count_dirty(),
        model.0.iter().filter(|d| **d).count() as u64
    );
}

/// Bit `i` of the source bitmap, as the model reads it.
fn src_bit(src: &[u64], i: u64) -> bool {
    src[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// Random words with a chosen density: empty, sparse (~1/8 bits), half, dense (~7/8), full,
/// or patchy (mostly zero words, the rest with the top bit set: long clean stretches after
/// words whose high bits carry into the next bitmap word on the shift path).
fn words_strategy(max_words: usize) -> impl Strategy<Value = Vec<u64>> {
    (
        prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..max_words),
        0u8..7,
    )
        .prop_map(|(v, density)| {
            v.into_iter()
                .map(|(a, b, c)| match density {
                    0 => 0,
                    1 => a & b & c,
                    2 => a,
                    3 => a | b | c,
                    4 => !0,
                    _ if b % 8 == 0 => a | 1 << 63,
                    _ => 0,
                })
                .collect()
        })
}

/// A page index near an interesting place: anywhere in `[0, limit]`, near a word or block
/// boundary, or absurdly large.
fn page_strategy(limit: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..=limit,
        2 => (0..=limit / 64, 0u64..3).prop_map(|(w, d)| (w * 64).saturating_sub(d)),
        1 => (0u64..130).prop_map(|d| (BLOCK_PAGES - 65).saturating_add(d)),
        1 => prop_oneof![Just(u64::MAX), Just(u64::MAX - 63), Just(MAX_PAGES)],
    ]
}

fn len_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..200,
        2 => 0u64..5000,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
    ]
}

/// Bitmap sizes: small, around a block boundary, or two blocks and a bit.
fn pages_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..1500,
        2 => (BLOCK_PAGES - 200)..(BLOCK_PAGES + 200),
        1 => (2 * BLOCK_PAGES)..(2 * BLOCK_PAGES + 100),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Merge {
        src: Vec<u64>,
        start: u64,
        npages: u64,
        atomic: bool,
    },
    Set(u64, u64),
    SetAll,
    TestAndClear(u64, u64),
    Clear(u64, u64),
    Next(u64),
    Iter(u64, u64),
    Test(u64),
    Grow(u64),
}

fn op_strategy(limit: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (words_strategy(40), page_strategy(limit), len_strategy(), any::<bool>()).prop_map(
            |(src, start, npages, atomic)| Op::Merge { src, start, npages, atomic }
        ),
        2 => (page_strategy(limit), len_strategy()).prop_map(|(a, b)| Op::Set(a, b)),
        1 => Just(Op::SetAll),
        3 => (page_strategy(limit), len_strategy()).prop_map(|(a, b)| Op::TestAndClear(a, b)),
        1 => (page_strategy(limit), len_strategy()).prop_map(|(a, b)| Op::Clear(a, b)),
        2 => page_strategy(limit).prop_map(Op::Next),
        1 => (page_strategy(limit), len_strategy()).prop_map(|(a, b)| Op::Iter(a, b)),
        1 => page_strategy(limit).prop_map(Op::Test),
        1 => (0u64..(BLOCK_PAGES + 500)).prop_map(Op::Grow),
    ]
}

fn apply(bm: &MigrationBitmap, model: &mut Model, op: &Op) {
    match op {
        Op::Merge {
            src,
            start,
            npages,
            atomic,
        } => {
            let got = if *atomic {
                let a: Vec<AtomicU64> = src.iter().map(|w| AtomicU64::new(*w)).collect();
                bm.merge_lebitmap(&a[..], *start, *npages)
            } else {
                bm.merge_lebitmap(&src[..], *start, *npages)
            };
            let n = (*npages).min(src.len() as u64 * 64);
            let mut want = 0;
            for i in 0..n {
                let Some(p) = start.checked_add(i) else { break };
                if p >= model.pages() {
                    break;
                }
                if src_bit(src, i) {
                    want += model.set_page(p);
                }
            }
            assert_eq!(got, want, "merge newly dirty");
        }
        Op::Set(a, b) => assert_eq!(bm.set_range(*a, *b), model.set(*a, *b)),
        Op::SetAll => assert_eq!(bm.set_all(), model.set(0, u64::MAX)),
        Op::TestAndClear(a, b) => assert_eq!(bm.test_and_clear(*a, *b), model.take(*a, *b)),
        Op::Clear(a, b) => {
            bm.clear_range(*a, *b);
            model.take(*a, *b);
        }
        Op::Next(from) => {
            let want = model.range(*from, u64::MAX).find(|p| model.0[*p]);
            assert_eq!(
                bm.next_dirty(*from),
                want.map(|p| p as u64),
                "next_dirty({from})"
            );
        }
        Op::Iter(a, b) => {
            let want: Vec<u64> = model
                .range(*a, *b)
                .filter(|p| model.0[*p])
                .map(|p| p as u64)
                .collect();
            assert_eq!(bm.iter_range(*a, *b).collect::<Vec<_>>(), want);
        }
        Op::Test(p) => assert_eq!(bm.test(*p), *p < model.pages() && model.0[*p as usize]),
        Op::Grow(p) => {
            let old = bm.grow(*p).unwrap();
            assert_eq!(old, model.pages());
            if *p > model.pages() {
                model.0.resize(*p as usize, false);
            }
        }
    }
}

/// A private log of `bytes` bytes (any size, so tail bytes are covered) holding `bits`.
fn log_with(bytes: usize, bits: &[u64]) -> LogRegion {
    let log = LogRegion::anonymous(bytes).unwrap();
    set_log_bits(&log, bits);
    log
}

fn set_log_bits(log: &LogRegion, bits: &[u64]) {
    for p in 0..log.pages() {
        if src_bit(bits, p) {
            log.mark_pages(p, p);
        }
    }
}

fn log_bits(log: &LogRegion) -> Vec<bool> {
    (0..log.pages()).map(|p| log.test_page(p)).collect()
}

// ---------------------------------------------------------------------------------------------
// Differential tests
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Every bitmap operation, in random sequences, against the per-page model.
    #[test]
    fn bitmap_ops_match_model(
        pages in pages_strategy(),
        ops in prop::collection::vec(op_strategy(2 * BLOCK_PAGES + 100), 1..24),
    ) {
        let bm = MigrationBitmap::new(pages).unwrap();
        let mut model = Model(vec![false; pages as usize]);
        for op in &ops {
            apply(&bm, &mut model, op);
        }
        check_same(&bm, &model);
        prop_assert_eq!(bm.iter().collect::<Vec<_>>(), model.dirty());
    }

    /// Aligned and unaligned merges give the same pages as the model, for every shift.
    #[test]
    fn merge_every_shift(src in words_strategy(40), word in 0u64..6, shift in 0u64..64,
                         npages in 0u64..2600, pages in 0u64..3000) {
        let bm = MigrationBitmap::new(pages).unwrap();
        let mut model = Model(vec![false; pages as usize]);
        apply(&bm, &mut model, &Op::Merge { src, start: word * 64 + shift, npages, atomic: false });
        check_same(&bm, &model);
    }

    /// `sync_from_log` consumes exactly the log bits that map inside the bitmap, leaves the
    /// others in the log, and ORs what it consumed into the bitmap.
    #[test]
    fn sync_matches_model(
        bytes in 1usize..330,
        bits in words_strategy(42),
        pre in words_strategy(40),
        base in prop_oneof![4 => 0u64..700, 1 => (0u64..11).prop_map(|w| w * 64), 1 => Just(u64::MAX - 7)],
        pages in 0u64..3300,
    ) {
        let bits: Vec<u64> = bits.into_iter().chain(std::iter::repeat(0)).take(42).collect();
        let log = log_with(bytes, &bits);
        let before = log_bits(&log);
        let bm = MigrationBitmap::new(pages).unwrap();
        let mut model = Model(vec![false; pages as usize]);
        apply(&bm, &mut model, &Op::Merge { src: pre, start: 0, npages: u64::MAX, atomic: false });

        let got = bm.sync_from_log(&log, base);
        let mut want = 0;
        for (i, set) in before.iter().enumerate() {
            let inside = base.checked_add(i as u64).is_some_and(|p| p < pages);
            if *set && inside {
                want += model.set_page(base + i as u64);
            }
            // A bit is cleared iff it was consumed.
            prop_assert_eq!(log.test_page(i as u64), *set && !inside, "log page {}", i);
        }
        prop_assert_eq!(got, want);
        check_same(&bm, &model);
        // Nothing left to consume: a second sync finds nothing new and clears nothing more.
        prop_assert_eq!(bm.sync_from_log(&log, base), 0);
    }

    /// Deferred mode: fetch merges without clearing; clearing removes only fetched bits, so
    /// marks made between fetch and clear survive; clearing twice removes nothing more.
    #[test]
    fn fetch_then_clear_matches_model(
        bytes in 1usize..330,
        bits in words_strategy(42),
        later in words_strategy(42),
        again in words_strategy(42),
        base in prop_oneof![3 => 0u64..300, 1 => (0u64..5).prop_map(|w| w * 64)],
        pages in 0u64..3000,
        chunk in prop_oneof![1u64..200, Just(DEFAULT_CLEAR_CHUNK_PAGES), Just(u64::MAX)],
        partial in prop::collection::vec((0u64..3000, 0u64..600), 0..4),
    ) {
        let pad = |v: Vec<u64>| -> Vec<u64> { v.into_iter().chain(std::iter::repeat(0)).take(42).collect() };
        let (bits, later, again) = (pad(bits), pad(later), pad(again));
        let log = log_with(bytes, &bits);
        let before = log_bits(&log);
        let bm = MigrationBitmap::new(pages).unwrap();
        let mut model = Model(vec![false; pages as usize]);

        let mut fetched = bm.fetch_log(&log, base);
        let mut seen = vec![false; before.len()];
        let mut want = 0;
        for (i, set) in before.iter().enumerate() {
            let p = base + i as u64;
            if *set && p < pages {
                want += model.set_page(p);
                seen[i] = true;
            }
        }
        prop_assert_eq!(fetched.newly_dirty(), want);
        prop_assert_eq!(fetched.pending_pages(), seen.iter().filter(|s| **s).count() as u64);
        prop_assert_eq!(log_bits(&log), before.clone(), "fetch must not clear the log");
        check_same(&bm, &model);

        // The backend marks more pages before the VMM clears.
        set_log_bits(&log, &later);
        let mut expect: Vec<bool> = log_bits(&log);
        let mut cleared = 0;
        for (first, n) in &partial {
            cleared += fetched.clear_pages(&log, *first, *n).unwrap();
        }
        cleared += bm.clear_fetched(&log, &mut fetched, chunk).unwrap();
        // A page both fetched and re-marked is cleared (it is sent after the clear); every
        // other re-marked page stays.
        for (i, e) in expect.iter_mut().enumerate() {
            if seen[i] {
                *e = false;
            }
        }
        prop_assert_eq!(cleared, seen.iter().filter(|s| **s).count() as u64);
        prop_assert_eq!(log_bits(&log), expect.clone());
        prop_assert_eq!(fetched.pending_pages(), 0);

        // Clearing again (a repeated chunk) must not erase marks made after the first clear.
        set_log_bits(&log, &again);
        let now = log_bits(&log);
        prop_assert_eq!(bm.clear_fetched(&log, &mut fetched, chunk).unwrap(), 0);
        prop_assert_eq!(log_bits(&log), now);
        check_same(&bm, &model);
    }
}

/// The shift path carries a word's high bits into the next bitmap word; when the following
/// source words are skipped as a clean group, the carry must still land.
#[test]
fn shift_carry_into_skipped_clean_group() {
    for start in [1u64, 37, 63, 64 + 5] {
        let mut src = vec![0u64; 32];
        src[7] = 1 << 63; // last word of the first group
        src[23] = 3 << 62; // last word of the third group, before a clean partial tail
        let bm = MigrationBitmap::new(4096).unwrap();
        assert_eq!(bm.merge_lebitmap(&src, start, u64::MAX), 3, "start {start}");
        let want = [
            start + 7 * 64 + 63,
            start + 23 * 64 + 62,
            start + 23 * 64 + 63,
        ];
        assert_eq!(bm.iter().collect::<Vec<_>>(), want, "start {start}");

        // The same through a log.
        let log = LogRegion::anonymous(32 * 8).unwrap();
        for p in [7 * 64 + 63, 23 * 64 + 62, 23 * 64 + 63] {
            log.mark_pages(p, p);
        }
        let bm = MigrationBitmap::new(4096).unwrap();
        assert_eq!(bm.sync_from_log(&log, start), 3);
        assert_eq!(bm.iter().collect::<Vec<_>>(), want);
        assert_eq!(log.count_set(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrency: writers mark through the backend's DirtyLog while the VMM syncs
// ---------------------------------------------------------------------------------------------

/// Small deterministic PRNG for the writer threads.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Hands out guest pages so that **each page is marked at most once** in a run: a lost mark
/// cannot be hidden by a later mark of the same page, so the final check sees every loss.
enum Pages {
    /// Consecutive runs below a limit that may be raised (memory hotplug): all writers hit the
    /// same log word at the same time, right where the syncer is swapping.
    Consecutive { next: AtomicU64, limit: AtomicU64 },
    /// A permutation of `[0, 2^bits)` restricted to `[0, pages)`: scattered over the whole log.
    Scattered {
        next: AtomicU64,
        bits: u32,
        pages: u64,
    },
}

impl Pages {
    fn consecutive(limit: u64) -> Arc<Self> {
        Arc::new(Pages::Consecutive {
            next: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
        })
    }

    fn scattered(pages: u64) -> Arc<Self> {
        Arc::new(Pages::Scattered {
            next: AtomicU64::new(0),
            bits: 64 - (pages - 1).leading_zeros(),
            pages,
        })
    }

    fn raise_limit(&self, to: u64) {
        if let Pages::Consecutive { limit, .. } = self {
            limit.store(to, Ordering::Release);
        }
    }

    /// The next `(first_page, npages)` to mark, `Some((_, 0))` to retry later, or `None` when
    /// exhausted.
    fn take(&self, want: u64) -> Option<(u64, u64)> {
        match self {
            Pages::Consecutive { next, limit } => {
                let lim = limit.load(Ordering::Acquire);
                let cur = next.load(Ordering::Relaxed);
                let n = want.min(lim.saturating_sub(cur));
                if n == 0 {
                    return Some((0, 0));
                }
                next.compare_exchange(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed)
                    .map_or(Some((0, 0)), |_| Some((cur, n)))
            }
            Pages::Scattered { next, bits, pages } => {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >> bits != 0 {
                    return None;
                }
                // Multiplication by an odd constant permutes [0, 2^bits).
                let p = c.wrapping_mul(0x9e37_79b9_7f4a_7c15) & ((1u64 << bits) - 1);
                Some(if p < *pages { (p, 1) } else { (0, 0) })
            }
        }
    }
}

/// Runs `writers` threads that mark pages from `pages` (1..=3-page byte ranges starting and
/// ending inside a page) through `dlog` until `stop` or exhaustion, and returns every page they
/// marked.
fn spawn_writers(
    dlog: &DirtyLog,
    writers: usize,
    pages: &Arc<Pages>,
    stop: &Arc<AtomicBool>,
    start: &Arc<Barrier>,
) -> Vec<thread::JoinHandle<Vec<u64>>> {
    (0..writers)
        .map(|id| {
            let (dlog, pages, stop, start) =
                (dlog.clone(), pages.clone(), stop.clone(), start.clone());
            thread::spawn(move || {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 0x1234_5678));
                let mut marked = Vec::new();
                start.wait();
                'run: while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let r = rng.next();
                        let Some((page, n)) = pages.take(1 + r % 3) else {
                            break 'run;
                        };
                        if n == 0 {
                            std::hint::spin_loop();
                            continue;
                        }
                        let gpa = page * LOG_PAGE_SIZE + (r >> 40) % 64;
                        let len = (n - 1) * LOG_PAGE_SIZE + 1;
                        dlog.mark(gpa, len);
                        marked.extend(page..page + n);
                    }
                }
                marked
            })
        })
        .collect()
}

fn union(handles: Vec<thread::JoinHandle<Vec<u64>>>, pages: u64) -> Model {
    let mut m = Model(vec![false; pages as usize]);
    for h in handles {
        for p in h.join().unwrap() {
            m.0[p as usize] = true;
        }
    }
    m
}

const RUN: Duration = Duration::from_millis(400);

fn assert_nothing_lost(bm: &MigrationBitmap, model: &Model) {
    let lost: Vec<u64> = model.dirty().into_iter().filter(|p| !bm.test(*p)).collect();
    assert!(
        lost.is_empty(),
        "{} marked pages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    check_same(bm, model);
}

/// The VMM syncs in a loop with the given mode while 3 writers mark through the backend's
/// `DirtyLog`, in laps over a small log: in each lap the writers mark every page exactly once,
/// all of them in the word the syncer is working on, and after the lap (a final sync once all
/// marks are done) the bitmap must hold every page. A mark can never hide behind a later mark
/// of the same page, so a clear that is not an atomic swap (load + `store(0)`), or a deferred
/// clear that is a plain store instead of a `fetch_and`, loses pages here in every run.
fn concurrent_sync(deferred: bool) {
    const RING: u64 = 1024;
    let shared = SharedLog::new(RING * LOG_PAGE_SIZE).unwrap();
    let dlog = DirtyLog::new();
    dlog.replace_region(Some(shared.region().clone()));
    dlog.set_logging(true);
    let bm = MigrationBitmap::new(shared.guest_pages()).unwrap();
    let claimed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(4));
    let writers: Vec<_> = (0..3u64)
        .map(|id| {
            let (dlog, claimed, done, stop, start) = (
                dlog.clone(),
                claimed.clone(),
                done.clone(),
                stop.clone(),
                start.clone(),
            );
            thread::spawn(move || {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((id + 1) * 0x1234_5678));
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    let cur = claimed.load(Ordering::Acquire);
                    let r = rng.next();
                    let n = (1 + r % 3).min(RING.saturating_sub(cur));
                    if n == 0 {
                        thread::yield_now(); // lap complete: wait for the VMM's check
                        continue;
                    }
                    if claimed
                        .compare_exchange(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed)
                        .is_err()
                    {
                        continue;
                    }
                    dlog.mark(
                        cur * LOG_PAGE_SIZE + (r >> 40) % 64,
                        (n - 1) * LOG_PAGE_SIZE + 1,
                    );
                    done.fetch_add(n, Ordering::Release);
                }
            })
        })
        .collect();
    let mut fetched = FetchedLog::new();
    let sync = |fetched: &mut FetchedLog, round: u64| {
        if !deferred {
            bm.sync_from_log(&shared, 0);
            return;
        }
        bm.fetch_log_into(&shared, 0, fetched);
        if round.is_multiple_of(2) {
            // Interleaved, as a send loop would: clear a chunk, (send it), next chunk.
            for first in (0..RING).step_by(1000) {
                fetched.clear_pages(&shared, first, 1000).unwrap();
            }
        } else {
            bm.clear_fetched(&shared, fetched, DEFAULT_CLEAR_CHUNK_PAGES)
                .unwrap();
        }
    };
    start.wait();
    let t0 = Instant::now();
    let (mut rounds, mut laps, mut lost) = (0u64, 0u64, 0u64);
    while t0.elapsed() < RUN {
        while done.load(Ordering::Acquire) < RING {
            sync(&mut fetched, rounds);
            rounds += 1;
        }
        // Every mark of the lap is done: the final sync must find the rest.
        sync(&mut fetched, rounds);
        lost += RING - bm.count_dirty();
        assert_eq!(shared.region().count_set(), 0);
        bm.clear_range(0, RING);
        laps += 1;
        done.store(0, Ordering::Relaxed);
        claimed.store(0, Ordering::Release);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(laps >= 5, "only {laps} laps ran");
    assert_eq!(dlog.stats().out_of_range_pages, 0);
    assert_eq!(
        lost, 0,
        "{lost} marked pages lost in {laps} laps ({rounds} syncs)"
    );
}

#[test]
fn concurrent_swap_sync_loses_no_page() {
    concurrent_sync(false);
}

#[test]
fn concurrent_deferred_fetch_clear_loses_no_page() {
    concurrent_sync(true);
}

/// Writers of the migration bitmap are serialized: merges OR into it with a plain load and
/// store under the writer lock (QEMU's `bitmap_mutex` style), so everything that changes bits
/// must hold that lock. Here an aligned merge, an unaligned (shift path) merge, a log sync and
/// `set_range` race with a sender taking pages with `test_and_clear`, all on the same words
/// around a block boundary. Every bit a setter reports newly set must be taken exactly once
/// or still be set at the end: `sum(newly) == sum(taken) + count_dirty()`. An unserialized
/// read-modify-write either loses a bit another writer just set or puts back bits the sender
/// just took (it then takes them twice); without the lock the equation breaks in every run.
#[test]
fn concurrent_setters_and_takers_conserve_every_bit() {
    const WINDOW: u64 = 64 * 64; // pages: 64 words across the block boundary
    let pages = BLOCK_PAGES + WINDOW;
    let lo = BLOCK_PAGES - WINDOW / 2;
    let bm = Arc::new(MigrationBitmap::new(pages).unwrap());
    let shared = Arc::new(SharedLog::new(pages * LOG_PAGE_SIZE).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(6));
    let spawn = |id: u64, f: fn(&MigrationBitmap, &SharedLog, &mut XorShift, u64) -> u64| {
        let (bm, shared, stop, start) = (bm.clone(), shared.clone(), stop.clone(), start.clone());
        thread::spawn(move || {
            let mut rng = XorShift(0x2545_f491_4f6c_dd1d ^ ((id + 1) << 32));
            let mut total = 0;
            start.wait();
            while !stop.load(Ordering::Relaxed) {
                total += f(&bm, &shared, &mut rng, lo);
            }
            total
        })
    };
    let setters = vec![
        // Aligned merge (start on a word boundary).
        spawn(0, |bm, _, rng, lo| {
            let src: Vec<u64> = (0..WINDOW / 64).map(|_| rng.next() & rng.next()).collect();
            bm.merge_lebitmap(&src[..], lo, WINDOW)
        }),
        // Shift path.
        spawn(1, |bm, _, rng, lo| {
            let src: Vec<u64> = (0..WINDOW / 64).map(|_| rng.next() & rng.next()).collect();
            bm.merge_lebitmap(&src[..], lo + 1 + rng.next() % 63, WINDOW - 64)
        }),
        // A log, marked here and synced (the log is only written by this thread).
        spawn(2, |bm, shared, rng, lo| {
            for _ in 0..64 {
                let p = lo + rng.next() % WINDOW;
                shared.region().mark_pages(p, p + rng.next() % 16);
            }
            bm.sync_from_log(shared, 0)
        }),
        spawn(3, |bm, _, rng, lo| {
            bm.set_range(lo + rng.next() % WINDOW, rng.next() % 200)
        }),
    ];
    let taker = spawn(4, |bm, _, rng, lo| {
        bm.test_and_clear(lo + rng.next() % WINDOW, 1 + rng.next() % 300)
    });
    start.wait();
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let newly: u64 = setters.into_iter().map(|h| h.join().unwrap()).sum();
    let taken = taker.join().unwrap();
    // Marks left in the log were never reported as newly dirty; merge them now and count.
    let newly = newly + bm.sync_from_log(&*shared, 0);
    assert!(
        taken > 10_000,
        "the taker did not race enough: {taken} bits taken"
    );
    assert_eq!(
        newly,
        taken + bm.count_dirty(),
        "bits set ({newly}) != bits taken ({taken}) + bits left ({})",
        bm.count_dirty()
    );
}

/// The bitmap grows (hotplug) from another thread while the VMM syncs a log that already
/// covers the final size and writers mark anywhere in it: bits past the current bitmap end
/// stay in the log until it grows, so after the last grow and a final sync nothing is lost.
#[test]
fn growth_while_syncing_loses_no_page() {
    let pages = 2 * BLOCK_PAGES + 100;
    let shared = SharedLog::new(pages * LOG_PAGE_SIZE).unwrap();
    let dlog = DirtyLog::new();
    dlog.replace_region(Some(shared.region().clone()));
    dlog.set_logging(true);
    let bm = Arc::new(MigrationBitmap::new(100).unwrap());
    let (source, stop, start) = (
        Pages::scattered(pages),
        Arc::new(AtomicBool::new(false)),
        Arc::new(Barrier::new(4)),
    );
    let writers = spawn_writers(&dlog, 2, &source, &stop, &start);
    let grower = {
        let bm = bm.clone();
        let start = start.clone();
        thread::spawn(move || {
            start.wait();
            let mut p = 100;
            while p < pages {
                thread::sleep(Duration::from_millis(10));
                p = (p + 7919 * 4).min(pages);
                bm.grow(p).unwrap();
            }
        })
    };
    start.wait();
    let t0 = Instant::now();
    let mut max_pending = 0;
    while t0.elapsed() < RUN || bm.pages() < pages {
        bm.sync_from_log(&shared, 0);
        // Marks past the bitmap end wait in the log.
        max_pending = max_pending.max(shared.region().count_set());
    }
    stop.store(true, Ordering::Relaxed);
    grower.join().unwrap();
    let model = union(writers, pages);
    bm.sync_from_log(&shared, 0);
    assert!(
        max_pending > 0,
        "no mark ever waited for the bitmap to grow"
    );
    assert_eq!(shared.region().count_set(), 0);
    assert_nothing_lost(&bm, &model);
}

/// Log resize for memory hotplug: a larger second `SharedLog` replaces the first while writers
/// mark; the old log is drained only after the backend's switch returned (the `SET_LOG_BASE`
/// ack), and no mark in either log is lost. Each page is marked once, so a drain before the
/// switch (marks landing in the old log after it) or a dropped old log shows as lost pages.
#[test]
fn log_resize_with_old_log_drain_loses_no_page() {
    // Large enough that the writers (fast in release builds, and possibly alone on the CPUs
    // for a whole scheduler tick) are still inside the old log when the switch happens.
    let (small, large) = (1u64 << 22, 3u64 << 22);
    let old = SharedLog::new(small * LOG_PAGE_SIZE).unwrap();
    let dlog = DirtyLog::new();
    dlog.replace_region(Some(old.region().clone()));
    dlog.set_logging(true);
    let bm = MigrationBitmap::new(old.guest_pages()).unwrap();
    let (source, stop, start) = (
        Pages::consecutive(small),
        Arc::new(AtomicBool::new(false)),
        Arc::new(Barrier::new(4)),
    );
    let writers = spawn_writers(&dlog, 3, &source, &stop, &start);
    start.wait();
    let t0 = Instant::now();
    let progress = || match &*source {
        Pages::Consecutive { next, .. } => next.load(Ordering::Relaxed),
        Pages::Scattered { .. } => unreachable!(),
    };
    // 1-2. a larger log, and room for it in the bitmap (prepared up front, so that the switch
    // below happens while the writers are still busy in the old log, even in release builds).
    let new = SharedLog::new(large * LOG_PAGE_SIZE).unwrap();
    assert_eq!(bm.grow(new.guest_pages()).unwrap(), small);
    // Switch while the writers are busy in the old log.
    while progress() < small / 8 {
        bm.sync_from_log(&old, 0);
    }
    // 3. SET_LOG_BASE: the backend switches and replies once no mark still targets `old`.
    //    Writers keep marking (below `small`) into whichever log is current.
    let retired = dlog.replace_region(Some(new.region().clone())).unwrap();
    assert!(retired.same_memory(old.region()));
    let switched_at = progress();
    // 4. drain the old log; 5. drop it.
    bm.drain_log(&old);
    assert_eq!(old.region().count_set(), 0);
    drop(retired);
    drop(old);
    // The guest now uses the hotplugged memory.
    source.raise_limit(large);
    while t0.elapsed() < RUN {
        bm.sync_from_log(&new, 0);
    }
    stop.store(true, Ordering::Relaxed);
    let model = union(writers, large);
    bm.sync_from_log(&new, 0);
    assert!(
        switched_at < small,
        "the writers were done before the switch"
    );
    assert_eq!(dlog.stats().out_of_range_pages, 0);
    assert_nothing_lost(&bm, &model);
}

// ---------------------------------------------------------------------------------------------
// SharedLog and hostile input
// ---------------------------------------------------------------------------------------------

#[test]
fn shared_log_is_sealed_memfd_shared_with_backend_mapping() {
    use std::os::fd::AsRawFd;
    let log = SharedLog::new(64 << 30).unwrap();
    assert_eq!(log.size(), 2 << 20);
    assert_eq!(log.guest_pages(), 16 << 20);
    let r = log.dirty_log_region();
    assert_eq!(r.mmap_size, 2 << 20);
    assert_eq!(r.mmap_offset, 0);
    assert_eq!(r.mmap_handle, log.fd().as_raw_fd());

    // SAFETY: test code; fcntl/fstat on an fd we own, plain integer / out-parameter arguments.
    let (seals, flags, len) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(r.mmap_handle, &mut st), 0);
        (
            libc::fcntl(r.mmap_handle, libc::F_GET_SEALS),
            libc::fcntl(r.mmap_handle, libc::F_GETFD),
            st.st_size as u64,
        )
    };
    assert_eq!(len, log.size());
    let want = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want);
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
    // SAFETY: test code; ftruncate on an fd we own, integer arguments only.
    let shrunk = unsafe { libc::ftruncate(r.mmap_handle, 4096) };
    assert_ne!(shrunk, 0, "shrink must be refused");

    // The backend maps the same fd from the SET_LOG_BASE triple and marks; the VMM sees it.
    let backend = LogRegion::from_fd(log.fd(), r.mmap_offset, r.mmap_size).unwrap();
    backend.mark_pages(12345, 12400);
    backend.mark_pages(16 * 1024 * 1024 - 1, 16 * 1024 * 1024 - 1);
    let bm = MigrationBitmap::new(log.guest_pages()).unwrap();
    assert_eq!(bm.sync_from_log(&log, 0), 57);
    assert_eq!(backend.count_set(), 0);
    assert_eq!(bm.next_dirty(0), Some(12345));
    assert_eq!(bm.next_dirty(12401), Some(16 * 1024 * 1024 - 1));
}

#[test]
fn hostile_sizes_are_errors_not_panics() {
    assert!(matches!(SharedLog::new(0), Err(VmmError::ZeroSize)));
    assert!(matches!(
        SharedLog::new(u64::MAX),
        Err(VmmError::GpaTooLarge { .. })
    ));
    assert!(matches!(
        SharedLog::new(MAX_GPA_END + 1),
        Err(VmmError::GpaTooLarge { .. })
    ));
    // Not a whole page: still one page of log (one word).
    assert_eq!(SharedLog::new(1).unwrap().size(), 8);
    assert!(matches!(
        MigrationBitmap::new(MAX_PAGES + 1),
        Err(VmmError::TooManyPages { .. })
    ));
    let bm = MigrationBitmap::new(1000).unwrap();
    assert!(matches!(
        bm.grow(u64::MAX),
        Err(VmmError::TooManyPages { .. })
    ));
    assert_eq!(bm.pages(), 1000);
    assert_eq!(bm.grow(10).unwrap(), 1000, "shrinking is a no-op");

    // Indices past the end are clamped, never a panic.
    assert_eq!(bm.merge_lebitmap(&[!0u64; 4], u64::MAX, u64::MAX), 0);
    assert_eq!(bm.merge_lebitmap(&[!0u64; 4], u64::MAX - 3, 200), 0);
    assert_eq!(bm.merge_lebitmap(&[!0u64; 4], 990, u64::MAX), 10);
    let empty: [u64; 0] = [];
    assert_eq!(bm.merge_lebitmap(&empty, 0, u64::MAX), 0);
    assert_eq!(bm.set_range(u64::MAX - 1, u64::MAX), 0);
    assert_eq!(bm.test_and_clear(u64::MAX, 1), 0);
    bm.clear_range(1000, u64::MAX);
    assert!(!bm.test(u64::MAX));
    assert_eq!(bm.next_dirty(u64::MAX), None);
    assert_eq!(bm.iter_range(u64::MAX, u64::MAX).count(), 0);
    assert_eq!(bm.count_dirty(), 10);

    // A log larger than the bitmap, synced at an absurd base: nothing taken, nothing lost.
    let log = LogRegion::anonymous(1 << 12).unwrap();
    log.mark_pages(0, 100);
    assert_eq!(bm.sync_from_log(&log, u64::MAX), 0);
    assert_eq!(bm.sync_from_log(&log, u64::MAX - 64), 0);
    assert_eq!(log.count_set(), 101);
    let mut f = bm.fetch_log(&log, 995);
    assert_eq!(f.newly_dirty(), 0, "pages 995..1000 were already dirty");
    assert!(matches!(
        bm.clear_fetched(&log, &mut f, 0),
        Err(VmmError::ZeroChunk)
    ));
    let other = LogRegion::anonymous(1 << 12).unwrap();
    assert!(matches!(
        bm.clear_fetched(&other, &mut f, 64),
        Err(VmmError::FetchMismatch)
    ));
    assert!(matches!(
        f.clear_pages(&other, 0, 64),
        Err(VmmError::FetchMismatch)
    ));
    assert_eq!(f.clear_pages(&log, u64::MAX, u64::MAX).unwrap(), 0);
    assert_eq!(bm.clear_fetched(&log, &mut f, u64::MAX).unwrap(), 5);
    assert_eq!(log.count_set(), 96);

    // Error messages say what went wrong.
    let msg = SharedLog::new(u64::MAX).unwrap_err().to_string();
    assert!(msg.contains("exceeds the supported maximum"), "{msg}");
}
