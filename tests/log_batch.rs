//! Batched marks (`LogBatch`) through the public API: a model test against plain marks, the
//! invariants a batch must keep (its words reach the log current at flush time, also across a
//! replacement and past the end of the log; LOG_ALL off/on around a batch; drop flushes), and
//! routing vm-memory's own writes into a scope. The race test with log replacement and LOG_ALL
//! toggling, and its negative control, are unit tests in `src/log/batch.rs` (they need a
//! crate-private knob); the loom models are in `tests/loom.rs`.

use std::sync::Arc;

use proptest::prelude::*;
use vhost_dirtylog::log::{
    BatchStats, DirtyLog, GuestDirtyBitmap, LogRegion, LogStats, BATCH_SPAN_WORDS, BATCH_WORDS,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;

fn logging(size: usize) -> (DirtyLog, Arc<LogRegion>) {
    let region = Arc::new(LogRegion::anonymous(size).unwrap());
    let log = DirtyLog::new();
    log.replace_region(Some(region.clone()));
    log.set_logging(true);
    (log, region)
}

fn pages_set(r: &LogRegion) -> Vec<u64> {
    (0..r.pages()).filter(|&p| r.test_page(p)).collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// Recorded into the batch (plain mark on the reference log).
    Batch(u64, u64),
    /// A plain mark on both logs (interleaved with pending batch words).
    Plain(u64, u64),
    Flush,
}

fn arb_range(pages: u64) -> impl Strategy<Value = (u64, u64)> {
    let span = (pages + 70) * PAGE;
    prop_oneof![
        (0..span, 0..(40 * PAGE)),
        (0..span, 0u64..16),
        ((0..pages + 70).prop_map(|p| p * PAGE), 0..(200 * PAGE)),
        // Wider than BATCH_SPAN_WORDS words: marked at once.
        (
            0..span,
            (BATCH_SPAN_WORDS * 64 * PAGE)..((BATCH_SPAN_WORDS + 3) * 64 * PAGE)
        ),
        ((u64::MAX - 3 * PAGE)..=u64::MAX, 0..(8 * PAGE)),
        Just((0, 0)),
    ]
}

fn arb_op(pages: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => arb_range(pages).prop_map(|(g, l)| Op::Batch(g, l)),
        1 => arb_range(pages).prop_map(|(g, l)| Op::Plain(g, l)),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random sequences of batched marks, plain marks and flushes give the same log as plain
    /// marks alone, after every flush; pages past the end are carried into a bigger log alike.
    #[test]
    fn batched_marks_match_plain_marks(
        size in 1usize..40,
        ops in proptest::collection::vec(arb_op(40 * 8), 1..80),
    ) {
        let (blog, bregion) = logging(size);
        let (plog, pregion) = logging(size);
        let batch = blog.batch();
        for op in &ops {
            match *op {
                Op::Batch(g, l) => {
                    batch.mark(g, l);
                    plog.mark(g, l);
                }
                Op::Plain(g, l) => {
                    blog.mark(g, l);
                    plog.mark(g, l);
                }
                Op::Flush => {
                    batch.flush();
                    prop_assert_eq!(pages_set(&bregion), pages_set(&pregion));
                }
            }
            prop_assert!(batch.pending_words() <= BATCH_WORDS);
        }
        drop(batch);
        prop_assert_eq!(pages_set(&bregion), pages_set(&pregion));
        let (bs, ps) = (blog.stats(), plog.stats());
        prop_assert_eq!(bs.out_of_range_pages > 0, ps.out_of_range_pages > 0);
        // The carried pages reach a bigger log alike. (The plain mark carries a straddling
        // mark's whole range, the batch only the words past the end, so the plain log may
        // also repeat pages the old log holds.)
        let (bbig, pbig) = (
            Arc::new(LogRegion::anonymous(64).unwrap()),
            Arc::new(LogRegion::anonymous(64).unwrap()),
        );
        blog.replace_region(Some(bbig.clone()));
        plog.replace_region(Some(pbig.clone()));
        let (b, p) = (pages_set(&bbig), pages_set(&pbig));
        prop_assert!(b.iter().all(|x| p.contains(x)), "batch carried a page plain marks did not");
        for x in p.iter().filter(|x| !b.contains(x)) {
            prop_assert!(bregion.test_page(*x), "page {} carried by plain marks only", x);
        }
    }
}

/// Counters: a burst into one word is one RMW; words are counted once however often marked.
#[test]
fn one_rmw_per_distinct_word() {
    let (log, region) = logging(64);
    let batch = log.batch();
    for f in 0..32u64 {
        batch.mark(0x10_0000 + f * 2048, 1514); // frames in 2 KiB buffers: pages 256..=271
        batch.mark(0x1000 + f * 8, 8); // their used elements: page 1
    }
    assert_eq!(batch.pending_words(), 2);
    assert_eq!(region.count_set(), 0, "nothing before the flush");
    batch.flush();
    batch.flush(); // empty: free
    assert_eq!(
        batch.stats(),
        BatchStats {
            marks: 64,
            log_rmws: 2,
            flushes: 1
        }
    );
    let want: Vec<u64> = std::iter::once(1).chain(256..272).collect();
    assert_eq!(pages_set(&region), want);
}

/// Invariant (a): words recorded before a `SET_LOG_BASE` and flushed after it go to the new
/// log; the old one, drained when `replace_region` returned, is never written again.
#[test]
fn flush_after_replacement_goes_to_the_new_log() {
    let (log, old) = logging(64);
    let batch = log.batch();
    batch.mark(3 * PAGE, 1);
    let new = Arc::new(LogRegion::anonymous(64).unwrap());
    assert!(log
        .replace_region(Some(new.clone()))
        .unwrap()
        .same_memory(&old));
    batch.flush();
    assert_eq!(pages_set(&new), vec![3]);
    assert_eq!(old.count_set(), 0);
}

/// Invariant (a), past the end: memory added beyond the log before the bigger log arrives.
/// The batch's words past the end are counted and carried into the log that covers them.
#[test]
fn flush_past_the_end_of_the_log_is_carried() {
    let (log, small) = logging(8); // 64 pages
    let batch = log.batch();
    batch.mark(5 * PAGE, 1);
    batch.mark(70 * PAGE, 2 * PAGE); // pages 70, 71
    batch.flush();
    assert_eq!(pages_set(&small), vec![5]);
    let st = log.stats();
    assert_eq!(st.out_of_range_pages, 2);
    assert_eq!(st.carried_ranges, 1);
    let big = Arc::new(LogRegion::anonymous(16).unwrap());
    log.replace_region(Some(big.clone()));
    assert_eq!(pages_set(&big), vec![70, 71]);
    assert_eq!(log.stats().carried_ranges, 0);
    // A log whose size is not a multiple of 8: pages in its tail bytes are marked.
    let (log, odd) = logging(9); // 72 pages, 64..72 in the tail byte
    let batch = log.batch();
    batch.mark(65 * PAGE, 1);
    batch.mark(70 * PAGE, 4 * PAGE); // 70, 71 in the tail; 72, 73 past the end
    batch.flush();
    assert_eq!(pages_set(&odd), vec![65, 70, 71]);
    assert_eq!(log.stats().out_of_range_pages, 2);
}

/// Invariant (c): LOG_ALL is checked when a mark is recorded (after the data store, as the
/// plain mark does); recorded words are flushed into an attached log even if LOG_ALL went off
/// meanwhile (over-marking is harmless); with no log and logging off they are dropped.
#[test]
fn log_all_off_and_on_around_a_batch() {
    // Recorded while on, flushed while off: applied.
    let (log, region) = logging(64);
    let batch = log.batch();
    batch.mark(3 * PAGE, 1);
    log.set_logging(false);
    batch.mark(4 * PAGE, 1); // off: not recorded
    batch.flush();
    assert_eq!(pages_set(&region), vec![3]);
    // Off at record time, on at flush: nothing was recorded.
    batch.mark(5 * PAGE, 1);
    log.set_logging(true);
    batch.flush();
    assert_eq!(pages_set(&region), vec![3]);
    assert_eq!(batch.stats().marks, 1);

    // No log, logging on: counted, and the next log is made all-dirty (as a plain mark).
    let log = DirtyLog::new();
    log.set_logging(true);
    let batch = log.batch();
    batch.mark(3 * PAGE, 1);
    batch.mark(100 * PAGE, 1);
    batch.flush();
    assert_eq!(log.stats().marks_without_log, 2);
    let next = Arc::new(LogRegion::anonymous(16).unwrap());
    log.replace_region(Some(next.clone()));
    assert_eq!(next.count_set(), 128);

    // No log, logging turned off before the flush: dropped, nothing counted, next log clean.
    let log = DirtyLog::new();
    log.set_logging(true);
    let batch = log.batch();
    batch.mark(3 * PAGE, 1);
    log.set_logging(false);
    batch.flush();
    assert_eq!(log.stats(), LogStats::default());
    let next = Arc::new(LogRegion::anonymous(16).unwrap());
    log.replace_region(Some(next.clone()));
    assert_eq!(next.count_set(), 0);
}

/// Invariant (d): dropping a batch flushes it.
#[test]
fn drop_flushes() {
    let (log, region) = logging(64);
    {
        let batch = log.batch();
        batch.mark(9 * PAGE, 1);
        assert_eq!(region.count_set(), 0);
    }
    assert_eq!(pages_set(&region), vec![9]);
}

/// vm-memory's own writes (what virtio-queue's used-ring updates and a device's frame copies
/// are) are recorded into the scope's batch and reach the log when the scope ends.
#[test]
fn scope_batches_vm_memory_writes() {
    let (log, region) = logging(64);
    let mem: GuestMemoryMmap<GuestDirtyBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * PAGE) as usize)]).unwrap();
    GuestDirtyBitmap::bind_memory(&mem, &log);
    let batch = log.batch();
    batch.scope(|| {
        for f in 0..8u64 {
            mem.write_slice(&[0xAB; 1514], GuestAddress(0x10_000 + f * 2048))
                .unwrap();
            mem.write_obj(f, GuestAddress(0x3000 + f * 8)).unwrap();
        }
        assert_eq!(region.count_set(), 0, "routed writes wait for the flush");
    });
    let want: Vec<u64> = std::iter::once(3).chain(16..20).collect();
    assert_eq!(pages_set(&region), want);
    let st = batch.stats();
    assert_eq!((st.marks, st.log_rmws, st.flushes), (16, 1, 1));
    // Outside a scope the same writes are plain marks again.
    mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
    assert!(region.test_page(5));
    assert_eq!(batch.stats().marks, 16);
}
