//! Flip sync (`vmm::LogFlip`) against the backend's real `DirtyLog`.
//!
//! Backend threads mark pages through a `DirtyLog` while the VMM flips: each `SET_LOG_BASE` is
//! played by what the backend does on it, `DirtyLog::replace_region` with its own mapping of
//! the log's memfd (returns after the RCU grace period, i.e. when the backend may reply). Every
//! page is marked exactly once per epoch, so a mark erased by a clear can never be hidden by a
//! later mark of the same page, and at the end of an epoch each marked page must be in the
//! migration bitmap or in one of the two logs. The negative control runs the same harness with a
//! VMM that commits flips it never sent — the retired log is still attached when it is merged
//! and cleared with plain stores — and shows that the check catches the lost marks (DESIGN.md
//! invariants 1 and 3).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use vhost::VhostUserDirtyLogRegion;
use vhost_dirtylog::log::{DirtyLog, LogRegion, LOG_PAGE_SIZE};
use vhost_dirtylog::vmm::{FlipState, LogFlip, MigrationBitmap, VmmError};

/// What the backend does on `SET_LOG_BASE`: map the region from its fd and make it current.
fn set_log_base(backend: &DirtyLog, r: VhostUserDirtyLogRegion) {
    // SAFETY: the fd belongs to a `SharedLog` owned by the `LogFlip`, which outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(r.mmap_handle) };
    let region = LogRegion::from_fd(fd, r.mmap_offset, r.mmap_size).expect("map log");
    backend.replace_region(Some(Arc::new(region)));
}

fn attached(flip: &LogFlip) -> (DirtyLog, MigrationBitmap) {
    let backend = DirtyLog::new();
    set_log_base(&backend, flip.active().dirty_log_region());
    backend.set_logging(true);
    let bm = MigrationBitmap::new(flip.guest_pages()).unwrap();
    (backend, bm)
}

#[test]
fn one_flip_merges_the_retired_log_and_clears_it() {
    let mut flip = LogFlip::new(64 << 20).unwrap();
    let (backend, bm) = attached(&flip);
    backend.mark(5 * LOG_PAGE_SIZE, 3 * LOG_PAGE_SIZE); // pages 5..=7
    backend.mark(1000 * LOG_PAGE_SIZE, 1);
    let first = flip.active().region().clone();
    let first_fd = flip.active().dirty_log_region().mmap_handle;
    let stats = flip
        .flip(&bm, |next| {
            set_log_base(&backend, next);
            Ok::<_, VmmError>(())
        })
        .unwrap();
    assert_eq!(stats.newly_dirty, 4);
    assert_eq!(bm.iter().collect::<Vec<_>>(), [5, 6, 7, 1000]);
    // The retired log is clean again and is now the standby.
    assert_eq!(first.count_set(), 0);
    assert!(flip.standby().region().same_memory(&first));
    assert_eq!(flip.state(), FlipState::Idle);
    // Marks now go to the other log; the next flip hands the first one back.
    backend.mark(7 * LOG_PAGE_SIZE, 2 * LOG_PAGE_SIZE); // pages 7, 8
    assert_eq!(flip.active().region().count_set(), 2);
    let stats = flip
        .flip(&bm, |next| {
            assert_eq!(next.mmap_handle, first_fd);
            set_log_base(&backend, next);
            Ok::<_, VmmError>(())
        })
        .unwrap();
    assert_eq!(stats.newly_dirty, 1); // page 8 (7 was dirty already)
    assert_eq!(bm.count_dirty(), 5);
    assert!(flip.active().region().same_memory(&first));
}

#[test]
fn steps_out_of_order_are_errors_not_panics() {
    let mut flip = LogFlip::new(1 << 20).unwrap();
    let bm = MigrationBitmap::new(flip.guest_pages()).unwrap();
    let order = |e: VmmError| matches!(e, VmmError::FlipOrder { .. });
    assert!(order(flip.commit().unwrap_err()));
    assert!(order(flip.abort().unwrap_err()));
    assert!(order(flip.merge_retired(&bm).unwrap_err()));
    let r = flip.begin().unwrap();
    assert!(order(flip.begin().err().unwrap()));
    assert!(order(flip.merge_retired(&bm).unwrap_err()));
    assert!(order(flip.grow(2 << 20).unwrap_err()));
    // An aborted flip hands out the same standby log again.
    flip.abort().unwrap();
    assert_eq!(flip.begin().unwrap().mmap_handle, r.mmap_handle);
    flip.commit().unwrap();
    assert!(order(flip.commit().unwrap_err()));
    assert!(order(flip.begin().err().unwrap()));
    assert_eq!(flip.merge_retired(&bm).unwrap(), 0);
    // A failing send aborts the flip and returns the caller's error.
    let err = flip
        .flip(&bm, |_| Err::<(), _>(VmmError::ZeroSize))
        .unwrap_err();
    assert!(
        matches!(&err, VmmError::SetLogBase(e) if e.to_string().contains("zero")),
        "{err}"
    );
    assert_eq!(flip.state(), FlipState::Idle);
    assert!(matches!(LogFlip::new(0), Err(VmmError::ZeroSize)));
}

