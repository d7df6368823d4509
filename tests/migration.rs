//! Dataplane migration tests: `vhost_dirtylog::check` drives our vhost-user-blk daemon through
//! simulated live migrations — every fault mode, several queues and regions, deferred clearing
//! — and must find 0 lost pages while the device demonstrably wrote thousands of pages under
//! logging. Negative controls prove the checker fails when a backend drops marks, and refuses
//! a backend that cannot log. If qemu-storage-daemon is installed, it is checked too and its
//! result printed (whatever it is).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_dirtylog::backend::DirtyLogBackend;
use vhost_dirtylog::blk::disk::Disk;
use vhost_dirtylog::blk::{BlkConfig, BlkDevice};
use vhost_dirtylog::check::{
    self, default_layout, CheckError, CheckOptions, Fault, Report, SyncMode, VmmStyle, Workload,
    EXIT_LOST, EXIT_OK, EXIT_UNSUPPORTED,
};
use vhost_dirtylog::log::DirtyLog;
use vhost_dirtylog::test_utils::blk::{spawn_blk, InProcessBlk};
use vhost_dirtylog::test_utils::{DaemonDir, DaemonProcess, InProcessDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-blk");
const CHECKER: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-check");
const QSD: &str = "/usr/bin/qemu-storage-daemon";
const DISK: u64 = 8 << 20;
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// A scratch directory with a sparse disk image of `DISK` bytes and a socket path.
fn env() -> DaemonDir {
    let env = DaemonDir::new("migration-test");
    env.sparse_image(DISK);
    env
}

/// Our daemon binary with 2 queues; it serves one frontend after another (reconnects).
fn daemon() -> DaemonProcess {
    spawn_blk(DAEMON, env(), &["--num-queues", "2"], "error")
}

/// Small and short, so the whole file runs quickly in debug builds on two cores.
fn opts(sock: &Path) -> CheckOptions {
    CheckOptions {
        layout: default_layout(12 << 20, 3).unwrap(),
        queues: Some(2),
        queue_size: 128,
        depth: 12,
        max_io: 64 << 10,
        duration: Duration::from_millis(1200),
        round_interval: Duration::from_millis(25),
        disk_span: DISK,
        settle: Duration::from_millis(100),
        ..CheckOptions::new(sock)
    }
}

/// The assertions every run against our daemon must pass.
fn assert_clean(r: &Report, what: &str) {
    println!("{what}:\n{}", r.summary());
    assert_eq!(r.lost_pages, 0, "{what}: lost pages: {:?}", r.lost_samples);
    assert_eq!(r.data_errors, 0, "{what}: {:?}", r.samples);
    assert_eq!(r.io_errors, 0, "{what}: {:?}", r.samples);
    assert_eq!(
        r.stop.inflight_at_stop, 0,
        "{what}: GET_VRING_BASE did not quiesce"
    );
    assert_eq!(r.stop.processed_after_stop, 0, "{what}");
    assert!(r.stop.error.is_none(), "{what}: {:?}", r.stop.error);
    assert_eq!(r.exit_code, EXIT_OK, "{what}: {}", r.verdict);
    // Meaningful: the device wrote many pages under logging, over many rounds, on all queues.
    assert!(
        r.device_pages_written >= 500,
        "{what}: the device wrote only {} distinct pages while logging",
        r.device_pages_written
    );
    assert!(r.vmm.pages_marked >= 500, "{what}: {:?}", r.vmm);
    assert!(r.vmm.rounds >= 5, "{what}: only {} rounds", r.vmm.rounds);
    assert!(r.requests >= 100, "{what}: only {} requests", r.requests);
    assert!(r.queues == 2 && r.layout.len() >= 3, "{what}");
}

fn check_ok(faults: &[Fault], tweak: impl FnOnce(&mut CheckOptions)) -> Report {
    let d = daemon();
    let mut o = opts(&d.env.sock);
    o.faults = faults.to_vec();
    tweak(&mut o);
    let r = check::run(&o).unwrap_or_else(|e| panic!("{faults:?}: {e}"));
    assert_eq!(r.fault_log.len(), faults.len(), "{:?}", r.fault_log);
    r
}

#[test]
fn migration_no_fault_multiqueue_multiregion() {
    let r = check_ok(&[], |_| {});
    assert_clean(&r, "no fault");
    // Data landed in every region.
    assert!(r.lost_samples.is_empty());
}

#[test]
fn migration_log_resize() {
    let r = check_ok(&[Fault::LogResize], |_| {});
    assert_clean(&r, "log-resize");
    assert!(r.log_bytes > 0 && r.fault_log[0].detail.contains("drained"));
}

#[test]
fn migration_mem_table() {
    let r = check_ok(&[Fault::MemTable], |_| {});
    assert_clean(&r, "mem-table");
    assert!(r.backend.mem_slots, "our daemon supports ADD_MEM_REG");
    // The hot-added region joined the comparison (4 MiB added, 1 MiB removed).
    let start: u64 = r.layout.iter().map(|l| l.1 >> 12).sum();
    assert_eq!(r.ram_pages, start + 1024 - 256);
}

#[test]
fn migration_log_toggle() {
    let r = check_ok(&[Fault::LogToggle], |_| {});
    assert_clean(&r, "log-toggle");
}

#[test]
fn migration_reconnect() {
    let r = check_ok(&[Fault::Reconnect], |_| {});
    assert_clean(&r, "reconnect");
}

#[test]
fn migration_deferred_mixed_all_faults() {
    let r = check_ok(&Fault::ALL, |o| {
        o.deferred = true;
        o.clear_chunk = 64;
        o.workload = Workload::Mixed;
        o.duration = Duration::from_millis(2000);
    });
    assert_clean(&r, "deferred, mixed, all faults");
    assert!(r.writes > 0 && r.reads > 0);
}

#[test]
fn checker_cli_json() {
    let d = daemon();
    let out = Command::new(CHECKER)
        .args([
            "--json",
            "--mem",
            "8M",
            "--regions",
            "2",
            "--queue-size",
            "64",
            "--depth",
            "8",
            "--max-io",
            "32K",
            "--disk-span",
            "4M",
            "--duration",
            "400ms",
            "--fault",
            "log-resize",
        ])
        .arg(&d.env.sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["lost_pages"], 0);
    assert_eq!(v["exit_code"], 0);
    assert!(v["requests"].as_u64().unwrap() > 0);
    // Usage errors are not protocol errors.
    let bad = Command::new(CHECKER)
        .args(["--min-io", "1000"])
        .arg(&d.env.sock)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(check::EXIT_USAGE));
}

