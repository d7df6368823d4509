//! Concurrency model checks of the log core with [loom], on the real code.
//!
//! Run with
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test --release --test loom
//! ```
//! (a separate target directory, so the `--cfg loom` build does not invalidate the normal one).
//!
//! Under `cfg(loom)` the crate's log core uses loom's atomics, mutex and `OnceLock`
//! equivalent (`src/log/sync.rs`), and `LogRegion::anonymous` keeps its words in loom atomics,
//! so what loom explores below is the production code itself: `DirtyLog::mark` (the LOG_ALL
//! check, the RCU read section, `LogRegion::mark_pages` with its single-word fast path and
//! multi-word slow path), `DirtyLog::replace_region` (pointer swap, RCU grace period with its
//! wait loop), `MigrationBitmap::sync_from_log` (per-word Acquire swap / masked `fetch_and`
//! through the shared `merge_core`), `GuestDirtyBitmap::mark_dirty` / `bind` (the
//! write-before-bind flag and SeqCst fence handshake), and `LogBatch::flush` (a batch's words
//! ORed into the current log in one read section, the carry path past the log's end).
//!
//! What is *not* covered:
//! - `membarrier(2)`: loom cannot model a process-wide barrier, so the RCU read side runs its
//!   SeqCst-fence fallback (the path taken on kernels without `membarrier`), and
//!   `set_logging(true)`'s barrier is two SeqCst fences in the calling thread only. The
//!   membarrier flavour's argument (the writer's `membarrier` stands in for the reader's fence)
//!   rests on the kernel's guarantee, not on this model. The LOG_ALL-vs-data-store race that the
//!   barrier closes is therefore not modelled.
//! - loom treats SeqCst fences as a single total order that joins the causality of every fence
//!   (slightly stronger than C++20 requires), and models at most `MAX_ATOMIC_HISTORY` stores
//!   per atomic; the scenarios below are kept small (1–2 word logs, 2–3 threads, 1–2 marks per
//!   thread) so the exhaustive search (bounded by `LOOM_MAX_PREEMPTIONS`) finishes quickly.
//! - `arc-swap` (the migration bitmap's block table) and `Arc` reference counts are `std`
//!   types: they are executed but not explored (only one thread touches the bitmap here).
//! - Mapped logs (`from_fd`, the stock handler's mapping) do not exist under loom; their bounds
//!   are what the fuzz targets check.
//!
//! [loom]: https://docs.rs/loom

#![cfg(loom)]

use std::sync::atomic::Ordering;

use loom::thread;
use vhost_dirtylog::log::{DirtyLog, GuestDirtyBitmap, LogRegion};
use vhost_dirtylog::vmm::MigrationBitmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::NewBitmap;

const PAGE: u64 = 4096;

/// A `words`-word log, attached and logging.
fn logging_handle(words: usize) -> (DirtyLog, std::sync::Arc<LogRegion>) {
    let region = std::sync::Arc::new(LogRegion::anonymous(words * 8).unwrap());
    let log = DirtyLog::new();
    assert!(log.replace_region(Some(region.clone())).is_none());
    log.set_logging(true);
    (log, region)
}

fn snapshot(r: &LogRegion) -> Vec<u64> {
    r.raw_words()
        .iter()
        .map(|w| w.load(Ordering::SeqCst))
        .collect()
}

/// (a) Two markers and the VMM's sync on a 2-word log: no interleaving loses a mark. Every
/// page a marker set is either still in the log or was consumed by a sync into the bitmap.
/// Marker 1 uses the single-word fast path twice (pages 3 and 5, the same word); marker 2 a
/// range that straddles the two words (pages 63..=64, the slow path) — the swapper's swap of
/// word 0 races with both.
#[test]
fn mark_vs_sync_loses_no_mark() {
    loom::model(|| {
        let (log, region) = logging_handle(2);
        let bm = MigrationBitmap::new(128).unwrap();

        let l1 = log.clone();
        let m1 = thread::spawn(move || {
            l1.mark(3 * PAGE, 8);
            l1.mark(5 * PAGE + 100, 1);
        });
        let l2 = log.clone();
        let m2 = thread::spawn(move || l2.mark(64 * PAGE - 1, 2));

        bm.sync_from_log(&*region, 0);
        bm.sync_from_log(&*region, 0);
        m1.join().unwrap();
        m2.join().unwrap();

        for p in [3, 5, 63, 64] {
            assert!(
                bm.test(p) || region.test_page(p),
                "page {p} was marked but is neither in the bitmap nor in the log"
            );
        }
        // Nothing else appears anywhere.
        let stray = (0..128)
            .filter(|p| ![3, 5, 63, 64].contains(p))
            .any(|p| bm.test(p) || region.test_page(p));
        assert!(!stray);
        assert_eq!(log.stats(), Default::default());
    });
}