/// Memory hotplug: `grow` replaces the standby log at once and the active one once it comes
/// back retired; a retired log with marks past the end of the bitmap is refused (and kept)
/// until the bitmap has grown.
#[test]
fn growth_replaces_both_logs_and_loses_nothing() {
    let small = 16u64 << 20; // 4096 pages
    let big = 32u64 << 20;
    let mut flip = LogFlip::new(small).unwrap();
    let (backend, bm) = attached(&flip);
    backend.mark(10 * LOG_PAGE_SIZE, 1);
    flip.grow(big).unwrap();
    assert_eq!(flip.standby().gpa_end(), big);
    assert_eq!(flip.active().gpa_end(), small);
    // Flip to the big log; the small one comes back retired, is merged and replaced.
    let s = flip
        .flip(&bm, |next| {
            assert_eq!(next.mmap_size, big / LOG_PAGE_SIZE / 8);
            set_log_base(&backend, next);
            Ok::<_, VmmError>(())
        })
        .unwrap();
    assert_eq!(s.newly_dirty, 1);
    assert_eq!(flip.active().gpa_end(), big);
    assert_eq!(flip.standby().gpa_end(), big);
    // The backend now writes the new memory; the bitmap has not grown yet.
    backend.mark(5000 * LOG_PAGE_SIZE, 1);
    backend.mark(11 * LOG_PAGE_SIZE, 1);
    let err = flip
        .flip(&bm, |next| {
            set_log_base(&backend, next);
            Ok::<_, VmmError>(())
        })
        .unwrap_err();
    assert!(matches!(
        err,
        VmmError::LogPastBitmap {
            page: 5000,
            bitmap_pages: 4096
        }
    ));
    assert_eq!(flip.state(), FlipState::Retired);
    assert_eq!(
        flip.standby().region().count_set(),
        2,
        "nothing merged or cleared"
    );
    bm.grow(flip.guest_pages()).unwrap();
    assert_eq!(flip.merge_retired(&bm).unwrap(), 2);
    assert_eq!(bm.iter().collect::<Vec<_>>(), [10, 11, 5000]);
    // Growing while retired: the retired log is replaced after its merge.
    backend.mark(6000 * LOG_PAGE_SIZE, 1);
    flip.begin().unwrap();
    flip.commit().unwrap(); // (the backend did not switch; it has nothing new anyway)
    flip.grow(64 << 20).unwrap();
    bm.grow(flip.guest_pages()).unwrap();
    assert_eq!(flip.merge_retired(&bm).unwrap(), 1); // page 6000 was in the retired log
    assert_eq!(flip.standby().gpa_end(), 64 << 20);
    assert_eq!(flip.active().gpa_end(), big);
}

/// How the VMM side behaves in [`epochs`].
#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    /// Flip correctly: `SET_LOG_BASE` (replace_region) before commit.
    Flip,
    /// The bug the negative control plants: commit a flip that was never sent, so the log
    /// merged and plainly cleared is still attached.
    CommitWithoutSend,
}

/// Runs epochs of `threads` markers, each marking every `threads`-th page of a `pages`-page
/// guest exactly once (interleaved, so they hit the same words at the same time), while the
/// VMM flips and merges in a loop. After each epoch every page must be in the bitmap or in a
/// log. Returns the number of lost pages over all epochs (stops early once pages were lost or
/// `deadline` passed).
fn epochs(vmm: Vmm, pages: u64, threads: u64, max_epochs: u32, deadline: Duration) -> u64 {
    let mut flip = LogFlip::new(pages * LOG_PAGE_SIZE).unwrap();
    let (backend, _) = attached(&flip);
    let start = Instant::now();
    let mut lost = 0;
    let mut rounds = 0u64;
    for _ in 0..max_epochs {
        let bm = MigrationBitmap::new(pages).unwrap();
        let done = AtomicU64::new(0);
        let go = Barrier::new(threads as usize + 1);
        let stop = AtomicBool::new(false);
        thread::scope(|s| {
            for t in 0..threads {
                let (backend, done, go) = (&backend, &done, &go);
                s.spawn(move || {
                    go.wait();
                    let mut p = t;
                    while p < pages {
                        backend.mark(p * LOG_PAGE_SIZE, 1);
                        p += threads;
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            go.wait();
            while done.load(Ordering::Acquire) < threads && !stop.load(Ordering::Relaxed) {
                let r = flip.flip(&bm, |next| {
                    if vmm == Vmm::Flip {
                        set_log_base(&backend, next);
                    }
                    Ok::<_, VmmError>(())
                });
                r.unwrap();
                rounds += 1;
            }
        });
        // Every page must be somewhere: merged, or still in one of the logs.
        let in_log =
            |p| flip.active().region().test_page(p) || flip.standby().region().test_page(p);
        let missing = (0..pages).filter(|&p| !bm.test(p) && !in_log(p)).count() as u64;
        lost += missing;
        // Collect what is left (correct flips) so the next epoch starts from clean logs.
        for _ in 0..2 {
            flip.flip(&bm, |next| {
                set_log_base(&backend, next);
                Ok::<_, VmmError>(())
            })
            .unwrap();
        }
        if vmm == Vmm::Flip {
            assert_eq!(
                bm.count_dirty(),
                pages,
                "after two more flips all is merged"
            );
        }
        if lost > 0 || start.elapsed() > deadline {
            break;
        }
    }
    let name = match vmm {
        Vmm::Flip => "flip",
        Vmm::CommitWithoutSend => "commit without send",
    };
    eprintln!("{name}: {rounds} flips, {lost} lost pages");
    lost
}

#[test]
fn concurrent_marks_and_flips_lose_no_page() {
    let lost = epochs(Vmm::Flip, 16384, 3, 40, Duration::from_secs(20));
    assert_eq!(lost, 0, "a correct flip lost marks");
}

/// Negative control: clearing a log that is still attached (a flip committed without its
/// `SET_LOG_BASE`) erases marks that race the clear, and the epoch check sees them missing.
#[test]
fn clearing_a_still_attached_log_loses_marks_and_is_caught() {
    let lost = epochs(
        Vmm::CommitWithoutSend,
        4096,
        2,
        10_000,
        Duration::from_secs(30),
    );
    assert!(
        lost > 0,
        "the harness did not detect the planted lossy clear"
    );
}
