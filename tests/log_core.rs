//! Backend-side log core: marks against a per-page model, concurrency with a VMM-style
//! swapper, log replacement, region validation, and the vm-memory bitmap's binding window.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use proptest::prelude::*;
use vhost_dirtylog::log::{log_size_for, DirtyLog, GuestDirtyBitmap, LogError, LogRegion};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::NewBitmap;

const PAGE: u64 = 4096;

/// Naive model: which pages of a `pages`-page log a mark sets, and how many it drops.
fn model_mark(model: &mut [bool], gpa: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let (last, overflow) = match gpa.checked_add(len - 1) {
        Some(l) => (l, 0),
        None => (u64::MAX, 1),
    };
    let mut dropped = overflow;
    let mut p = gpa / PAGE;
    loop {
        if (p as usize) < model.len() && p < model.len() as u64 {
            model[p as usize] = true;
        } else {
            // Everything from here to the last page is out of range.
            dropped += last / PAGE - p + 1;
            break;
        }
        if p == last / PAGE {
            break;
        }
        p += 1;
    }
    dropped
}

fn log_with(size: usize) -> (DirtyLog, Arc<LogRegion>) {
    let region = Arc::new(LogRegion::anonymous(size).unwrap());
    let log = DirtyLog::new();
    log.replace_region(Some(region.clone()));
    (log, region)
}

