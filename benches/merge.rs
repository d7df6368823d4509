//! VMM-side sync of a 64 GiB guest's log (16 Mi pages, 2 MiB of log) into the migration
//! bitmap, against the peers users actually run and against what memory allows:
//!
//! - **qemu**: QEMU's vhost sync, reproduced from its source (`hw/virtio/vhost.c`
//!   `vhost_dev_sync_region`, `system/memory.c` `memory_region_set_dirty`,
//!   `include/exec/ram_addr.h` `cpu_physical_memory_set_dirty_range` /
//!   `cpu_physical_memory_sync_dirty_bitmap`, `util/bitmap.c` `bitmap_set_atomic`,
//!   `include/qemu/rcu.h`): a plain read skips each zero log word, each non-zero word is taken
//!   with an exchange, and **every set bit** costs an out-of-line `memory_region_set_dirty`: an
//!   RCU read-side enter (thread-local reader reached through an out-of-line accessor, a full
//!   fence: `smp_mb_placeholder()` is `smp_mb()` unless QEMU was configured with
//!   `--enable-membarrier`, which is off by default) and exit (Release store, full fence, read
//!   of `waiting`), and a sequentially consistent `fetch_or` into the page's bit of
//!   `ram_list.dirty_memory[DIRTY_MEMORY_MIGRATION]` (blocks of 2 Mi pages behind an
//!   RCU-published pointer). Then `migration_bitmap_sync` (under `bitmap_mutex` and one RCU read
//!   section) moves those words into the RAMBlock's bitmap: plain read, exchange of each
//!   non-zero word, OR into `rb->bmap`, popcount of the new bits. (The KVM `clear_bmap`
//!   bookkeeping, one bit per 1 GiB, is left out.)
//! - **sync**: ours, `MigrationBitmap::sync_from_log` (one swap per non-zero word).
//! - **flip**: the flip merge, `LogFlip::merge_retired`: a retired log merged with plain loads,
//!   its dirty words cleared with plain stores.
//! - **scan**: one relaxed load of every log word, summed: the memory-scan limit.
//! - **floor** = scan + *swaps* (only the `swap(0, Acquire)` of each non-zero word, indices
//!   known in advance): the least any sync that clears the live log with swaps (DESIGN.md
//!   invariant 3) can cost.
//! - **fetch**: the deferred mode's first step (`fetch_log_into`, record reused).
//! - **stream**: the stream floor of a flip (`stream_floor`): every log word read, ORed into a
//!   flat bitmap and cleared, branch-free. Once most log lines hold a dirty word any merge that
//!   clears the retired log with stores must move this much memory; stream/scan says how far
//!   the plain scan is from reachable at that density.
//!
//! Two settings. *local*: the log is re-dirtied by the syncing thread itself right before each
//! timed call, so it is hot in that core's caches (the most favourable case). *cross-core*: a
//! thread pinned to another CPU writes the log (every word, as a plain store of the pattern)
//! before each timed call, as a backend does, so the syncing core (pinned too) finds the log's
//! lines modified in the other core's cache or in the shared L3.
//!
//! Densities are fractions of dirty pages, in two shapes: *scattered* (every page dirty
//! independently: the worst case for a word-wise merge, since at 1% half of all words are
//! non-zero) and *clustered* (runs of 16 pages = 64 KiB, like block I/O buffers and guest page
//! cache writes). Columns take turns within every repetition, each after its own re-dirtying,
//! so a burst of outside load hits all of them alike.
//!
//! Each row prints medians and the issue-17 ratios (qemu/sync, flip/scan, sync/floor).
//! Criterion's own reports (local setting) follow. `MERGE_REPS=n` sets the repetitions for the
//! printed medians (default 15), `MERGE_ROWS` selects rows (see `row_selected`);
//! `cargo bench --bench merge -- none` skips criterion's part.

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode};
use vhost_dirtylog::log::{LogRegion, LOG_PAGE_SHIFT};
use vhost_dirtylog::vmm::{FetchedLog, LogFlip, MigrationBitmap, SharedLog};

const GUEST_BYTES: u64 = 64 << 30;
const PAGES: u64 = GUEST_BYTES >> LOG_PAGE_SHIFT;
const WORDS: usize = (PAGES / 64) as usize;
const DENSITIES: [f64; 4] = [0.001, 0.01, 0.10, 1.0];

