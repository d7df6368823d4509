//! Dirty logging of the vhost-user-blk daemon, observed from the VMM side: the frontend gives the
//! real daemon a memfd log (`vhost_dirtylog::vmm::SharedLog`) and checks, page by page, that
//! what the device wrote is marked and nothing else is.

mod blk_support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blk_support::*;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_dirtylog::blk::BlkConfig;
use vhost_dirtylog::driver::blk::BlkOp;
use vhost_dirtylog::driver::{BlkQueue, GuestRam, RegionSpec};
use vhost_dirtylog::vmm::SharedLog;

fn set(it: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    it.into_iter().collect()
}

fn logged(log: &SharedLog) -> BTreeSet<u64> {
    set(set_pages(log))
}

fn used_pages(q: &BlkQueue) -> BTreeSet<u64> {
    set(q.queue().layout().used_pages())
}

fn avail_page(q: &BlkQueue) -> u64 {
    q.queue().layout().avail >> 12
}

/// Submits `op`, snapshots RAM, kicks, waits; asserts success and that every page the device
/// changed (all but the driver's own avail-ring page) is in the log.
fn run_checked(vm: &mut Vm, qi: usize, op: BlkOp<'_>, log: Option<&SharedLog>) -> u64 {
    let q = &mut vm.queues[qi];
    q.submit(op, 0).unwrap();
    let snap = vm.ram.snapshot();
    q.kick().unwrap();
    let c = q.wait(T).unwrap();
    assert!(c.is_ok(), "{c:?}");
    if let Some(log) = log {
        let dirty = logged(log);
        let avail = avail_page(q);
        for p in vm.ram.changed_pages(&snap) {
            assert!(
                p == avail || dirty.contains(&p),
                "page {p:#x} changed by the device but not in the log"
            );
        }
    }
    q.status_page(&c).unwrap()
}

#[test]
fn blk_log_all_marks_exactly_the_written_pages() {
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::new(d.connect(), 1);
    let log = vm.start_logging(RAM_SIZE);
    // Nothing but the used ring (the device may re-arm notifications there when the queue
    // starts, a guest-memory write like any other) is marked before any I/O.
    let early = logged(&log);
    assert!(
        early.is_subset(&used_pages(&vm.queues[0])),
        "pages marked before any I/O: {early:x?}"
    );

    // A read into two buffers, the first straddling a page boundary.
    let b1 = DATA_BASE + 0x3800;
    let b2 = DATA_BASE + 0x10800;
    let status_page = run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 24,
            data: &[(b1, 4608), (b2, 1024)],
        },
        Some(&log),
    );
    let mut want = set(pages_covering(b1, 4608).chain(pages_covering(b2, 1024)));
    want.insert(status_page);
    want.extend(used_pages(&vm.queues[0]));
    assert_eq!(logged(&log), want);
    assert_eq!(
        vm.ram.read_vec(b1, 4608).unwrap(),
        image_bytes(24 * 512, 4608)
    );

    // A write reads guest memory only: just the status byte and the used ring are marked.
    log.region().clear_all();
    let b3 = DATA_BASE + 0x40000;
    vm.ram.fill(b3, 8192, 0x42).unwrap();
    let status_page = run_checked(
        &mut vm,
        0,
        BlkOp::Write {
            sector: 200,
            data: &[(b3, 8192)],
        },
        Some(&log),
    );
    let mut want = used_pages(&vm.queues[0]);
    want.insert(status_page);
    assert_eq!(logged(&log), want);

    // GET_ID writes its 20 bytes.
    log.region().clear_all();
    let b4 = DATA_BASE + 0x50ff0; // straddles two pages
    let status_page = run_checked(&mut vm, 0, BlkOp::GetId { buf: (b4, 20) }, Some(&log));
    let mut want = set(pages_covering(b4, 20));
    want.insert(status_page);
    want.extend(used_pages(&vm.queues[0]));
    assert_eq!(logged(&log), want);
}

