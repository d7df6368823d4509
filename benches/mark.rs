//! Mark throughput: our `GuestDirtyBitmap` vs vhost-user-backend 0.24's `BitmapMmapRegion`,
//! both attached to a real log by the stock daemon's SET_LOG_BASE over a unix socket (the
//! only public way to build the stock bitmap), and the cost logging adds to a guest copy.
//!
//! Besides criterion's own report, each group prints the ratio against its anchor, measured
//! in this run (median of several timed batches), because the targets are ratios:
//! - ours >= 4x faster than the stock bitmap at >= 64 KiB, not slower at 8 B;
//! - copy+mark within 10% of copy alone at 4 KiB and 1% at 1 MiB.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_dirtylog::backend::DirtyLogBackend;
use vhost_dirtylog::driver::{Connection, GuestRam, RegionSpec};
use vhost_dirtylog::log::{log_size_for, GuestDirtyBitmap};
use vhost_dirtylog::test_utils::{memfd, InProcessDaemon, NullDevice};
use vhost_user_backend::bitmap::{BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

const MIB: u64 = 1 << 20;
const GUEST: u64 = 64 * MIB;
const SIZES: [(usize, &str); 5] = [
    (8, "8B"),
    (4096, "4KiB"),
    (64 << 10, "64KiB"),
    (1 << 20, "1MiB"),
    (16 << 20, "16MiB"),
];

/// Median nanoseconds per call of `a` and of `b`, timed in alternating batches of about 10 ms
/// (11 each), so drift in machine load hits both sides alike.
fn compare(mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let mut n = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..n {
            a();
        }
        if t.elapsed() > Duration::from_millis(10) {
            break;
        }
        n *= 2;
    }
    let batch = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    for _ in 0..11 {
        va.push(batch(&mut a));
        vb.push(batch(&mut b));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        v[v.len() / 2]
    };
    (median(&mut va), median(&mut vb))
}

/// A daemon and the frontend that set it up (guest RAM and log included).
struct Session<B: Bitmap + 'static> {
    daemon: InProcessDaemon<B>,
    _conn: Connection,
    _ram: GuestRam,
    _log: std::fs::File,
}

struct Sessions {
    // Kept alive: the daemons hold the mappings the bitmaps point into.
    _ours: Session<GuestDirtyBitmap>,
    _stock: Session<BitmapMmapRegion>,
    ours: GuestDirtyBitmap,
    stock: BitmapMmapRegion,
    log: vhost_dirtylog::log::DirtyLog,
    /// Host address of the first guest page (same memfd region the bitmaps describe).
    host: *mut u8,
}

/// Connects to `daemon`, hands it `GUEST` bytes of RAM and a log, and turns logging on.
fn attach<B>(daemon: InProcessDaemon<B>) -> Session<B>
where
    B: Bitmap + BitmapReplace + NewBitmap + Clone + Send + Sync + 'static,
{
    let mut conn = daemon.connect();
    conn.negotiate(
        !VhostUserVirtioFeatures::LOG_ALL.bits(),
        VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    )
    .unwrap();
    let ram = GuestRam::new(&[RegionSpec::new(0, GUEST)]).unwrap();
    conn.set_mem_table(&ram).unwrap();
    let size = log_size_for(GUEST).unwrap();
    let log = memfd("log", size).unwrap();
    conn.set_log_fd(std::os::fd::AsFd::as_fd(&log), 0, size)
        .unwrap();
    // The stock device does not offer LOG_ALL (vhost-user-backend ignores it and always marks).
    if conn.offered_features() & VhostUserVirtioFeatures::LOG_ALL.bits() != 0 {
        conn.set_log_all(true).unwrap();
    }
    Session {
        daemon,
        _conn: conn,
        _ram: ram,
        _log: log,
    }
}

