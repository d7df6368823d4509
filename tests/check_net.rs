//! `vhost_dirtylog::check` with `--device net`: the checker drives our vhost-user-net daemon
//! (`vhost-dirtylog-net --socket-port`) through simulated live migrations — every fault mode,
//! both VMM styles, two queue pairs, frames injected through the socket port that keep
//! arriving through the final stop — and must find 0 lost pages while the device demonstrably
//! wrote thousands of RX buffer and used-ring pages under logging. Negative controls prove it
//! fails when the backend drops marks: brief logging gaps (in-process), and the
//! `test-drop-marks` build of the daemon program, whose lost pages are RX buffers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost_dirtylog::check::{
    self, default_layout, CheckOptions, Device, Fault, NetOptions, Report, Traffic, VmmStyle,
    EXIT_LOST, EXIT_OK, EXIT_USAGE,
};
use vhost_dirtylog::net::{NetConfig, NetDevice, Port, SocketPort};
use vhost_dirtylog::test_utils::{DaemonDir, DaemonProcess, InProcessDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-net");
const CHECKER: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-check");

/// Our daemon program with 2 queue pairs on a socket port in its scratch directory; it serves
/// one frontend after another (reconnects). Returns it and the port's path.
fn daemon(drop_marks: bool) -> (DaemonProcess, PathBuf) {
    let env = DaemonDir::new("check-net");
    let port = env.dir.path().join("port");
    let mut cmd = Command::new(DAEMON);
    cmd.arg("--socket-path")
        .arg(&env.sock)
        .arg("--socket-port")
        .arg(&port)
        .args(["--queues", "2"])
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null());
    if drop_marks {
        cmd.env("VHOST_DIRTYLOG_TEST_DROP_MARKS", "1");
    }
    (DaemonProcess::spawn(&mut cmd, env), port)
}

/// Small and short: two pairs, 24 MiB in 3 regions, 1.2 s, a moderate frame rate so the runs
/// stay meaningful on two shared cores.
fn opts(sock: &Path, port: &Path) -> CheckOptions {
    CheckOptions {
        device: Device::Net,
        net: NetOptions {
            traffic: Traffic::Socket(port.to_owned()),
            rate: 6000,
            ..NetOptions::default()
        },
        layout: default_layout(24 << 20, 3).unwrap(),
        queues: Some(2),
        queue_size: 128,
        duration: Duration::from_millis(1200),
        round_interval: Duration::from_millis(25),
        settle: Duration::from_millis(100),
        ..CheckOptions::new(sock)
    }
}

/// The assertions every run against our daemon must pass.
fn assert_clean(r: &Report, what: &str) {
    println!("{what}:\n{}", r.summary());
    assert_eq!(r.lost_pages, 0, "{what}: lost pages: {:?}", r.lost_samples);
    assert_eq!(r.data_errors, 0, "{what}: {:?}", r.samples);
    assert_eq!(
        r.stop.inflight_at_stop, 0,
        "{what}: the stop did not quiesce"
    );
    assert_eq!(r.stop.processed_after_stop, 0, "{what}");
    assert!(r.stop.error.is_none(), "{what}: {:?}", r.stop.error);
    assert_eq!(r.exit_code, EXIT_OK, "{what}: {}", r.verdict);
    let n = r.net.as_ref().expect("net figures");
    // Meaningful: many frames, some spread over several buffers, on both pairs; TX too; the
    // device wrote many pages under logging, over many rounds.
    assert_eq!(n.pairs, 2, "{what}");
    assert!(n.rx_frames >= 2000, "{what}: only {} frames", n.rx_frames);
    assert!(
        n.rx_merged >= 100,
        "{what}: only {} merged frames",
        n.rx_merged
    );
    assert!(
        n.tx_frames >= 1000,
        "{what}: only {} TX frames",
        n.tx_frames
    );
    assert!(n.tx_at_port > 0, "{what}: no TX frame left the port");
    assert!(
        r.device_pages_written >= 500,
        "{what}: the device wrote only {} distinct pages while logging",
        r.device_pages_written
    );
    assert!(r.vmm.pages_marked >= 500, "{what}: {:?}", r.vmm);
    assert!(r.vmm.rounds >= 5, "{what}: only {} rounds", r.vmm.rounds);
}

fn check_ok(faults: &[Fault], style: VmmStyle) -> Report {
    let (d, port) = daemon(false);
    let mut o = opts(&d.env.sock, &port);
    o.faults = faults.to_vec();
    o.vmm_style = style;
    let r = check::run(&o).unwrap_or_else(|e| panic!("{faults:?} {style}: {e}"));
    assert_eq!(r.fault_log.len(), faults.len(), "{:?}", r.fault_log);
    let what = format!("{faults:?}, {style} style");
    assert_clean(&r, &what);
    r
}

#[test]
fn net_check_no_fault() {
    for style in VmmStyle::ALL {
        let r = check_ok(&[], style);
        assert!(r.lost_samples.is_empty());
        assert!(r.backend.mergeable_rx);
    }
}