/// Negative control for (a): a swapper that clears with a load and a plain store (instead of
/// an atomic swap) loses marks, and loom finds the interleaving. Shows the harness and the
/// assertion can fail.
#[test]
#[should_panic(expected = "neither in the bitmap nor in the log")]
fn lossy_clear_is_caught() {
    loom::model(|| {
        let (log, region) = logging_handle(1);
        let l1 = log.clone();
        let m1 = thread::spawn(move || l1.mark(3 * PAGE, 1));
        let w = &region.raw_words()[0];
        let taken = w.load(Ordering::Acquire);
        w.store(0, Ordering::Relaxed); // the bug: a mark between load and store is erased
        m1.join().unwrap();
        assert!(
            taken & (1 << 3) != 0 || region.test_page(3),
            "page 3 was marked but is neither in the bitmap nor in the log"
        );
    });
}

/// (b) Two markers racing a log replacement (a second SET_LOG_BASE) on 2-word logs. After
/// `replace_region` returns: (1) the old log is never written again (its content when
/// `replace_region` returned equals its final content), and (2) every mark is in the old log as
/// it was then, or in the new log. Together: the old log, drained right after the reply, holds
/// every mark it will ever get. Marker 1 makes two fast-path marks in different words (so its
/// second read section may start while the replacement waits for its first); marker 2 makes
/// one slow-path mark straddling the words.
#[test]
fn replace_vs_mark_grace_period() {
    loom::model(|| {
        let (log, old) = logging_handle(2);
        let new = std::sync::Arc::new(LogRegion::anonymous(16).unwrap());

        let l1 = log.clone();
        let m1 = thread::spawn(move || {
            l1.mark(PAGE, 1);
            l1.mark(70 * PAGE, 1);
        });
        let l2 = log.clone();
        let m2 = thread::spawn(move || l2.mark(63 * PAGE, 2 * PAGE));

        let prev = log.replace_region(Some(new.clone())).unwrap();
        assert!(prev.same_memory(&old));
        let at_return = snapshot(&old);
        m1.join().unwrap();
        m2.join().unwrap();

        assert_eq!(
            snapshot(&old),
            at_return,
            "the old log was written after replace_region returned"
        );
        for p in [1u64, 70, 63, 64] {
            let in_old = at_return[(p / 64) as usize] & (1 << (p % 64)) != 0;
            assert!(
                in_old || new.test_page(p),
                "page {p} is in neither the old log (as of the reply) nor the new one"
            );
        }
    });
}

/// (b') Detaching (`replace_region(None)`) races a mark: afterwards the old log is never written
/// again, and the mark is either in it or counted as made without a log.
#[test]
fn detach_vs_mark() {
    loom::model(|| {
        let (log, old) = logging_handle(1);
        let l1 = log.clone();
        let marker = thread::spawn(move || l1.mark(4 * PAGE, 1));
        log.replace_region(None).unwrap();
        let at_return = snapshot(&old);
        marker.join().unwrap();
        assert_eq!(
            snapshot(&old),
            at_return,
            "old log written after detach returned"
        );
        assert!(
            at_return[0] & (1 << 4) != 0 || log.stats().marks_without_log == 1,
            "the mark was neither recorded nor counted"
        );
    });
}

/// The VMM half of a flip (`vmm::LogFlip`), by hand: hand the backend `next` (what the
/// backend does on `SET_LOG_BASE`: `replace_region`, whose return is the reply), unless
/// `send` is false (the planted bug), then read the retired log's word with a plain load and
/// clear it with a plain store. Returns the bits read.
fn flip_and_take(
    log: &DirtyLog,
    next: &std::sync::Arc<LogRegion>,
    retired: &LogRegion,
    send: bool,
) -> u64 {
    if send {
        log.replace_region(Some(next.clone()));
    }
    let w = &retired.raw_words()[0];
    let v = w.load(Ordering::Relaxed);
    w.store(0, Ordering::Relaxed);
    v
}

/// (f) Flip sync: two flips race a marker making two marks — A is retired (read and cleared
/// with plain accesses), then B is retired and A, cleared, is handed back. Every mark is in
/// what the VMM read or in one of the logs: the grace period keeps late marks out of a
/// retired log, and the plain clear of A happens before A is published again.
#[test]
fn flip_with_plain_clear_loses_no_mark() {
    loom::model(|| flips_lose_nothing(true));
}