// ---------------------------------------------------------------------------------------
// Negative controls: backends that drop marks, run in-process.

/// How the test backend misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Broken {
    /// Advertises logging but never lets LOG_ALL reach the adapter: marks nothing.
    NeverLogs,
    /// Does not offer logging at all.
    CannotLog,
}

/// Our device behind a wrapper that breaks dirty logging in one way.
#[derive(Clone)]
struct Wrapper {
    inner: DirtyLogBackend<BlkDevice>,
    broken: Option<Broken>,
}

mod wrapper {
    use super::*;
    use std::fs::File;
    use vhost::vhost_user::message::{
        VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
        VhostUserShMemConfig, VhostUserSharedMsg,
    };
    use vhost::vhost_user::{Backend, GpuBackend};
    use vhost_dirtylog::backend::DirtyGuestMemory;
    use vhost_dirtylog::log::GuestDirtyBitmap;
    use vhost_user_backend::VhostUserBackend;
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::event::{EventConsumer, EventNotifier};

    impl VhostUserBackend for Wrapper {
        type Bitmap = GuestDirtyBitmap;
        type Vring = <DirtyLogBackend<BlkDevice> as VhostUserBackend>::Vring;

        fn num_queues(&self) -> usize {
            self.inner.num_queues()
        }
        fn max_queue_size(&self) -> usize {
            self.inner.max_queue_size()
        }
        fn features(&self) -> u64 {
            match self.broken {
                Some(Broken::CannotLog) => self.inner.features() & !LOG_ALL,
                _ => self.inner.features(),
            }
        }
        fn acked_features(&self, features: u64) {
            match self.broken {
                Some(Broken::NeverLogs) => self.inner.acked_features(features & !LOG_ALL),
                _ => self.inner.acked_features(features),
            }
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            match self.broken {
                Some(Broken::CannotLog) => {
                    self.inner.protocol_features() - VhostUserProtocolFeatures::LOG_SHMFD
                }
                _ => self.inner.protocol_features(),
            }
        }
        fn reset_device(&self) {
            self.inner.reset_device()
        }
        fn set_event_idx(&self, enabled: bool) {
            self.inner.set_event_idx(enabled)
        }
        fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
            self.inner.get_config(offset, size)
        }
        fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
            self.inner.set_config(offset, buf)
        }
        fn update_memory(&self, mem: DirtyGuestMemory) -> std::io::Result<()> {
            self.inner.update_memory(mem)
        }
        fn set_backend_req_fd(&self, backend: Backend) {
            self.inner.set_backend_req_fd(backend)
        }
        fn get_shared_object(&self, uuid: VhostUserSharedMsg) -> std::io::Result<File> {
            self.inner.get_shared_object(uuid)
        }
        fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> std::io::Result<()> {
            self.inner.set_gpu_socket(gpu_backend)
        }
        fn queues_per_thread(&self) -> Vec<u64> {
            self.inner.queues_per_thread()
        }
        fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
            self.inner.exit_event(thread_index)
        }
        fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
            self.inner.stop_vring(queue_index)
        }
        fn handle_event(
            &self,
            device_event: u16,
            evset: EventSet,
            vrings: &[Self::Vring],
            thread_id: usize,
        ) -> std::io::Result<()> {
            self.inner
                .handle_event(device_event, evset, vrings, thread_id)
        }
        fn set_device_state_fd(
            &self,
            direction: VhostTransferStateDirection,
            phase: VhostTransferStatePhase,
            file: File,
        ) -> std::io::Result<Option<File>> {
            self.inner.set_device_state_fd(direction, phase, file)
        }
        fn check_device_state(&self) -> std::io::Result<()> {
            self.inner.check_device_state()
        }
        fn get_shmem_config(&self) -> std::io::Result<VhostUserShMemConfig> {
            self.inner.get_shmem_config()
        }
    }
}

