//! VMM-side merge of a 64 GiB guest's log (16 Mi pages, 2 MiB of log) into the migration
//! bitmap, against the two things it has to be compared with:
//!
//! - **per-bit** merge, the pre-2010 QEMU way: for every page, test its log bit and, if set,
//!   clear it and set the bitmap bit (atomics, into a flat bitmap: the most favourable layout
//!   for the baseline);
//! - the **memory-scan limit**: one relaxed load of every log word, summed. No merge can read
//!   the log faster, so `sync/scan` is how much the merge costs beyond reading.
//!
//! It also times the **swap floor**: only the `swap(0, Acquire)` of each non-zero log word,
//! with the word indices known in advance (no scan, no bitmap). DESIGN.md invariant 3 makes
//! one atomic swap per dirty word the price of a lossless clear, so `(scan + swaps) / scan` is
//! the best ratio any conforming sync can reach on this machine, and `sync / (scan + swaps)`
//! is how far ours is from it.
//!
//! and aligned vs unaligned `merge_lebitmap` (the shift path). Each sync row also shows the
//! deferred mode's first step (`fetch_log_into` with a reused record: merge without clearing;
//! the clears happen later, chunk by chunk, right before each chunk is sent).
//!
//! Densities are fractions of dirty pages, in two shapes: *scattered* (every page dirty
//! independently: the worst case for a word-wise merge, since at 1% half of all words are
//! non-zero) and *clustered* (runs of 16 pages = 64 KiB, like block I/O buffers and guest page
//! cache writes). Every iteration of `sync` and `per-bit` starts from a freshly re-dirtied log
//! (criterion: `iter_batched` with the refill as setup; own timing: refill outside the timed
//! region); `scan` gets the same refill so all three see the same cache state.
//!
//! Each group prints ratios from medians measured in the same run (criterion's own reports
//! follow). Run with `cargo bench --bench merge`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode};
use vhost_dirtylog::log::LOG_PAGE_SHIFT;
use vhost_dirtylog::vmm::{FetchedLog, MigrationBitmap, SharedLog};

const GUEST_BYTES: u64 = 64 << 30;
const PAGES: u64 = GUEST_BYTES >> LOG_PAGE_SHIFT;
const WORDS: usize = (PAGES / 64) as usize;
const DENSITIES: [f64; 4] = [0.001, 0.01, 0.10, 1.0];
/// Repetitions for the printed medians.
const REPS: usize = 15;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[derive(Clone, Copy)]
enum Shape {
    Scattered,
    Clustered,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Scattered => "scattered",
            Shape::Clustered => "clustered-64KiB",
        }
    }
}

/// A log image with `density` of its pages dirty.
fn pattern(density: f64, shape: Shape) -> Vec<u64> {
    if density >= 1.0 {
        return vec![!0; WORDS];
    }
    let mut rng = Rng(0x5eed ^ density.to_bits());
    let mut v = vec![0u64; WORDS];
    match shape {
        Shape::Scattered => {
            let threshold = (density * (1u64 << 32) as f64) as u64;
            for w in v.iter_mut() {
                for b in 0..64 {
                    if rng.next() >> 32 < threshold {
                        *w |= 1 << b;
                    }
                }
            }
        }
        Shape::Clustered => {
            // 16-page runs at 16-page-aligned random places until the density is reached.
            let runs = (density * PAGES as f64 / 16.0) as u64;
            let mut placed = 0;
            while placed < runs {
                let run = rng.next() % (PAGES / 16);
                let (w, shift) = ((run / 4) as usize, (run % 4) * 16);
                if v[w] & (0xffff << shift) == 0 {
                    v[w] |= 0xffff << shift;
                    placed += 1;
                }
            }
        }
    }
    v
}

fn refill(log: &[AtomicU64], pat: &[u64]) {
    for (w, p) in log.iter().zip(pat) {
        w.store(*p, Ordering::Relaxed);
    }
}

/// The memory-scan limit: read every log word once.
fn scan(log: &[AtomicU64]) -> u64 {
    log.iter()
        .fold(0u64, |acc, w| acc.wrapping_add(w.load(Ordering::Relaxed)))
}

/// The swap floor: one Acquire swap per non-zero word, indices given.
fn swaps(log: &[AtomicU64], dirty: &[u32]) -> u64 {
    dirty.iter().fold(0u64, |acc, &i| {
        acc.wrapping_add(log[i as usize].swap(0, Ordering::Acquire))
    })
}

/// Pre-2010 QEMU: one page at a time.
fn per_bit(log: &[AtomicU64], bitmap: &[AtomicU64]) -> u64 {
    let mut n = 0;
    for p in 0..PAGES {
        let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
        if log[w].load(Ordering::Relaxed) & bit != 0 {
            log[w].fetch_and(!bit, Ordering::Acquire);
            if bitmap[w].fetch_or(bit, Ordering::Release) & bit == 0 {
                n += 1;
            }
        }
    }
    n
}

/// Medians of `REPS` timings of each of `fs`, each run after `setup`. The functions take turns
/// within every repetition, so a burst of outside load hits all of them alike and the ratios
/// stay meaningful on a busy machine.
fn medians<const N: usize>(setup: impl Fn(), fs: [&dyn Fn() -> u64; N]) -> [Duration; N] {
    let mut t: [Vec<Duration>; N] = std::array::from_fn(|_| Vec::with_capacity(REPS));
    for _ in 0..REPS {
        for (times, f) in t.iter_mut().zip(fs) {
            setup();
            let t0 = Instant::now();
            black_box(f());
            times.push(t0.elapsed());
        }
    }
    t.map(|mut v| {
        v.sort();
        v[REPS / 2]
    })
}

