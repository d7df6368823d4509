//! RX throughput of the vhost-user-net device through its socket port and through a TAP (in a
//! network namespace of its own; skipped without root), logging off vs on, with
//! plain and with batched marks (issue 15): frames per second into the guest's RX ring, the
//! device worker's CPU time per frame, and the atomic read-modify-writes on the log per frame.
//!
//! The device runs in this process (`test_utils::net`), served on a real vhost-user socket; an
//! injector thread floods its socket port with frames of one size; the in-process guest driver
//! takes them from the RX ring and reposts the buffers. On a 2-core machine the injector and the
//! driver share the cores with the device, so frames/s is bounded by them as much as by the
//! device: the device worker's own CPU time per frame (`/proc/self/task/*/schedstat` of the
//! `vring_worker` thread, in ns) is the figure that shows what logging costs the device.
//! Modes take turns within every repetition; medians and ranges are printed, and the ratios
//! are from the same run.
//!
//! `cargo bench --bench net` (`NET_BENCH_SECS`, default 1 s per run; `NET_BENCH_REPS`, default 5).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::Write;

use vhost_dirtylog::net::{NetConfig, Port};
use vhost_dirtylog::test_utils::net::{
    frame, in_process_on, in_process_with, tap_in_netns, Guest, InProc, T,
};

/// Total on-CPU time, in ns, of this process's `vring_worker` threads (vhost-user-backend's
/// name for the device workers).
fn worker_cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vring_worker")
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    Plain,
    Batched,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "logging off",
            Mode::Plain => "on, plain marks",
            Mode::Batched => "on, batched marks",
        }
    }
}

struct Sample {
    fps: f64,
    cpu_ns: f64,
    rmws: Option<f64>,
    frames_per_burst: f64,
}

/// The device's port: its unix datagram socket port, or a TAP in a namespace of its own.
#[derive(Clone, Copy, PartialEq)]
enum PortKind {
    Socket,
    Tap,
}

/// Starts the device on `kind` of port and an injector thread flooding it with `len`-byte
/// frames until `stop`.
fn start(
    kind: PortKind,
    config: NetConfig,
    len: usize,
    stop: &Arc<AtomicBool>,
) -> (InProc, std::thread::JoinHandle<()>) {
    let s2 = stop.clone();
    let f = frame(len, 1);
    match kind {
        PortKind::Socket => {
            let d = in_process_with(config);
            let sock = d.wires[0].sock.try_clone().expect("socket");
            let to = d.wires[0].port.clone();
            let inj = std::thread::spawn(move || {
                sock.set_write_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                while !s2.load(Ordering::Relaxed) {
                    let _ = sock.send_to(&f, &to);
                }
            });
            (d, inj)
        }
        PortKind::Tap => {
            let (tap, mut wire) = tap_in_netns("vdlbench0").expect("TAP");
            let ports: Vec<Arc<dyn Port>> = vec![Arc::new(tap)];
            let d = in_process_on(config, ports);
            let inj = std::thread::spawn(move || {
                while !s2.load(Ordering::Relaxed) {
                    let _ = wire.write(&f);
                }
            });
            (d, inj)
        }
    }
}

fn run(kind: PortKind, len: usize, mode: Mode, secs: f64) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let config = NetConfig {
        batch_marks: mode == Mode::Batched,
        ..Default::default()
    };
    let (d, injector) = start(kind, config, len, &stop);
    let (mut g, _log) = Guest::new(d.daemon.connect(), 1, mode != Mode::Off);
    recv(&mut g, 2000);
    let s0 = d.dev.pair_stats(0).expect("pair 0");
    let c0 = worker_cpu_ns();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        recv(&mut g, 256);
    }
    let dt = t0.elapsed().as_secs_f64();
    let c1 = worker_cpu_ns();
    let s1 = d.dev.pair_stats(0).expect("pair 0");
    stop.store(true, Ordering::Relaxed);
    injector.join().expect("injector");
    let frames = (s1.rx_frames - s0.rx_frames).max(1) as f64;
    Sample {
        fps: frames / dt,
        cpu_ns: c1.saturating_sub(c0) as f64 / frames,
        rmws: (mode == Mode::Batched).then(|| (s1.log_rmws - s0.log_rmws) as f64 / frames),
        frames_per_burst: frames / (s1.rx_bursts - s0.rx_bursts).max(1) as f64,
    }
}

fn recv(g: &mut Guest, n: usize) {
    for _ in 0..n {
        g.rx[0].recv(T).expect("a frame");
    }
}

fn env(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; nothing to list here.
    }
    let secs = env("NET_BENCH_SECS", 1.0);
    let reps = env("NET_BENCH_REPS", 5.0).max(1.0) as usize;
    let mut kinds = vec![(PortKind::Socket, "the socket port")];
    match tap_in_netns("vdlbench0") {
        Ok(_) => kinds.push((PortKind::Tap, "a TAP (own network namespace)")),
        Err(e) => println!("-- TAP runs skipped: they need root and /dev/net/tun ({e}) --"),
    }
    for (kind, what) in kinds {
        bench_port(kind, what, secs, reps);
    }
    println!(
        "   targets (issue 15): batched, 64 B: frames/s on/off >= 0.95; log RMWs per frame < 1"
    );
}

fn bench_port(kind: PortKind, what: &str, secs: f64, reps: usize) {
    let modes = [Mode::Off, Mode::Plain, Mode::Batched];
    println!(
        "== net RX through {what}: 1 queue pair, {secs} s per run, medians of {reps} [min..max] =="
    );
    for len in [64usize, 1500] {
        let mut fps: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let mut rmw = Vec::new();
        let mut fpb = Vec::new();
        for _ in 0..reps {
            for (i, &m) in modes.iter().enumerate() {
                let s = run(kind, len, m, secs);
                fps[i].push(s.fps);
                cpu[i].push(s.cpu_ns);
                rmw.extend(s.rmws);
                fpb.push(s.frames_per_burst);
            }
        }
        let range = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            format!("[{lo:.0}..{hi:.0}]")
        };
        let mut med_fps = [0.0; 3];
        let mut med_cpu = [0.0; 3];
        for (i, m) in modes.iter().enumerate() {
            let r_fps = range(&fps[i]);
            let r_cpu = range(&cpu[i]);
            med_fps[i] = median(&mut fps[i]);
            med_cpu[i] = median(&mut cpu[i]);
            println!(
                "  {len:>5} B, {:<18} {:>9.0} frames/s {r_fps:<20} device {:>6.0} ns/frame {r_cpu}",
                m.name(),
                med_fps[i],
                med_cpu[i],
            );
        }
        let rmws = median(&mut rmw);
        println!(
            "  {len:>5} B: frames/s on/off: batched {:.3}, plain {:.3} | device ns/frame on/off: batched {:.3}, plain {:.3} | log RMWs per frame, batched: {rmws:.3} (plain: at least 2, one per write; benches/mark.rs rx-burst) | {:.1} frames per burst",
            med_fps[2] / med_fps[0],
            med_fps[1] / med_fps[0],
            med_cpu[2] / med_cpu[0],
            med_cpu[1] / med_cpu[0],
            median(&mut fpb),
        );
    }
}