/// Repetitions for the printed medians (`MERGE_REPS`, default 15).
fn reps() -> usize {
    std::env::var("MERGE_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(15)
}

/// `MERGE_ROWS=a,b`: only the sync rows whose label contains one of the comma-separated
/// strings (e.g. `MERGE_ROWS="scattered 1%,clustered"`).
fn row_selected(label: &str) -> bool {
    std::env::var("MERGE_ROWS").map_or(true, |f| f.split(',').any(|p| label.contains(p)))
}

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

/// The stream floor of a flip merge: every log word read, ORed into a flat bitmap of the same
/// size (no blocks, no growth, no locks), its new bits counted, and the log word cleared, with
/// no branch at all: three sequential streams the compiler vectorises. Once most cache lines
/// of the log hold a dirty word (at 1% scattered, 47% of the words are non-zero), any merge
/// into a separate bitmap must read and write every line of both, so nothing that clears a
/// retired log with stores can beat this by much; on sparse logs it is an upper bound.
fn stream_floor(log: &[AtomicU64], bm: &[AtomicU64]) -> u64 {
    let mut newly = 0;
    for (w, b) in log.iter().zip(bm) {
        let v = w.load(Ordering::Relaxed);
        let old = b.load(Ordering::Relaxed);
        b.store(old | v, Ordering::Relaxed);
        w.store(0, Ordering::Relaxed);
        newly += u64::from((v & !old).count_ones());
    }
    newly
}

// ---------------------------------------------------------------------------------------------
// QEMU's vhost sync, from its description (see the file docs). Names follow QEMU's.
// ---------------------------------------------------------------------------------------------

/// `DIRTY_MEMORY_BLOCK_SIZE`: pages per block of `ram_list.dirty_memory[]` (256 Ki * 8).
const QEMU_BLOCK_PAGES: usize = 256 * 1024 * 8;
const QEMU_BLOCK_WORDS: usize = QEMU_BLOCK_PAGES / 64;
/// `DIRTY_MEMORY_MIGRATION` and the mask bit `memory_region_get_dirty_log_mask` returns for it.
const DIRTY_MEMORY_MIGRATION: u8 = 2;

/// `struct rcu_reader_data`: per-thread reader state.
struct RcuReader {
    ctr: AtomicUsize,
    waiting: AtomicBool,
    depth: Cell<u32>,
}

thread_local! {
    static RCU_READER: RcuReader = const {
        RcuReader { ctr: AtomicUsize::new(0), waiting: AtomicBool::new(false), depth: Cell::new(0) }
    };
}

/// `rcu_gp_ctr`.
static RCU_GP_CTR: AtomicUsize = AtomicUsize::new(1);

/// `get_ptr_rcu_reader()`: QEMU reaches the thread-local reader through an out-of-line
/// accessor (`QEMU_DEFINE_CO_TLS`).
#[inline(never)]
fn with_rcu_reader<R>(f: impl FnOnce(&RcuReader) -> R) -> R {
    RCU_READER.with(f)
}

/// `rcu_read_lock()` (static inline; `smp_mb_placeholder()` = `smp_mb()`).
#[inline(always)]
fn rcu_read_lock() {
    with_rcu_reader(|r| {
        let d = r.depth.get();
        r.depth.set(d + 1);
        if d > 0 {
            return;
        }
        let ctr = RCU_GP_CTR.load(Ordering::Relaxed);
        r.ctr.store(ctr, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    })
}

/// `rcu_read_unlock()`.
#[inline(always)]
fn rcu_read_unlock() {
    with_rcu_reader(|r| {
        let d = r.depth.get() - 1;
        r.depth.set(d);
        if d > 0 {
            return;
        }
        r.ctr.store(0, Ordering::Release);
        fence(Ordering::SeqCst);
        if r.waiting.load(Ordering::Relaxed) {
            r.waiting.store(false, Ordering::Relaxed);
        }
    })
}

/// `DirtyMemoryBlocks`: the blocks of one dirty-memory client.
struct DirtyMemoryBlocks {
    blocks: Vec<Box<[AtomicU64]>>,
}

/// The state QEMU's sync touches.
struct Qemu {
    /// `ram_list.dirty_memory[DIRTY_MEMORY_MIGRATION]`, an RCU-published pointer.
    dirty_memory: AtomicPtr<DirtyMemoryBlocks>,
    _owner: Box<DirtyMemoryBlocks>,
    /// `mr->dirty_log_mask` and `global_dirty_tracking`, read by
    /// `memory_region_get_dirty_log_mask` on every call.
    dirty_log_mask: AtomicU8,
    global_dirty_tracking: AtomicBool,
    /// `mr->ram_block->offset` (`memory_region_get_ram_addr`).
    ram_addr: AtomicU64,
    /// `rb->bmap` under `ram_state->bitmap_mutex`.
    bmap: Mutex<Vec<u64>>,
}

impl Qemu {
    fn new() -> Self {
        let nblocks = (PAGES as usize).div_ceil(QEMU_BLOCK_PAGES);
        let mut owner = Box::new(DirtyMemoryBlocks {
            blocks: (0..nblocks)
                .map(|_| (0..QEMU_BLOCK_WORDS).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        });
        let ptr: *mut DirtyMemoryBlocks = &mut *owner;
        Qemu {
            dirty_memory: AtomicPtr::new(ptr),
            _owner: owner,
            dirty_log_mask: AtomicU8::new(0),
            global_dirty_tracking: AtomicBool::new(true),
            ram_addr: AtomicU64::new(0),
            bmap: Mutex::new(vec![0; WORDS]),
        }
    }

    fn blocks(&self) -> &DirtyMemoryBlocks {
        // SAFETY: `dirty_memory` always points at `_owner`, which lives as long as `self` and
        // is only accessed through atomics (the `qatomic_rcu_read` of QEMU's pointer).
        unsafe { &*self.dirty_memory.load(Ordering::Acquire) }
    }

    /// `memory_region_get_dirty_log_mask`, KVM and a migratable RAM block.
    #[inline(always)]
    fn dirty_log_mask(&self) -> u8 {
        let mut mask = self.dirty_log_mask.load(Ordering::Relaxed);
        if self.global_dirty_tracking.load(Ordering::Relaxed) {
            mask |= 1 << DIRTY_MEMORY_MIGRATION;
        }
        mask
    }

    /// `memory_region_set_dirty(mr, addr, 4096)` (out of line, in `system/memory.c`), with
    /// `cpu_physical_memory_set_dirty_range` inlined into it.
    #[inline(never)]
    fn memory_region_set_dirty(&self, mr_offset: u64, size: u64) {
        let mask = self.dirty_log_mask();
        let start = self.ram_addr.load(Ordering::Relaxed) + mr_offset;
        if mask == 0 {
            return;
        }
        let end = (start + size).div_ceil(4096) as usize;
        let mut page = (start >> LOG_PAGE_SHIFT) as usize;
        rcu_read_lock();
        let blocks = self.blocks();
        let mut idx = page / QEMU_BLOCK_PAGES;
        let mut offset = page % QEMU_BLOCK_PAGES;
        let mut base = page - offset;
        while page < end {
            let next = end.min(base + QEMU_BLOCK_PAGES);
            if mask & (1 << DIRTY_MEMORY_MIGRATION) != 0 {
                bitmap_set_atomic(&blocks.blocks[idx], offset, next - page);
            }
            page = next;
            idx += 1;
            offset = 0;
            base += QEMU_BLOCK_PAGES;
        }
        rcu_read_unlock();
    }

    /// `vhost_dev_sync_region` over one 64 GiB RAM section at guest-physical 0.
    fn vhost_dev_sync_region(&self, log: &[AtomicU64]) {
        let mut addr = 0u64;
        for from in log {
            // "We first check with non-atomic: much cheaper"
            if from.load(Ordering::Relaxed) == 0 {
                addr += 64 * 4096;
                continue;
            }
            let mut l = from.swap(0, Ordering::SeqCst);
            while l != 0 {
                let bit = l.trailing_zeros() as u64;
                let page_addr = addr + bit * 4096;
                // section_offset = page_addr - offset_within_address_space (0);
                // mr_offset = section_offset + offset_within_region (0).
                self.memory_region_set_dirty(black_box(page_addr), 4096);
                l &= !(1u64 << bit);
            }
            addr += 64 * 4096;
        }
    }

    /// `migration_bitmap_sync` → `cpu_physical_memory_sync_dirty_bitmap` (aligned path) for
    /// the one RAM block; returns the newly dirty pages.
    fn migration_bitmap_sync(&self) -> u64 {
        let mut dest = self.bmap.lock().unwrap();
        rcu_read_lock();
        let src = self.blocks();
        let (mut idx, mut offset) = (0, 0);
        let mut num_dirty = 0;
        for d in dest.iter_mut() {
            let w = &src.blocks[idx][offset];
            if w.load(Ordering::Relaxed) != 0 {
                let bits = w.swap(0, Ordering::SeqCst);
                let new_dirty = !*d & bits;
                *d |= bits;
                num_dirty += new_dirty.count_ones() as u64;
            }
            offset += 1;
            if offset >= QEMU_BLOCK_WORDS {
                offset = 0;
                idx += 1;
            }
        }
        rcu_read_unlock();
        num_dirty
    }

    /// One round: the vhost log sync, then the migration bitmap sync.
    fn sync(&self, log: &[AtomicU64]) -> u64 {
        self.vhost_dev_sync_region(log);
        self.migration_bitmap_sync()
    }
}

/// `bitmap_set_atomic` (out of line, `util/bitmap.c`): SeqCst ORs for the partial first and
/// last words, plain stores for whole words in between (then a full fence).
#[inline(never)]
fn bitmap_set_atomic(map: &[AtomicU64], start: usize, nr: usize) {
    let mut p = start / 64;
    let size = start + nr;
    let mut nr = nr as isize;
    let mut bits_to_set = 64 - (start % 64) as isize;
    let mut mask_to_set = !0u64 << (start % 64);
    if nr - bits_to_set > 0 {
        map[p].fetch_or(mask_to_set, Ordering::SeqCst);
        nr -= bits_to_set;
        bits_to_set = 64;
        mask_to_set = !0;
        p += 1;
    }
    if bits_to_set == 64 {
        while nr >= 64 {
            map[p].store(!0, Ordering::Relaxed);
            nr -= 64;
            p += 1;
        }
    }
    if nr != 0 {
        mask_to_set &= !0u64 >> ((64 - size % 64) % 64);
        map[p].fetch_or(mask_to_set, Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------------

/// One column: re-dirty its log (untimed), then the timed call.
type Column<'a> = (&'a dyn Fn(), &'a dyn Fn() -> u64);

/// Medians of `reps` timings of each column. The columns take turns within every repetition,
/// so a burst of outside load hits all of them alike and the ratios stay meaningful on a busy
/// machine.
fn medians<const N: usize>(reps: usize, cols: [Column; N]) -> [Duration; N] {
    let mut t: [Vec<Duration>; N] = std::array::from_fn(|_| Vec::with_capacity(reps));
    for _ in 0..reps {
        for (times, (setup, f)) in t.iter_mut().zip(cols) {
            setup();
            let t0 = Instant::now();
            black_box(f());
            times.push(t0.elapsed());
        }
    }
    t.map(|mut v| {
        v.sort();
        v[reps / 2]
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

/// Pins the calling thread to `cpu`. False if that is not possible.
fn pin(cpu: usize) -> bool {
    // SAFETY: `set` is a plain bit set, zero-initialised and filled by the libc helpers;
    // sched_setaffinity only reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The first two CPUs this process may run on.
fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: as in `pin`; sched_getaffinity fills `set` for the calling thread.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: CPU_ISSET only reads the set.
    let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    Some((cpus.next()?, cpus.next()?))
}

/// Where the log is re-dirtied before each timed call.
#[derive(Clone, Copy, PartialEq)]
enum Setting {
    Local,
    CrossCore,
}

/// The logs of one run: index 0 is the swap-synced `SharedLog`, 1 and 2 the flip pair.
struct Logs<'a> {
    words: [&'a [AtomicU64]; 3],
}

/// The medians of one row, in column order.
struct Row {
    qemu: Duration,
    sync: Duration,
    flip: Duration,
    scan: Duration,
    swaps: Duration,
    fetch: Duration,
    /// [`stream_floor`].
    stream: Duration,
}

struct Bench<'a> {
    log: &'a SharedLog,
    logs: &'a Logs<'a>,
    flip_regions: &'a [Arc<LogRegion>; 2],
    bm: &'a MigrationBitmap,
    qemu: &'a Qemu,
    flip: &'a RefCell<LogFlip>,
    record: &'a RefCell<FetchedLog>,
    /// The flat bitmap of the merge floors.
    flat: &'a [AtomicU64],
}

impl Bench<'_> {
    /// Hands the flip a retired log to merge (begin + commit: the backend "replied") and
    /// returns which of `logs` it is.
    fn retire(&self) -> usize {
        let mut f = self.flip.borrow_mut();
        f.begin().expect("begin");
        f.commit().expect("commit");
        if f.standby().region().same_memory(&self.flip_regions[0]) {
            1
        } else {
            2
        }
    }

    fn merge_retired(&self) -> u64 {
        self.flip
            .borrow_mut()
            .merge_retired(self.bm)
            .expect("merge_retired")
    }

    /// All columns, each log re-dirtied by `dirty(log index)` before each timed call.
    fn row(&self, reps: usize, dirty: &dyn Fn(usize), nz: &[u32]) -> Row {
        let words = self.logs.words[0];
        let d0 = || dirty(0);
        let flip_setup = || dirty(self.retire());
        let fetch = || {
            self.bm
                .fetch_log_into(self.log, 0, &mut self.record.borrow_mut())
        };
        let [qemu, sync, flip, scan, swaps_t, fetch, stream] = medians(
            reps,
            [
                (&d0, &|| self.qemu.sync(words)),
                (&d0, &|| self.bm.sync_from_log(self.log, 0)),
                (&flip_setup, &|| self.merge_retired()),
                (&d0, &|| scan(words)),
                (&d0, &|| swaps(words, nz)),
                (&d0, &fetch),
                (&d0, &|| stream_floor(words, self.flat)),
            ],
        );
        Row {
            qemu,
            sync,
            flip,
            scan,
            swaps: swaps_t,
            fetch,
            stream,
        }
    }
}

fn print_row(label: &str, nonzero: f64, r: &Row) {
    let floor = r.scan + r.swaps;
    println!(
        "{label:>24} ({:5.1}% words non-zero): qemu {:>9}  sync {:>9}  flip {:>9}  scan {:>9}  floor {:>9}  fetch {:>9}  stream {:>9} | qemu/sync {:6.1}x  flip/scan {:5.2}x  sync/floor {:5.2}x  sync/scan {:5.2}x  floor/scan {:5.2}x  flip/stream {:5.2}x  stream/scan {:5.2}x",
        nonzero * 100.0,
        fmt(r.qemu),
        fmt(r.sync),
        fmt(r.flip),
        fmt(r.scan),
        fmt(floor),
        fmt(r.fetch),
        fmt(r.stream),
        ratio(r.qemu, r.sync),
        ratio(r.flip, r.scan),
        ratio(r.sync, floor),
        ratio(r.sync, r.scan),
        ratio(floor, r.scan),
        ratio(r.flip, r.stream),
        ratio(r.stream, r.scan),
    );
}

fn sync_benches(c: &mut Criterion) {
    let reps = reps();
    let log = SharedLog::new(GUEST_BYTES).expect("log");
    assert_eq!(log.region().raw_words().len(), WORDS);
    let bm = MigrationBitmap::new(PAGES).expect("bitmap");
    let record = RefCell::new(FetchedLog::new());
    let flip = RefCell::new(LogFlip::new(GUEST_BYTES).expect("flip logs"));
    let flip_regions = {
        let f = flip.borrow();
        [f.active().region().clone(), f.standby().region().clone()]
    };
    let logs = Logs {
        words: [
            log.region().raw_words(),
            flip_regions[0].raw_words(),
            flip_regions[1].raw_words(),
        ],
    };
    let qemu = Qemu::new();
    let flat: Vec<AtomicU64> = (0..WORDS).map(|_| AtomicU64::new(0)).collect();
    let bench = Bench {
        log: &log,
        logs: &logs,
        flip_regions: &flip_regions,
        bm: &bm,
        qemu: &qemu,
        flip: &flip,
        record: &record,
        flat: &flat,
    };
    let cpus = two_cpus();
    if let Some((a, _)) = cpus {
        pin(a);
    }

    println!("\n== sync: 64 GiB guest, 16 Mi pages, 2 MiB log; medians of {reps} (issue 17) ==");
    println!("   targets: qemu/sync >= 3x at 10% and 100%, >= 1x everywhere; flip/scan <= 1.5x at 0.1% and 1%;");
    println!(
        "            sync/floor <= 1.3x everywhere (floor = scan + one swap per non-zero word)"
    );
    for setting in [Setting::Local, Setting::CrossCore] {
        let other = match (setting, cpus) {
            (Setting::Local, _) => None,
            (Setting::CrossCore, Some((_, b))) => Some(b),
            (Setting::CrossCore, None) => {
                println!("-- cross-core: skipped (fewer than two CPUs available) --");
                continue;
            }
        };
        match other {
            None => println!("-- local: the syncing thread re-dirties the log (hot in its caches) --"),
            Some(b) => println!(
                "-- cross-core: a thread on CPU {b} writes the log before each call, the sync runs on CPU {} --",
                cpus.map_or(0, |c| c.0)
            ),
        }
        for shape in [Shape::Scattered, Shape::Clustered] {
            for density in DENSITIES {
                if density >= 1.0 && matches!(shape, Shape::Clustered) {
                    continue; // same log as scattered 100%
                }
                let pat = pattern(density, shape);
                let nz: Vec<u32> = (0..WORDS as u32)
                    .filter(|&i| pat[i as usize] != 0)
                    .collect();
                let nonzero = nz.len() as f64 / WORDS as f64;
                let label = format!("{} {}%", shape.name(), density * 100.0);
                if !row_selected(&label) {
                    continue;
                }
                let row = std::thread::scope(|s| {
                    // The writer: refills the log it is told, from `other`'s CPU.
                    let (tx, rx) = mpsc::channel::<usize>();
                    let (done_tx, done_rx) = mpsc::channel::<()>();
                    if let Some(b) = other {
                        let (pat, logs) = (&pat, &logs);
                        s.spawn(move || {
                            pin(b);
                            for i in rx {
                                refill(logs.words[i], pat);
                                if done_tx.send(()).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    let dirty = |i: usize| match other {
                        None => refill(logs.words[i], &pat),
                        // The channels order the writer's stores before the timed call.
                        Some(_) => {
                            tx.send(i).expect("writer");
                            done_rx.recv().expect("writer");
                        }
                    };
                    let row = bench.row(reps, &dirty, &nz);
                    drop(tx);
                    row
                });
                print_row(&label, nonzero, &row);
                if setting == Setting::Local {
                    criterion_row(c, &label, &pat, &bench);
                }
            }
        }
    }
}

/// Criterion's measurements of the main columns (local setting).
fn criterion_row(c: &mut Criterion, label: &str, pat: &[u64], b: &Bench) {
    let words = b.logs.words[0];
    let mut g = c.benchmark_group(format!("sync/{label}"));
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("qemu", |x| {
        x.iter_batched(
            || refill(words, pat),
            |()| b.qemu.sync(words),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("sync", |x| {
        x.iter_batched(
            || refill(words, pat),
            |()| b.bm.sync_from_log(b.log, 0),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("flip", |x| {
        x.iter_batched(
            || refill(b.logs.words[b.retire()], pat),
            |()| b.merge_retired(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("scan", |x| {
        x.iter_batched(
            || refill(words, pat),
            |()| scan(words),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn merge_benches(c: &mut Criterion) {
    // One word of slack so the unaligned merge of the whole source fits.
    let bm = MigrationBitmap::new(PAGES + 64).expect("bitmap");
    let reps = reps();
    println!("\n== merge_lebitmap: 16 Mi-page source, aligned (start 0) vs unaligned (start 37); medians of {reps} ==");
    println!("   target: unaligned/aligned <= 2x");
    for density in [0.01, 0.10, 1.0] {
        let src = pattern(density, Shape::Scattered);
        let label = format!("scattered {}%", density * 100.0);
        let [t_al, t_un] = medians(
            reps,
            [
                (&|| (), &|| bm.merge_lebitmap(&src[..], 0, PAGES)),
                (&|| (), &|| bm.merge_lebitmap(&src[..], 37, PAGES)),
            ],
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