fn arb_mark(pages: u64) -> impl Strategy<Value = (u64, u64)> {
    let span = (pages + 70) * PAGE;
    prop_oneof![
        // Anywhere in (and a little past) the log, short and long, unaligned.
        (0..span, 0..(40 * PAGE)),
        (0..span, 0u64..16),
        // Page- and word-aligned starts.
        ((0..pages + 70).prop_map(|p| p * PAGE), 0..(200 * PAGE)),
        (
            (0..(pages / 64 + 2)).prop_map(|w| w * 64 * PAGE),
            (1..4u64).prop_map(|k| k * 64 * PAGE)
        ),
        // Overflowing the address space.
        ((u64::MAX - 3 * PAGE)..=u64::MAX, 0..(8 * PAGE)),
        Just((0, 0)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn marks_match_per_page_model(
        size in 1usize..40,
        marks in proptest::collection::vec(arb_mark(40 * 8), 1..24),
    ) {
        let (log, region) = log_with(size);
        log.set_logging(true);
        let mut model = vec![false; size * 8];
        let mut dropped = 0;
        for &(gpa, len) in &marks {
            log.mark(gpa, len);
            dropped += model_mark(&mut model, gpa, len);
        }
        for (p, &want) in model.iter().enumerate() {
            prop_assert_eq!(region.test_page(p as u64), want, "page {}", p);
        }
        prop_assert_eq!(region.count_set(), model.iter().filter(|b| **b).count() as u64);
        prop_assert_eq!(log.stats().out_of_range_pages, dropped);
    }
}

#[test]
fn logging_off_marks_nothing() {
    let (log, region) = log_with(64);
    log.mark(0, 64 * 8 * PAGE);
    assert_eq!(region.count_set(), 0);
    log.set_logging(true);
    log.mark(5 * PAGE, 1);
    assert!(region.test_page(5));
    log.set_logging(false);
    log.mark(9 * PAGE, 1);
    assert!(!region.test_page(9));
    assert_eq!(region.count_set(), 1);
}

/// QEMU starts a device during migration with LOG_ALL and the rings before SET_LOG_BASE: a
/// write in that window cannot be recorded, so the next log gets every page marked.
#[test]
fn writes_before_the_log_arrives_dirty_the_whole_next_log() {
    let log = DirtyLog::new();
    log.set_logging(true);
    log.mark(3 * PAGE, 1);
    assert_eq!(log.stats().marks_without_log, 1);
    let region = Arc::new(LogRegion::anonymous(16).unwrap());
    log.replace_region(Some(region.clone()));
    assert_eq!(
        region.count_set(),
        128,
        "every page of the new log must be dirty"
    );
    // Only once: a later log starts clean.
    let next = Arc::new(LogRegion::anonymous(16).unwrap());
    log.replace_region(Some(next.clone()));
    assert_eq!(next.count_set(), 0);
    // Without unlogged writes, attaching marks nothing.
    let quiet = DirtyLog::new();
    quiet.set_logging(true);
    let r = Arc::new(LogRegion::anonymous(16).unwrap());
    quiet.replace_region(Some(r.clone()));
    assert_eq!(r.count_set(), 0);
}

#[test]
fn marks_without_log_are_counted() {
    let log = DirtyLog::new();
    log.set_logging(true);
    log.mark(0, 10);
    log.mark(PAGE, 10);
    assert_eq!(log.stats().marks_without_log, 2);
    let (log2, _) = log_with(8);
    log2.set_logging(true);
    log2.mark(64 * PAGE, PAGE * 2);
    let st = log2.stats();
    assert_eq!((st.out_of_range_marks, st.out_of_range_pages), (1, 2));
}

// The swap race (a VMM thread clearing words with an atomic swap while markers mark) and its
// negative control (a load-then-store clear loses marks, and the race sees it) need the log's
// raw atomics, which are crate-private: they are unit tests in `src/log/tests.rs`.

/// While threads keep marking long ranges, the log is replaced again and again. Each time
/// `replace_region` returns, the old log never changes again (grace period); every mark that
/// started after that lands in a newer log; and the union of all logs holds every mark.
#[test]
fn log_replacement_while_marking_loses_nothing() {
    const PAGES: u64 = 64 * 8192;
    const THREADS: usize = 3;
    const SWAPS: usize = 16;
    let size = (PAGES / 8) as usize;
    let (log, first) = log_with(size);
    log.set_logging(true);
    let generation = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(THREADS + 1));

    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = log.clone();
            let generation = generation.clone();
            let stop = stop.clone();
            let start = start.clone();
            thread::spawn(move || {
                // (first page, last page, generation visible before the mark started)
                let mut marks = Vec::new();
                let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (t as u64 * 7919 + 1);
                start.wait();
                // Mark until the replacer is done; record the first marks and every mark started
                // after a replacement (bounded, so a slow machine cannot run out of memory).
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = x % PAGES;
                    let n = 1 + (x >> 40) % 1500;
                    let last = (p + n - 1).min(PAGES - 1);
                    let g = generation.load(Ordering::Acquire);
                    log.mark(p * PAGE, (last - p + 1) * PAGE);
                    if marks.len() < 2_000_000 && (marks.len() < 100_000 || g > 0) {
                        marks.push((p, last, g));
                    }
                }
                marks
            })
        })
        .collect();

    start.wait();
    let mut logs = vec![first];
    let mut frozen = Vec::new();
    for g in 1..=SWAPS as u64 {
        thread::sleep(std::time::Duration::from_micros(100));
        let next = Arc::new(LogRegion::anonymous(size).unwrap());
        let old = log.replace_region(Some(next.clone())).unwrap();
        assert!(old.same_memory(logs.last().unwrap()));
        frozen.push(old.snapshot());
        generation.store(g, Ordering::Release);
        logs.push(next);
    }
    thread::sleep(std::time::Duration::from_millis(1));
    stop.store(true, Ordering::Relaxed);
    let marks: Vec<_> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();

    for (i, snap) in frozen.iter().enumerate() {
        let now: Vec<u64> = logs[i].snapshot();
        assert_eq!(snap, &now, "log {i} changed after replace_region returned");
    }
    // suffix[g] = union of the logs current in generation g or later.
    let mut suffix = vec![vec![0u64; (PAGES / 64) as usize]; logs.len() + 1];
    for g in (0..logs.len()).rev() {
        let (head, tail) = suffix.split_at_mut(g + 1);
        for ((s, n), w) in head[g].iter_mut().zip(&tail[0]).zip(logs[g].snapshot()) {
            *s = n | w;
        }
    }
    let mut late = 0;
    for &(p0, p1, g) in &marks {
        let u = &suffix[g as usize];
        for p in p0..=p1 {
            assert!(
                u[(p / 64) as usize] & (1 << (p % 64)) != 0,
                "page {p} of a mark started in generation {g} is in no log of that generation or later"
            );
        }
        late += (g > 0) as usize;
    }
    assert!(
        late > 0,
        "no mark started after a replacement; the test did not race"
    );
}

#[test]
fn detach_returns_region_and_stops_marking() {
    let (log, region) = log_with(8);
    log.set_logging(true);
    let old = log.replace_region(None).unwrap();
    assert!(old.same_memory(&region));
    log.mark(0, 1);
    assert_eq!(region.count_set(), 0);
    assert_eq!(log.stats().marks_without_log, 1);
}