#[test]
fn blk_log_all_off_marks_nothing() {
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::new(d.connect(), 1);
    let log = SharedLog::new(RAM_SIZE).unwrap();
    vm.conn.set_log_base(log.dirty_log_region()).unwrap();

    let q = &mut vm.queues[0];
    for i in 0..4u64 {
        assert!(q
            .read(i * 8, &[(DATA_BASE + i * 4096, 4096)], T)
            .unwrap()
            .is_ok());
    }
    assert!(q.write(64, &[(DATA_BASE, 4096)], T).unwrap().is_ok());
    assert!(logged(&log).is_empty(), "marked with LOG_ALL off");

    // On: marked. Off again: nothing more.
    vm.conn.set_log_all(true).unwrap();
    let q = &mut vm.queues[0];
    assert!(q
        .read(0, &[(DATA_BASE + 0x20000, 4096)], T)
        .unwrap()
        .is_ok());
    assert!(logged(&log).contains(&((DATA_BASE + 0x20000) >> 12)));
    vm.conn.set_log_all(false).unwrap();
    log.region().clear_all();
    let q = &mut vm.queues[0];
    assert!(q
        .read(0, &[(DATA_BASE + 0x30000, 4096)], T)
        .unwrap()
        .is_ok());
    assert!(
        logged(&log).is_empty(),
        "marked after LOG_ALL was turned off"
    );
}

#[test]
fn blk_log_multi_region_and_hotplug_after_set_log_base() {
    let d = spawn(IMAGE_SIZE, &[]);
    // Two regions with a hole; a third is hot-added after the log is attached.
    let hi = 12 << 20;
    let hot = 20 << 20;
    let mut vm = Vm::with(
        d.connect(),
        &[RegionSpec::new(0, RAM_SIZE), RegionSpec::new(hi, 2 << 20)],
        1,
        128,
        !VhostUserVirtioFeatures::LOG_ALL.bits(),
    );
    let log = vm.start_logging(hot + (1 << 20));

    // Into the high region: logged at its guest-physical address.
    let b = hi + 0x5000;
    let sp = run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 8,
            data: &[(b, 8192)],
        },
        Some(&log),
    );
    let mut want = set(pages_covering(b, 8192));
    want.insert(sp);
    want.extend(used_pages(&vm.queues[0]));
    assert_eq!(logged(&log), want);

    // Hot-add a region after SET_LOG_BASE; the device's writes into it are logged.
    vm.ram.add_region(RegionSpec::new(hot, 1 << 20)).unwrap();
    vm.conn.add_mem_region(&vm.ram, hot).unwrap();
    log.region().clear_all();
    let b = hot + 0x1200;
    let sp = run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 16,
            data: &[(b, 4096)],
        },
        Some(&log),
    );
    assert_eq!(
        vm.ram.read_vec(b, 4096).unwrap(),
        image_bytes(16 * 512, 4096)
    );
    let mut want = set(pages_covering(b, 4096));
    want.insert(sp);
    want.extend(used_pages(&vm.queues[0]));
    assert_eq!(logged(&log), want);

    // Remove it again; the device keeps serving and logging the rest.
    let removed = vm.ram.remove_region(hot).unwrap();
    vm.conn.remove_mem_region(&removed).unwrap();
    log.region().clear_all();
    let b = DATA_BASE;
    run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 0,
            data: &[(b, 4096)],
        },
        Some(&log),
    );
    assert!(logged(&log).contains(&(b >> 12)));
}

#[test]
fn blk_log_replacement_moves_marks_to_the_new_log() {
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::new(d.connect(), 1);
    let log1 = vm.start_logging(RAM_SIZE);
    let b1 = DATA_BASE;
    run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 0,
            data: &[(b1, 4096)],
        },
        Some(&log1),
    );
    assert!(logged(&log1).contains(&(b1 >> 12)));

    // A bigger log replaces the first (as QEMU does when it resizes the log mid-migration).
    let log2 = SharedLog::new(2 * RAM_SIZE).unwrap();
    vm.conn.set_log_base(log2.dirty_log_region()).unwrap();
    let before = logged(&log1);
    let b2 = DATA_BASE + 0x80000;
    let sp = run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 8,
            data: &[(b2, 4096)],
        },
        Some(&log2),
    );
    let mut want = set(pages_covering(b2, 4096));
    want.insert(sp);
    want.extend(used_pages(&vm.queues[0]));
    assert_eq!(logged(&log2), want);
    assert_eq!(
        logged(&log1),
        before,
        "the replaced log was written after SET_LOG_BASE"
    );
}