#[test]
fn net_check_log_resize() {
    for style in VmmStyle::ALL {
        check_ok(&[Fault::LogResize], style);
    }
}

#[test]
fn net_check_mem_table() {
    for style in VmmStyle::ALL {
        let r = check_ok(&[Fault::MemTable], style);
        assert!(r.backend.mem_slots, "our daemon supports ADD_MEM_REG");
    }
}

#[test]
fn net_check_log_toggle() {
    for style in VmmStyle::ALL {
        check_ok(&[Fault::LogToggle], style);
    }
}

#[test]
fn net_check_reconnect() {
    for style in VmmStyle::ALL {
        let r = check_ok(&[Fault::Reconnect], style);
        assert!(r.fault_log[0].detail.contains("reconnected"));
    }
}

#[test]
fn net_check_vring_addr_storm() {
    for style in VmmStyle::ALL {
        check_ok(&[Fault::VringAddr], style);
    }
}

#[test]
fn net_check_all_faults() {
    for style in VmmStyle::ALL {
        check_ok(&Fault::ALL, style);
    }
}

/// The program's drop-marks switch: with the `test-drop-marks` build the checker must report
/// lost RX buffer pages (exit 1); without it the variable is ignored and the run passes.
#[test]
fn net_check_catches_the_drop_marks_build() {
    let (d, port) = daemon(true);
    let r = check::run(&opts(&d.env.sock, &port)).unwrap();
    println!("{}", r.summary());
    if cfg!(feature = "test-drop-marks") {
        assert!(r.lost_pages > 0, "a daemon that marks nothing passed");
        assert!(r.lost_rx_buffer > 0, "no RX buffer page reported: {r:?}");
        assert!(r.lost_unmarked > 0);
        assert_eq!(r.vmm.pages_marked, 0);
        assert_eq!(r.exit_code, EXIT_LOST);
        assert!(r.verdict.starts_with("FAIL"));
        // The device worked: the failure is the log's, not the frames'.
        assert_eq!(r.data_errors, 0);
    } else {
        assert_clean(&r, "drop-marks variable without the feature");
    }
}

/// Our device served in-process (one frontend), two pairs on socket ports at `PORT`,
/// `PORT.1`: the directory (socket `dir.sock`, port base `dir/port`), the device and its
/// daemon.
struct InProcNet {
    dir: DaemonDir,
    port: PathBuf,
    dev: NetDevice,
    _daemon: InProcessDaemon<vhost_dirtylog::log::GuestDirtyBitmap>,
}

fn in_process_net() -> InProcNet {
    let dir = DaemonDir::new("check-net-inproc");
    let port = dir.dir.path().join("port");
    let mut ports: Vec<Arc<dyn Port>> = Vec::new();
    for p in 0..2 {
        let path = if p == 0 {
            port.clone()
        } else {
            PathBuf::from(format!("{}.{p}", port.display()))
        };
        ports.push(Arc::new(SocketPort::bind(&path, None).unwrap()));
    }
    let config = NetConfig {
        queue_pairs: 2,
        ..Default::default()
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = NetDevice::into_backend(config, ports, mem.clone()).unwrap();
    let dev = backend.inner().clone();
    let d2 = dev.clone();
    let daemon = InProcessDaemon::serve_with(backend, mem, &dir.sock, |d| d2.attach(d).unwrap());
    InProcNet {
        dir,
        port,
        dev,
        _daemon: daemon,
    }
}

/// In-process, so the test can switch logging off behind the frontend's back: it drops out
/// for 5 ms in every 50 ms; most frames are marked, some are not, and the checker notices.
#[test]
fn net_check_catches_brief_logging_gaps() {
    let d = in_process_net();
    let log = d.dev.dirty_log().clone();
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
    let r = check::run(&opts(&d.dir.sock, &d.port)).unwrap();
    stop.store(true, Ordering::Relaxed);
    let gaps = flicker.join().unwrap();
    println!("{gaps} gaps\n{}", r.summary());
    assert!(gaps > 5);
    assert!(r.vmm.pages_marked > 500, "logging mostly worked");
    assert!(r.lost_pages > 0, "lost marks in {gaps} gaps went unnoticed");
    assert_eq!(
        r.lost_pages,
        r.lost_rx_buffer + r.lost_rx_used_ring + r.lost_tx_used_ring + r.lost_other
    );
    assert_eq!(r.exit_code, EXIT_LOST);
}

/// A device that publishes a frame's buffers one by one (the used index after each, as
/// virtio-queue's `add_used` does) lets the guest see a frame before all its buffers: the
/// checker's guest must refuse it (a protocol error naming the frame), as Linux's
/// `receive_mergeable` drops such a frame.
#[test]
fn net_check_catches_buffers_published_one_by_one() {
    let d = in_process_net();
    d.dev.publish_each_buffer_for_tests(true);
    let mut o = opts(&d.dir.sock, &d.port);
    o.net.frame_min = 1200;
    let e = check::run(&o).unwrap_err();
    println!("{e}");
    assert!(e.to_string().contains("published with only"), "{e}");
    assert_eq!(e.exit_code(), check::EXIT_PROTOCOL);
}

/// The command line: `--device net --json` against the program, and usage errors.
#[test]
fn net_check_command_line() {
    let (d, port) = daemon(false);
    let out = Command::new(CHECKER)
        .args(["--device", "net", "--json", "--queues", "2", "--mem", "24M"])
        .args([
            "--duration",
            "500ms",
            "--rate",
            "4000",
            "--queue-size",
            "128",
        ])
        .arg("--traffic")
        .arg(format!("socket:{}", port.display()))
        .arg(&d.env.sock)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(EXIT_OK),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["device"], "net");
    assert_eq!(v["lost_pages"], 0);
    assert_eq!(v["lost_rx_buffer"], 0);
    assert!(v["net"]["rx_frames"].as_u64().unwrap() > 0, "{v}");
    // No traffic: the daemon makes none, so nothing arrives; the run still completes.
    let out = Command::new(CHECKER)
        .args(["--device", "net", "--traffic", "none", "--queues", "1"])
        .args(["--duration", "300ms", "--mem", "24M", "--queue-size", "128"])
        .arg(&d.env.sock)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(EXIT_OK),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for bad in [
        &["--traffic", "tap:"][..],
        &["--frame-size", "10..20"][..],
        &["--rx-buf-size", "30"][..],
    ] {
        let out = Command::new(CHECKER)
            .args(["--device", "net"])
            .args(bad)
            .arg(&d.env.sock)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{bad:?}");
    }
}