fn sessions() -> Sessions {
    let backend = DirtyLogBackend::new(NullDevice::new(VhostUserProtocolFeatures::REPLY_ACK));
    let log = backend.log().clone();
    let ours = attach(InProcessDaemon::start(backend));
    let stock = attach(InProcessDaemon::start(NullDevice::<BitmapMmapRegion>::new(
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD,
    )));
    let ob = ours
        .daemon
        .mem
        .memory()
        .iter()
        .next()
        .unwrap()
        .bitmap()
        .clone();
    let sb = stock
        .daemon
        .mem
        .memory()
        .iter()
        .next()
        .unwrap()
        .bitmap()
        .clone();
    let host = ours
        .daemon
        .mem
        .memory()
        .iter()
        .next()
        .unwrap()
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap();
    // Both bitmaps really log: a mark shows up.
    ob.mark_dirty(5 * 4096, 1);
    sb.mark_dirty(5 * 4096, 1);
    assert!(ob.dirty_at(5 * 4096) && sb.dirty_at(5 * 4096));
    Sessions {
        _ours: ours,
        _stock: stock,
        ours: ob,
        stock: sb,
        log,
        host,
    }
}

fn bench_mark(c: &mut Criterion) {
    let s = sessions();
    let mut g = c.benchmark_group("mark");
    let mut lines = Vec::new();
    for (len, name) in SIZES {
        // An unaligned offset, so first/last words are partial.
        let off = 3 * 4096 + 100;
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("ours", name), &len, |b, &len| {
            b.iter(|| s.ours.mark_dirty(black_box(off), black_box(len)))
        });
        g.bench_with_input(
            BenchmarkId::new("vhost-user-backend-0.24", name),
            &len,
            |b, &len| b.iter(|| s.stock.mark_dirty(black_box(off), black_box(len))),
        );
        let (ours, stock) = compare(
            || s.ours.mark_dirty(black_box(off), black_box(len)),
            || s.stock.mark_dirty(black_box(off), black_box(len)),
        );
        lines.push(format!(
            "mark {name:>6}: ours {ours:>10.1} ns, vhost-user-backend 0.24 {stock:>10.1} ns, speed-up {:>7.2}x",
            stock / ours
        ));
    }
    g.finish();
    // Idle: logging off (the stock bitmap has no off switch once a log is attached).
    s.log.set_logging(false);
    let (idle, _) = compare(|| s.ours.mark_dirty(black_box(4096), black_box(8)), || ());
    s.log.set_logging(true);
    lines.push(format!("mark     8B with logging off: ours {idle:.1} ns"));
    for l in lines {
        println!("{l}");
    }
}

fn bench_copy(c: &mut Criterion) {
    let s = sessions();
    let mut g = c.benchmark_group("copy");
    let src = vec![0x5Au8; 1 << 20];
    let mut lines = Vec::new();
    // (copy size, bytes of guest memory the destinations rotate over, label): "warm" keeps the
    // destinations in cache, as a device reusing a guest's buffers would; "cold" walks 32 MiB,
    // so every copy misses and the mark's Release RMW waits for the copy's stores to drain.
    for (len, span, name) in [
        (4096usize, 256usize << 10, "4KiB-warm"),
        (4096, 32 << 20, "4KiB-cold"),
        (1 << 20, 32 << 20, "1MiB"),
    ] {
        let slots = span / len;
        let i = std::cell::Cell::new(0usize);
        let copy = |mark: bool| {
            i.set((i.get() + 1) % slots);
            let off = i.get() * len;
            // SAFETY: `off + len <= span <= 32 MiB < GUEST`, inside the mapped guest region;
            // `src` holds at least `len` bytes and does not overlap guest memory.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), s.host.add(off), len) };
            if mark {
                s.ours.mark_dirty(off, len);
            }
        };
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("copy", name), |b| b.iter(|| copy(false)));
        g.bench_function(BenchmarkId::new("copy+mark", name), |b| {
            b.iter(|| copy(true))
        });
        let (plain, marked) = compare(|| copy(false), || copy(true));
        lines.push(format!(
            "copy {name:>9}: copy {plain:>9.1} ns, copy+mark {marked:>9.1} ns, logging overhead {:>+6.2}%",
            (marked / plain - 1.0) * 100.0
        ));
    }
    g.finish();
    for l in lines {
        println!("{l}");
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_mark, bench_copy
}
criterion_main!(benches);