/// Serves one frontend in-process with our device, broken as asked; returns the device's log
/// handle (for tests that switch it behind the frontend's back).
fn serve_in_process(env: &DaemonDir, broken: Option<Broken>) -> DirtyLog {
    let disk = Arc::new(Disk::open(&env.image, false, false).unwrap());
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let config = BlkConfig {
        num_queues: 2,
        ..BlkConfig::default()
    };
    let inner = BlkDevice::into_backend(disk, config, mem.clone()).unwrap();
    let log = inner.log().clone();
    // Serves until the test ends (the fixture does not wait for the thread when dropped).
    InProcessDaemon::serve(Wrapper { inner, broken }, mem, &env.sock);
    log
}

#[test]
fn checker_catches_a_backend_that_never_marks() {
    let env = env();
    serve_in_process(&env, Some(Broken::NeverLogs));
    let r = check::run(&opts(&env.sock)).unwrap();
    println!("{}", r.summary());
    assert!(r.lost_pages > 0, "a backend that marks nothing passed");
    assert!(r.lost_unmarked > 0 && r.lost_data > 0);
    assert_eq!(r.exit_code, EXIT_LOST);
    assert_eq!(r.vmm.pages_marked, 0);
    // The device itself worked: the failure is the log's, not the data's.
    assert_eq!(r.data_errors, 0);
}

#[test]
fn checker_catches_brief_logging_gaps() {
    // Logging drops out for 5 ms in every 50 ms: most writes are marked, some are not.
    let env = env();
    let log = serve_in_process(&env, None);
    let stop = Arc::new(AtomicBool::new(false));
    let flicker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut gaps = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(45));
                if log.is_logging() {
                    log.set_logging(false);
                    std::thread::sleep(Duration::from_millis(5));
                    log.set_logging(true);
                    gaps += 1;
                }
            }
            gaps
        })
    };
    let mut o = opts(&env.sock);
    o.layout = default_layout(32 << 20, 3).unwrap();
    let r = check::run(&o).unwrap();
    stop.store(true, Ordering::Relaxed);
    let gaps = flicker.join().unwrap();
    println!("{gaps} gaps\n{}", r.summary());
    assert!(gaps > 5);
    assert!(r.vmm.pages_marked > 500, "logging mostly worked");
    assert!(r.lost_pages > 0, "lost marks in {gaps} gaps went unnoticed");
    assert_eq!(r.exit_code, EXIT_LOST);
}