/// Negative control for (f): the VMM "flips" without sending `SET_LOG_BASE`, so it clears
/// logs that are still attached, and loom finds the interleaving that loses a mark.
#[test]
#[should_panic(expected = "neither read by the VMM nor in a log")]
fn flip_without_set_log_base_is_caught() {
    loom::model(|| flips_lose_nothing(false));
}

fn flips_lose_nothing(send: bool) {
    let (log, a) = logging_handle(1);
    let b = std::sync::Arc::new(LogRegion::anonymous(8).unwrap());
    let l1 = log.clone();
    let marker = thread::spawn(move || {
        l1.mark(3 * PAGE, 1);
        l1.mark(5 * PAGE, 1);
    });
    let mut read = flip_and_take(&log, &b, &a, send);
    read |= flip_and_take(&log, &a, &b, send);
    marker.join().unwrap();
    for p in [3u64, 5] {
        assert!(
            read & (1 << p) != 0 || a.test_page(p) || b.test_page(p),
            "page {p} was marked but is neither read by the VMM nor in a log"
        );
    }
}

/// (c) The vm-memory bitmap's binding window: a device write to a region whose bitmap is not
/// bound yet races the adapter binding it (vhost-user-backend publishes new memory before it
/// calls `update_memory`). Either the writer sees the binding and marks the page, or the binder
/// sees the writer's flag and marks the whole region: the written page is always set.
#[test]
fn write_before_bind_is_not_lost() {
    loom::model(|| {
        let (log, region) = logging_handle(1);
        // A 4-page region at guest page 8.
        let bitmap = GuestDirtyBitmap::with_len(4 * PAGE as usize);
        let writer_view = bitmap.clone();
        let writer = thread::spawn(move || writer_view.mark_dirty(PAGE as usize + 10, 4));
        bitmap.bind(&log, 8 * PAGE);
        writer.join().unwrap();
        assert!(region.test_page(9), "a write racing the binding was lost");
        // Over-marking is allowed only within the region (pages 8..12).
        for p in (0..64).filter(|p| !(8..12).contains(p)) {
            assert!(
                !region.test_page(p),
                "page {p} outside the region was marked"
            );
        }
    });
}

/// (g) A mark past the end of the log (memory added before the frontend sent a bigger log)
/// races the replacement by a log that covers it. The range the mark carries must reach the
/// new log: it is recorded inside the mark's RCU read section, so the replacement's grace
/// period waits for it before it applies the carried ranges. (Recording it after the read
/// section ended let the replacement apply the carried ranges first, leaving the page out of
/// the new log until some later `SET_LOG_BASE`; this model found that.)
#[test]
fn out_of_range_mark_vs_bigger_log() {
    loom::model(|| {
        let (log, _small) = logging_handle(1);
        let big = std::sync::Arc::new(LogRegion::anonymous(16).unwrap());
        let l1 = log.clone();
        let marker = thread::spawn(move || l1.mark(70 * PAGE, 1));
        log.replace_region(Some(big.clone())).unwrap();
        marker.join().unwrap();
        assert!(
            big.test_page(70),
            "a mark carried past the old log's end is missing from the new log that covers it"
        );
    });
}

/// (h) A batch flush races a log replacement (`SET_LOG_BASE`), as (b) for plain marks. The
/// marker records pages 1 and 70 (two words) and flushes them (one read section), then records
/// the straddling range 63..=64 and flushes it by dropping the batch. After `replace_region`
/// returns the old log never changes again, and every page is in the old log as of that
/// moment or in the new log: a flush writes the log current when it runs, and the grace period
/// waits for a flush that may still write the old one.
#[test]
fn batch_flush_vs_replace() {
    loom::model(|| {
        let (log, old) = logging_handle(2);
        let new = std::sync::Arc::new(LogRegion::anonymous(16).unwrap());
        let batch = log.batch();
        let marker = thread::spawn(move || {
            batch.mark(PAGE, 1);
            batch.mark(70 * PAGE, 1);
            batch.flush();
            batch.mark(63 * PAGE, 2 * PAGE);
            // Dropped here: the drop flushes.
        });
        log.replace_region(Some(new.clone())).unwrap();
        let at_return = snapshot(&old);
        marker.join().unwrap();
        assert_eq!(
            snapshot(&old),
            at_return,
            "the old log was written after replace_region returned"
        );
        for p in [1u64, 70, 63, 64] {
            let in_old = at_return[(p / 64) as usize] & (1 << (p % 64)) != 0;
            assert!(
                in_old || new.test_page(p),
                "page {p} is in neither the old log (as of the reply) nor the new one"
            );
        }
    });
}