/// `--bench` for net: 64-byte and 1,500-byte frames, logging off and on, ratios printed.
#[test]
fn net_bench_reports_both_sizes() {
    let (d, port) = daemon(false);
    let o = opts(&d.env.sock, &port);
    let b = check::BenchOptions {
        phase: Duration::from_millis(40),
        phases: 8,
        warmup: Duration::from_millis(100),
        ..Default::default()
    };
    let r = check::bench_net(&o, &b).unwrap();
    println!("{}", r.summary());
    assert_eq!(r.pairs, 2);
    let sizes: Vec<u32> = r.sizes.iter().map(|z| z.frame).collect();
    assert_eq!(sizes, [64, 1500]);
    for z in &r.sizes {
        assert!(z.fps_off > 0.0 && z.fps_on > 0.0, "{z:?}");
        assert!((z.ratio - z.fps_on / z.fps_off).abs() < 1e-9);
        assert_eq!(z.phases.len(), 8);
        assert!(z.pages_marked > 0, "logging on marked nothing: {z:?}");
        assert!(z.rmws_per_frame.is_none());
    }
    // 1,500-byte frames do not fit one 1,024-byte buffer: all are merged; 64-byte ones none.
    assert!(r.sizes[1].merged_pct > 99.0, "{:?}", r.sizes[1]);
    assert!(r.sizes[0].merged_pct < 1.0);
    assert!(r.summary().contains("on/off"));
}

/// A network namespace made with `ip netns add`, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `--traffic tap:NAME@NETNS`: our daemon serves a multi-queue TAP in a namespace of its own
/// (no traffic leaves it); the checker injects through an AF_PACKET socket bound to the TAP.
/// Needs root, `/dev/net/tun` and `ip`; skipped with a loud message otherwise.
#[test]
fn net_check_through_a_tap_in_a_netns() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if !root || !Path::new("/dev/net/tun").exists() || !ip {
        eprintln!("SKIPPED net_check_through_a_tap_in_a_netns: needs root, /dev/net/tun and ip");
        return;
    }
    let ns = Netns(format!("vdlchk{}", std::process::id()));
    let ok = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED net_check_through_a_tap_in_a_netns: `ip netns add` failed");
        return;
    }
    let env = DaemonDir::new("check-net-tap");
    let mut cmd = Command::new("ip");
    // Default sandbox: the TAP ioctls made per frontend (header size, offloads) are allowed.
    cmd.args([
        "netns", "exec", &ns.0, DAEMON, "--tap", "vdlchk0", "--queues", "2",
    ])
    .args(["--socket-path"])
    .arg(&env.sock)
    .env("RUST_LOG", "error")
    .stdin(std::process::Stdio::null());
    let d = DaemonProcess::spawn(&mut cmd, env);
    for (faults, style) in [(&[][..], VmmStyle::Qemu), (&Fault::ALL[..], VmmStyle::Ch)] {
        let mut o = opts(&d.env.sock, Path::new("/unused"));
        o.net.traffic = Traffic::Tap {
            name: "vdlchk0".into(),
            netns: Some(ns.0.clone()),
        };
        o.faults = faults.to_vec();
        o.vmm_style = style;
        let r = check::run(&o).unwrap_or_else(|e| panic!("{faults:?} {style}: {e}"));
        assert_clean(&r, &format!("TAP, {faults:?}, {style} style"));
        assert_eq!(
            r.net.as_ref().unwrap().traffic,
            format!("tap:vdlchk0@{}", ns.0)
        );
    }
}