#[test]
fn blk_get_vring_base_quiesces_the_ring() {
    const BUF: u64 = 16 * 1024;
    const NBUF: u64 = 32;
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::new(d.connect(), 1);
    let log = vm.start_logging(RAM_SIZE);
    let Vm {
        ram,
        mut conn,
        mut queues,
    } = vm;
    let q = &mut queues[0];
    let used = q.queue().layout().used;
    let cap_chunks = IMAGE_SIZE / BUF;

    // Keep the ring busy (reads completing, new ones submitted and kicked) while another
    // thread stops it, so GET_VRING_BASE races with requests in flight.
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let running = std::sync::atomic::AtomicUsize::new(0);
    let mut sector_of = [0u64; NBUF as usize];
    let mut free: Vec<u64> = (0..NBUF).collect();
    let mut seq = 0u64;
    let mut completed = 0usize;
    let check = |ram: &GuestRam, c: &vhost_dirtylog::driver::blk::Completion, sector: u64| {
        assert!(c.is_ok(), "{c:?}");
        let gpa = DATA_BASE + c.token * BUF;
        assert_eq!(
            ram.read_vec(gpa, BUF as usize).unwrap(),
            image_bytes(sector * 512, BUF as usize)
        );
    };
    let base = std::thread::scope(|s| {
        let h = s.spawn(|| {
            // Stop once the ring is demonstrably running (a few completions seen).
            let deadline = std::time::Instant::now() + T;
            while running.load(Ordering::SeqCst) < 4 {
                assert!(std::time::Instant::now() < deadline, "ring never ran");
                std::thread::yield_now();
            }
            let base = conn.stop_queue(0).unwrap();
            stopped.store(true, Ordering::SeqCst);
            base
        });
        while !stopped.load(Ordering::SeqCst) {
            while let Some(c) = q.try_complete().unwrap() {
                check(&ram, &c, sector_of[c.token as usize]);
                free.push(c.token);
                completed += 1;
                running.store(completed, Ordering::SeqCst);
            }
            if let Some(b) = free.pop() {
                let sector = (seq % cap_chunks) * (BUF / 512);
                seq += 1;
                sector_of[b as usize] = sector;
                q.submit(
                    BlkOp::Read {
                        sector,
                        data: &[(DATA_BASE + b * BUF, BUF as u32)],
                    },
                    b,
                )
                .unwrap();
                q.kick().unwrap();
            } else {
                std::thread::yield_now();
            }
        }
        h.join().unwrap()
    });

    // Every chain the device took was completed before the reply.
    let used_idx: u16 = u16::from_le(ram.load(used + 2, Ordering::Acquire).unwrap());
    assert_eq!(
        used_idx, base,
        "requests still in flight after GET_VRING_BASE"
    );

    // Nothing changes afterwards, even with new requests and kicks.
    if let Some(b) = free.pop() {
        sector_of[b as usize] = 0;
        q.submit(
            BlkOp::Read {
                sector: 0,
                data: &[(DATA_BASE + b * BUF, BUF as u32)],
            },
            b,
        )
        .unwrap();
    }
    let snap = ram.snapshot();
    let log_before = logged(&log);
    q.kick().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ram.changed_pages(&snap),
        Vec::<u64>::new(),
        "guest memory written after stop"
    );
    assert_eq!(logged(&log), log_before, "pages marked after stop");

    // Collect what completed before the stop, restart from the returned base: the rest runs.
    while let Some(c) = q.try_complete().unwrap() {
        check(&ram, &c, sector_of[c.token as usize]);
        completed += 1;
    }
    assert_eq!(q.queue().device_base(), base);
    let pending = q.in_flight();
    conn.start_queue(0, q.queue()).unwrap();
    q.kick().unwrap();
    let rest = q.wait_all(T).unwrap();
    assert_eq!(rest.len(), pending);
    for c in &rest {
        check(&ram, c, sector_of[c.token as usize]);
        assert!(logged(&log).contains(&((DATA_BASE + c.token * BUF) >> 12)));
    }
    assert!(completed > 0, "nothing ran before the stop");
}