fn fmt(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_nanos() as f64 / b.as_nanos().max(1) as f64
}

fn sync_benches(c: &mut Criterion) {
    let log = SharedLog::new(GUEST_BYTES).expect("log");
    // The log's raw atomics (test tooling, feature `test-utils`): to refill the log between
    // timed syncs and to time the scan, swap-floor and per-bit baselines on the same memory.
    let words = log.region().raw_words();
    assert_eq!(words.len(), WORDS);
    let bm = MigrationBitmap::new(PAGES).expect("bitmap");
    let flat: Vec<AtomicU64> = (0..WORDS).map(|_| AtomicU64::new(0)).collect();
    let record = std::cell::RefCell::new(FetchedLog::new());

    println!("\n== sync: 64 GiB guest, 16 Mi pages, 2 MiB log; medians of {REPS} ==");
    println!("   targets: sync/scan <= 1.5x at <= 1% density; per-bit/sync >= 20x at 10%");
    println!(
        "   floor = scan + one swap per non-zero word (invariant 3): the best any sync can do"
    );
    for shape in [Shape::Scattered, Shape::Clustered] {
        for density in DENSITIES {
            if density >= 1.0 && matches!(shape, Shape::Clustered) {
                continue; // same log as scattered 100%
            }
            let pat = pattern(density, shape);
            let dirty: Vec<u32> = (0..WORDS as u32)
                .filter(|&i| pat[i as usize] != 0)
                .collect();
            let nonzero = dirty.len() as f64 / WORDS as f64;
            let label = format!("{} {}%", shape.name(), density * 100.0);

            let fetch = || bm.fetch_log_into(&log, 0, &mut record.borrow_mut());
            let [t_sync, t_scan, t_bit, t_swaps, t_fetch] = medians(
                || refill(words, &pat),
                [
                    &|| bm.sync_from_log(&log, 0),
                    &|| scan(words),
                    &|| per_bit(words, &flat),
                    &|| swaps(words, &dirty),
                    &fetch,
                ],
            );
            let floor = t_scan + t_swaps;
            println!(
                "{label:>24} ({:5.1}% words non-zero): sync {:>10}  scan {:>10}  per-bit {:>10}  floor {:>10} | sync/scan = {:.2}x (floor/scan = {:.2}x, sync/floor = {:.2}x), per-bit/sync = {:.1}x | deferred fetch {:>10} = {:.2}x scan",
                nonzero * 100.0,
                fmt(t_sync),
                fmt(t_scan),
                fmt(t_bit),
                fmt(floor),
                ratio(t_sync, t_scan),
                ratio(floor, t_scan),
                ratio(t_sync, floor),
                ratio(t_bit, t_sync),
                fmt(t_fetch),
                ratio(t_fetch, t_scan),
            );

            let mut g = c.benchmark_group(format!("sync/{label}"));
            g.sampling_mode(SamplingMode::Flat);
            g.bench_function("sync", |b| {
                b.iter_batched(
                    || refill(words, &pat),
                    |()| bm.sync_from_log(&log, 0),
                    BatchSize::PerIteration,
                )
            });
            g.bench_function("scan", |b| {
                b.iter_batched(
                    || refill(words, &pat),
                    |()| scan(words),
                    BatchSize::PerIteration,
                )
            });
            g.bench_function("per-bit", |b| {
                b.iter_batched(
                    || refill(words, &pat),
                    |()| per_bit(words, &flat),
                    BatchSize::PerIteration,
                )
            });
            g.bench_function("deferred-fetch", |b| {
                b.iter_batched(
                    || refill(words, &pat),
                    |()| fetch(),
                    BatchSize::PerIteration,
                )
            });
            g.finish();
        }
    }
}

fn merge_benches(c: &mut Criterion) {
    // One word of slack so the unaligned merge of the whole source fits.
    let bm = MigrationBitmap::new(PAGES + 64).expect("bitmap");
    println!("\n== merge_lebitmap: 16 Mi-page source, aligned (start 0) vs unaligned (start 37); medians of {REPS} ==");
    println!("   target: unaligned/aligned <= 2x");
    for density in [0.01, 0.10, 1.0] {
        let src = pattern(density, Shape::Scattered);
        let label = format!("scattered {}%", density * 100.0);
        let [t_al, t_un] = medians(
            || (),
            [&|| bm.merge_lebitmap(&src[..], 0, PAGES), &|| {
                bm.merge_lebitmap(&src[..], 37, PAGES)
            }],
        );
        println!(
            "{label:>24}: aligned {:>10}  unaligned {:>10} | unaligned/aligned = {:.2}x",
            fmt(t_al),
            fmt(t_un),
            ratio(t_un, t_al)
        );
        let mut g = c.benchmark_group(format!("merge_lebitmap/{label}"));
        g.sampling_mode(SamplingMode::Flat);
        g.bench_function("aligned", |b| {
            b.iter(|| bm.merge_lebitmap(&src[..], 0, PAGES))
        });
        g.bench_function("unaligned", |b| {
            b.iter(|| bm.merge_lebitmap(&src[..], 37, PAGES))
        });
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

criterion_group! {
    name = benches;
    config = config();
    targets = sync_benches, merge_benches
}
criterion_main!(benches);