fn memfd(len: u64) -> std::fs::File {
    let name = std::ffi::CString::new("log-test").unwrap();
    // SAFETY: memfd_create reads a valid NUL-terminated string and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

#[test]
fn region_validation_errors() {
    let f = memfd(8192);
    let fd = f.as_fd();
    assert!(matches!(
        LogRegion::from_fd(fd, 0, 0),
        Err(LogError::ZeroSize)
    ));
    assert!(matches!(
        LogRegion::from_fd(fd, u64::MAX - 8, 4096),
        Err(LogError::Overflow { .. })
    ));
    assert!(matches!(
        LogRegion::from_fd(fd, 0, 8193),
        Err(LogError::PastEnd { file_len: 8192, .. })
    ));
    assert!(matches!(
        LogRegion::from_fd(fd, 8192, 8),
        Err(LogError::PastEnd { .. })
    ));
    assert!(matches!(
        LogRegion::from_fd(fd, 4, 8),
        Err(LogError::Misaligned { offset: 4 })
    ));
    assert!(matches!(
        LogRegion::from_fd(fd, 0, 1 << 62),
        Err(LogError::TooLarge { .. }) | Err(LogError::PastEnd { .. })
    ));
    // An unaligned (but 8-byte aligned) offset maps the right bytes.
    let r = LogRegion::from_fd(fd, 4096 + 8, 16).unwrap();
    r.mark_pages(0, 0);
    let whole = LogRegion::from_fd(fd, 0, 8192).unwrap();
    assert!(whole.test_page((4096 + 8) * 8));
    assert_eq!(whole.count_set(), 1);
    // Coverage.
    let r = LogRegion::from_fd(fd, 0, 16).unwrap();
    assert!(r.check_covers(128 * PAGE).is_ok());
    assert!(matches!(
        r.check_covers(128 * PAGE + 1),
        Err(LogError::TooSmall { need: 17, have: 16 })
    ));
    assert_eq!(log_size_for(128 * PAGE), Some(16));
    assert_eq!(log_size_for(128 * PAGE + 1), Some(24));
    assert_eq!(log_size_for(u64::MAX), None);
}

#[test]
fn shared_fd_log_is_seen_by_both_mappings() {
    let f = memfd(4096);
    let backend = Arc::new(LogRegion::from_fd(f.as_fd(), 0, 4096).unwrap());
    let vmm = LogRegion::from_fd(f.as_fd(), 0, 4096).unwrap();
    let log = DirtyLog::new();
    log.replace_region(Some(backend));
    log.set_logging(true);
    log.mark(77 * PAGE + 5, PAGE);
    assert!(vmm.test_page(77) && vmm.test_page(78));
    // Little-endian bit order: page 77 = bit 13 of word 1 = bit 5 of byte 9.
    assert_eq!(vmm.snapshot()[1], (1 << 13) | (1 << 14));
}

#[test]
fn bitmap_marks_by_guest_physical_address() {
    let (log, region) = log_with(64);
    log.set_logging(true);
    let bm = GuestDirtyBitmap::with_len((16 * PAGE) as usize);
    bm.bind(&log, 100 * PAGE);
    bm.mark_dirty(3 * PAGE as usize + 10, 2);
    let slice = bm.slice_at(8 * PAGE as usize);
    slice.mark_dirty(PAGE as usize, PAGE as usize + 1);
    let set: Vec<u64> = (0..512).filter(|&p| region.test_page(p)).collect();
    assert_eq!(set, vec![103, 109, 110]);
    assert!(bm.dirty_at(3 * PAGE as usize) && !bm.dirty_at(4 * PAGE as usize));
    assert_eq!(slice.gpa(), Some(108 * PAGE));
}

/// A write into a region before it is bound is not lost: binding marks the whole region.
#[test]
fn bitmap_write_before_bind_marks_whole_region() {
    let (log, region) = log_with(64);
    log.set_logging(true);
    let bm = GuestDirtyBitmap::with_len((4 * PAGE) as usize);
    bm.mark_dirty(10, 1);
    assert_eq!(region.count_set(), 0);
    bm.bind(&log, 32 * PAGE);
    let set: Vec<u64> = (0..512).filter(|&p| region.test_page(p)).collect();
    assert_eq!(set, vec![32, 33, 34, 35]);

    // An untouched region binds without marking anything.
    let clean = GuestDirtyBitmap::with_len((4 * PAGE) as usize);
    clean.bind(&log, 64 * PAGE);
    assert!(!region.test_page(64));
}

/// Racing a write against the binding: whichever wins, the write's page ends up marked.
#[test]
fn bitmap_bind_races_write() {
    for i in 0..300 {
        let (log, region) = log_with(8);
        log.set_logging(true);
        let bm = GuestDirtyBitmap::with_len((2 * PAGE) as usize);
        let b = Arc::new(Barrier::new(2));
        let w = {
            let bm = bm.clone();
            let b = b.clone();
            thread::spawn(move || {
                b.wait();
                bm.mark_dirty(PAGE as usize, 8);
            })
        };
        b.wait();
        bm.bind(&log, 4 * PAGE);
        w.join().unwrap();
        assert!(
            region.test_page(5),
            "iteration {i}: write racing bind was lost"
        );
    }
}