#[test]
fn checker_refuses_a_backend_without_logging() {
    let env = env();
    serve_in_process(&env, Some(Broken::CannotLog));
    let e = check::run(&opts(&env.sock)).unwrap_err();
    assert!(matches!(e, CheckError::Unsupported(_)), "{e}");
    assert_eq!(e.exit_code(), EXIT_UNSUPPORTED);
    assert!(
        e.to_string()
            .contains("backend does not support dirty logging: migration impossible"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------

#[test]
fn qemu_storage_daemon_under_the_checker() {
    if !Path::new(QSD).exists() {
        println!("note: {QSD} not installed; skipping the qemu-storage-daemon check");
        return;
    }
    let env = env();
    let child = Command::new(QSD)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            env.image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            env.sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let qsd = DaemonProcess::adopt(child, env);
    qsd.wait_socket();
    let r = check::run(&opts(&qsd.env.sock)).unwrap_or_else(|e| panic!("protocol error: {e}"));
    println!(
        "qemu-storage-daemon: {} lost page(s), {} request(s) in flight at GET_VRING_BASE, stop error: {:?}\n{}",
        r.lost_pages,
        r.stop.inflight_at_stop,
        r.stop.error,
        r.summary()
    );
    assert!(r.requests > 0 && r.vmm.rounds >= 5);
}

/// A frontend may put buffers in memory it just hot-added as soon as `ADD_MEM_REG` is acked,
/// while the device is still busy with earlier requests on the same ring. (Found by the
/// mem-table fault: the device kept one memory snapshot for a whole busy loop and failed such
/// requests with an I/O error.)
#[test]
fn hot_added_memory_is_usable_right_after_the_ack() {
    use vhost_dirtylog::driver::blk::BlkOp;
    use vhost_dirtylog::driver::{BlkQueue, Connection, GuestRam, QueueLayout, RegionSpec};
    let d = daemon();
    let t = Duration::from_secs(10);
    let mut conn = Connection::connect(&d.env.sock, t).unwrap();
    conn.set_timeout(Some(t)).unwrap();
    conn.negotiate_blk().unwrap();
    let ram = Arc::new(GuestRam::new(&[RegionSpec::new(0, 8 << 20)]).unwrap());
    conn.set_mem_table(&ram).unwrap();
    let layout = QueueLayout::new(0, 256).unwrap();
    let mut q = BlkQueue::new(ram.clone(), layout, 0x10000, conn.event_idx()).unwrap();
    conn.start_queue(0, q.queue()).unwrap();
    for cycle in 0..20u64 {
        // A backlog of reads keeps the device's worker busy...
        for i in 0..60u64 {
            let data = [(0x100000 + i * 0x10000, 0x10000)];
            let op = BlkOp::Read {
                sector: i * 128,
                data: &data,
            };
            q.submit(op, 0).unwrap();
        }
        q.kick().unwrap();
        // ...while a region is hot-added and used at once.
        let gpa = (16 << 20) + cycle * (1 << 20);
        ram.add_region(RegionSpec::new(gpa, 1 << 20)).unwrap();
        conn.add_mem_region(&ram, gpa).unwrap();
        let data = [(gpa + 0x1000, 4096)];
        q.submit(
            BlkOp::Read {
                sector: 8,
                data: &data,
            },
            1,
        )
        .unwrap();
        q.kick().unwrap();
        for c in q.wait_all(t).unwrap() {
            assert!(
                c.is_ok(),
                "cycle {cycle}: {} failed: {c:?}",
                if c.token == 1 {
                    "a read into memory added just before"
                } else {
                    "a read"
                }
            );
        }
        let removed = ram.remove_region(gpa).unwrap();
        conn.remove_mem_region(&removed).unwrap();
    }
}

// --- issue 13 items 4 and 5, the SET_VRING_ADDR storm, and cloud-hypervisor's way ----------

/// Issue 13 item 4: without `REPLY_ACK`, `SET_FEATURES(LOG_ALL)` and `SET_VRING_ADDR(F_LOG)` are
/// not waited for; a checker that copies RAM at once blames a correct backend for the writes it
/// made before it turned logging on (12 of 20 such 60 ms runs "lost" 2..180 pages). With the
/// barrier after them: 0 of 20.
#[test]
fn no_reply_ack_short_runs_lose_nothing() {
    let d = daemon();
    let mut lossy = 0;
    for run in 0..20 {
        // The default size (64 MiB, 2 x 32 in flight): the race shows there (see the negative
        // control below).
        let mut o = CheckOptions {
            disk_span: DISK,
            ..CheckOptions::new(&d.env.sock)
        };
        o.reply_ack = false;
        o.duration = Duration::from_millis(60);
        o.seed = run;
        let r = check::run(&o).unwrap_or_else(|e| panic!("run {run}: {e}"));
        assert!(!r.backend.reply_ack, "REPLY_ACK was negotiated");
        assert!(r.device_pages_written > 0 && r.requests > 0, "run {run}");
        if r.lost_pages > 0 {
            println!("run {run}:\n{}", r.summary());
            lossy += 1;
        }
    }
    assert_eq!(lossy, 0, "{lossy} of 20 runs lost pages without REPLY_ACK");
}

/// A queue that hangs with requests in flight fails the run within `stall_timeout`, naming the
/// queue and the count (before: only after `--timeout`, so short runs ended PASS).
#[test]
fn a_hung_queue_is_reported() {
    let env = env();
    let config = BlkConfig {
        num_queues: 2,
        ..BlkConfig::default()
    };
    let a = InProcessBlk::start(env, false, false, config);
    if !a.device.is_async(1) {
        println!("note: no io_uring dataplane here; skipping (the hold hook needs it)");
        return;
    }
    let dev = a.device.clone();
    let holder = std::thread::spawn(move || {
        // Hang queue 1 once the migration is under way.
        std::thread::sleep(Duration::from_millis(400));
        dev.hold_submissions_for_tests(1, true);
        std::thread::sleep(Duration::from_secs(4));
        dev.hold_submissions_for_tests(1, false);
    });
    let mut o = opts(&a.env.sock);
    o.duration = Duration::from_secs(3);
    o.stall_timeout = Duration::from_millis(500);
    let t = std::time::Instant::now();
    let e = check::run(&o).expect_err("a hung queue passed");
    println!("{e} (after {:?})", t.elapsed());
    let msg = e.to_string();
    assert!(msg.contains("queue 1 hung"), "{msg}");
    assert!(msg.contains("request(s) in flight"), "{msg}");
    assert_eq!(e.exit_code(), check::EXIT_PROTOCOL);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    holder.join().unwrap();
}

/// Requests still in flight when the backend answers the final stop fail the run, naming the
/// queue and the count: the device's hook makes `GET_VRING_BASE` / `SET_VRING_ENABLE(0)` stop
/// waiting for requests held in the disk (negative control of the quiesce).
fn in_flight_at_the_stop_is_reported(style: VmmStyle) {
    let env = env();
    let config = BlkConfig {
        num_queues: 2,
        ..BlkConfig::default()
    };
    let a = InProcessBlk::start(env, false, false, config);
    if !a.device.is_async(1) {
        println!("note: no io_uring dataplane here; skipping (the hold hook needs it)");
        return;
    }
    let dev = a.device.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let holder = std::thread::spawn(move || {
        // Once queue 1 has run: hold its requests in the disk, and let the stop not wait.
        while !dev.skip_quiesce_for_tests(1, true) && !s2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        dev.hold_submissions_for_tests(1, true);
        while !s2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        dev.hold_submissions_for_tests(1, false);
    });
    let mut o = opts(&a.env.sock);
    o.vmm_style = style;
    o.stall_timeout = Duration::from_secs(8);
    let r = check::run(&o).unwrap_or_else(|e| panic!("{style}: {e}"));
    stop.store(true, Ordering::Relaxed);
    holder.join().unwrap();
    println!("{}", r.summary());
    assert_eq!(r.exit_code, check::EXIT_PROTOCOL, "{}", r.verdict);
    assert!(r.stop.inflight_by_queue[1] > 0, "{:?}", r.stop);
    assert!(r.verdict.contains("queue 1:"), "{}", r.verdict);
}

#[test]
fn in_flight_at_get_vring_base_is_reported() {
    in_flight_at_the_stop_is_reported(VmmStyle::Qemu);
}

#[test]
fn in_flight_at_set_vring_enable_0_is_reported() {
    in_flight_at_the_stop_is_reported(VmmStyle::Ch);
}

/// `--fault vring-addr`: the storm until the final stop; no hang, nothing lost.
#[test]
fn migration_vring_addr_storm() {
    for style in VmmStyle::ALL {
        let r = check_ok(&[Fault::VringAddr], |o| o.vmm_style = style);
        assert_clean(&r, &format!("vring-addr, {style}"));
        assert!(
            r.fault_log[0]
                .detail
                .contains("burst(s) until the final stop"),
            "{}",
            r.fault_log[0].detail
        );
    }
}

/// cloud-hypervisor's way (`--vmm-style ch`: flip sync, stop by `SET_VRING_ENABLE(0)` and one
/// more flip whose new log is never read), in every fault mode.
fn ch_ok(faults: &[Fault]) {
    let r = check_ok(faults, |o| o.vmm_style = VmmStyle::Ch);
    assert_clean(&r, &format!("ch {faults:?}"));
    assert_eq!(r.sync, SyncMode::Flip);
    assert_eq!(r.stop.message, "SET_VRING_ENABLE(0)");
    assert!(r.vmm.flips >= r.vmm.rounds, "{:?}", r.vmm);
}

#[test]
fn ch_migration_no_fault() {
    ch_ok(&[]);
}

#[test]
fn ch_migration_log_resize() {
    ch_ok(&[Fault::LogResize]);
}

#[test]
fn ch_migration_mem_table() {
    ch_ok(&[Fault::MemTable]);
}

#[test]
fn ch_migration_log_toggle() {
    ch_ok(&[Fault::LogToggle]);
}

#[test]
fn ch_migration_reconnect() {
    ch_ok(&[Fault::Reconnect]);
}

#[test]
fn ch_migration_all_faults_mixed_no_reply_ack() {
    let r = check_ok(&Fault::ALL, |o| {
        o.vmm_style = VmmStyle::Ch;
        o.reply_ack = false;
        o.workload = Workload::Mixed;
        o.duration = Duration::from_millis(2000);
    });
    assert_clean(&r, "ch, all faults, mixed, no REPLY_ACK");
}

/// Flip sync with QEMU's stop.
#[test]
fn flip_sync_with_qemu_stop() {
    let r = check_ok(&[Fault::LogResize, Fault::MemTable], |o| {
        o.sync = Some(SyncMode::Flip)
    });
    assert_clean(&r, "qemu style, flip sync");
    assert!(r.vmm.flips >= r.vmm.rounds);
}

#[test]
fn ch_checker_catches_a_backend_that_never_marks() {
    let env = env();
    serve_in_process(&env, Some(Broken::NeverLogs));
    let mut o = opts(&env.sock);
    o.vmm_style = VmmStyle::Ch;
    let r = check::run(&o).unwrap();
    println!("{}", r.summary());
    assert!(
        r.lost_pages > 0 && r.lost_data > 0,
        "a backend that marks nothing passed"
    );
    assert_eq!(r.exit_code, EXIT_LOST);
    assert_eq!(r.vmm.pages_marked, 0);
}

/// Negative control of the barrier: the same short runs without it. The checker then copies RAM
/// before the backend has turned logging on, and blames it for writes it made in between.
#[test]
fn no_reply_ack_without_barrier_blames_the_backend() {
    let d = daemon();
    let mut lossy = 0;
    let mut lost = Vec::new();
    // 2..5 of 20 runs show it on a loaded 2-core machine: run until one does (at most 80).
    for run in 0..80 {
        let mut o = CheckOptions {
            disk_span: DISK,
            ..CheckOptions::new(&d.env.sock)
        };
        o.reply_ack = false;
        o.barrier = false;
        o.duration = Duration::from_millis(60);
        o.seed = run;
        let r = check::run(&o).unwrap_or_else(|e| panic!("run {run}: {e}"));
        if r.lost_pages > 0 {
            lossy += 1;
        }
        lost.push(r.lost_pages);
        if lossy > 0 {
            break;
        }
    }
    println!(
        "without the barrier: {lossy} of {} runs lost pages: {lost:?}",
        lost.len()
    );
    assert!(lossy > 0, "the race did not show in 80 runs");
}