#[test]
fn blk_log_direct_io_marks_both_paths() {
    let env = disk_dir(IMAGE_SIZE);
    let srv = InProcessBlk::start(env, false, true, BlkConfig::default());
    let mut vm = Vm::new(srv.connect(), 1);
    let log = vm.start_logging(RAM_SIZE);

    // Page-aligned buffers: zero-copy preadv into guest memory, marked explicitly.
    let b = DATA_BASE + 0x10000;
    let sp = run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 16,
            data: &[(b, 4096), (b + 0x3000, 8192)],
        },
        Some(&log),
    );
    assert_eq!(
        vm.ram.read_vec(b, 4096).unwrap(),
        image_bytes(16 * 512, 4096)
    );
    assert_eq!(
        vm.ram.read_vec(b + 0x3000, 8192).unwrap(),
        image_bytes(24 * 512, 8192)
    );
    let mut want = set(pages_covering(b, 4096).chain(pages_covering(b + 0x3000, 8192)));
    want.insert(sp);
    want.extend(used_pages(&vm.queues[0]));
    assert_eq!(logged(&log), want);
    let stats = srv.device.queue_stats(0).unwrap();
    assert_eq!(stats.direct_zero_copy, 1, "{stats:?}");

    // A buffer at an odd address: bounce buffer, copied in through vm-memory, marked too.
    log.region().clear_all();
    let b = DATA_BASE + 0x20001;
    let sp = run_checked(
        &mut vm,
        0,
        BlkOp::Read {
            sector: 32,
            data: &[(b, 4096)],
        },
        Some(&log),
    );
    assert_eq!(
        vm.ram.read_vec(b, 4096).unwrap(),
        image_bytes(32 * 512, 4096)
    );
    let mut want = set(pages_covering(b, 4096));
    want.insert(sp);
    want.extend(used_pages(&vm.queues[0]));
    assert_eq!(logged(&log), want);
    let stats = srv.device.queue_stats(0).unwrap();
    assert_eq!(stats.direct_bounce, 1, "{stats:?}");

    // Writes on both paths land on disk.
    vm.ram.fill(DATA_BASE + 0x30000, 4096, 0x77).unwrap();
    vm.ram.fill(DATA_BASE + 0x40001, 4096, 0x88).unwrap();
    let q = &mut vm.queues[0];
    assert!(q
        .write(64, &[(DATA_BASE + 0x30000, 4096)], T)
        .unwrap()
        .is_ok());
    assert!(q
        .write(72, &[(DATA_BASE + 0x40001, 4096)], T)
        .unwrap()
        .is_ok());
    assert!(q
        .read(64, &[(DATA_BASE + 0x50000, 8192)], T)
        .unwrap()
        .is_ok());
    let back = vm.ram.read_vec(DATA_BASE + 0x50000, 8192).unwrap();
    assert_eq!(&back[..4096], &[0x77; 4096][..]);
    assert_eq!(&back[4096..], &[0x88; 4096][..]);
    let stats = srv.device.queue_stats(0).unwrap();
    assert_eq!(stats.direct_zero_copy, 3, "{stats:?}");
    assert_eq!(stats.direct_bounce, 2, "{stats:?}");
    assert_eq!(stats.errors, 0);
    drop(vm);
    let _ = srv.join();
}

#[test]
fn blk_drop_marks_switch() {
    // Without the `test-drop-marks` feature the variable must be ignored; with it, the daemon
    // must advertise logging but never mark.
    let env = disk_dir(IMAGE_SIZE);
    let child = std::process::Command::new(BIN)
        .arg("--socket-path")
        .arg(&env.sock)
        .arg(&env.image)
        .env("RUST_LOG", "warn")
        .env("VHOST_DIRTYLOG_TEST_DROP_MARKS", "1")
        .spawn()
        .unwrap();
    let d = DaemonProcess::adopt(child, env);
    d.wait_socket();
    let mut vm = Vm::new(d.connect(), 1);
    assert!(vm.conn.offered_features() & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
    let log = vm.start_logging(RAM_SIZE);
    assert!(vm.queues[0]
        .read(0, &[(DATA_BASE, 4096)], T)
        .unwrap()
        .is_ok());
    let marked = !logged(&log).is_empty();
    if cfg!(feature = "test-drop-marks") {
        assert!(!marked, "drop-marks switch on, but pages were marked");
    } else {
        assert!(
            marked,
            "env var must be ignored without the test-drop-marks feature"
        );
    }
}