/// (h') A batch flush of a word past the end of the log races its replacement by a log that
/// covers it, as (g) for the plain mark: the carried page reaches the new log.
#[test]
fn batch_flush_past_end_vs_bigger_log() {
    loom::model(|| {
        let (log, _small) = logging_handle(1);
        let big = std::sync::Arc::new(LogRegion::anonymous(16).unwrap());
        let batch = log.batch();
        let marker = thread::spawn(move || {
            batch.mark(70 * PAGE, 1);
            batch.flush();
        });
        log.replace_region(Some(big.clone())).unwrap();
        marker.join().unwrap();
        assert!(
            big.test_page(70),
            "a flushed word carried past the old log's end is missing from the new log"
        );
    });
}

/// (i) A batch flush races the VMM's swap sync, as (a) for plain marks: a flush ORs whole
/// words (pages 3 and 5 in word 0, 63 and 64 across words 0 and 1), the swapper takes words
/// with atomic swaps; no page is lost and none appears that was not marked.
#[test]
fn batch_flush_vs_sync() {
    loom::model(|| {
        let (log, region) = logging_handle(2);
        let bm = MigrationBitmap::new(128).unwrap();
        let batch = log.batch();
        let marker = thread::spawn(move || {
            batch.mark(3 * PAGE, 8);
            batch.mark(5 * PAGE + 100, 1);
            batch.mark(64 * PAGE - 1, 2);
            batch.flush();
        });
        bm.sync_from_log(&*region, 0);
        bm.sync_from_log(&*region, 0);
        marker.join().unwrap();
        for p in [3, 5, 63, 64] {
            assert!(
                bm.test(p) || region.test_page(p),
                "page {p} was marked but is neither in the bitmap nor in the log"
            );
        }
        let stray = (0..128)
            .filter(|p| ![3, 5, 63, 64].contains(p))
            .any(|p| bm.test(p) || region.test_page(p));
        assert!(!stray);
    });
}

/// Invariant 2 for a batch: the device's data store happens-before the flushed bit. The
/// device stores a byte of "guest data" (a relaxed atomic standing for the page), records the
/// page and flushes; the VMM takes the word with its Acquire swap and, if the bit is set,
/// copies the page: it must see the data.
///
/// No negative control here: under loom the RCU read section takes its SeqCst-fence path
/// (loom cannot model `membarrier(2)`), and that fence alone orders the data before even a
/// Relaxed `fetch_or`, so a Relaxed flush passes this model. In production (membarrier path)
/// the read section has only a compiler fence and the flush's Release is what orders the data,
/// as for the plain mark.
#[test]
fn batch_flush_is_release() {
    use loom::sync::atomic::AtomicU64;
    loom::model(|| {
        let (log, region) = logging_handle(1);
        let data = std::sync::Arc::new(AtomicU64::new(0));
        let batch = log.batch();
        let d = data.clone();
        let device = thread::spawn(move || {
            d.store(1, Ordering::Relaxed);
            batch.mark(3 * PAGE, 1);
            batch.flush();
        });
        let taken = region.raw_words()[0].swap(0, Ordering::Acquire);
        if taken & (1 << 3) != 0 {
            assert_eq!(
                data.load(Ordering::Relaxed),
                1,
                "the VMM saw the bit but copied the page without the data"
            );
        }
        device.join().unwrap();
    });
}

/// LOG_ALL off and on again while a batch records and flushes: a mark recorded while logging
/// was on reaches the attached log even if logging was off when the flush ran (the batch
/// applies recorded words to any attached log); a mark made while logging was off is not
/// recorded at all (as a plain mark is dropped).
#[test]
fn batch_vs_log_all_toggle() {
    loom::model(|| {
        let (log, region) = logging_handle(1);
        let batch = log.batch();
        let marker = thread::spawn(move || {
            batch.mark(3 * PAGE, 1);
            batch.flush();
            batch.stats()
        });
        log.set_logging(false);
        log.set_logging(true);
        let st = marker.join().unwrap();
        assert_eq!(
            region.test_page(3),
            st.marks == 1,
            "a recorded mark must reach the log, an unrecorded one must not appear"
        );
    });
}
