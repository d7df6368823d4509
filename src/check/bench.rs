//! `--bench`: what dirty logging costs the backend's dataplane.
//!
//! blk ([`bench`]) measures IOPS; net ([`bench_net`]) frames per second delivered into the
//! guest's RX rings, 64-byte and 1,500-byte frames injected as fast as the backend's port takes
//! them. Both use the same alternating phases:
//!
//! Fixed-depth 4 KiB random reads into page-aligned buffers (the case where a per-request mark
//! weighs most against the data copy), with the log attached throughout and `LOG_ALL`
//! switched off and on in short alternating phases. The disk span is written first (when the
//! device is writable), so every read hits the same warm page cache. Phases are short (50 ms)
//! and run in groups of four, off, on, on, off, so drift and bursts of outside load (CPU
//! frequency, other processes on a shared machine) affect both sides of a group about equally.
//! The report gives the totals of all "off" and all "on" phases and, more robust against
//! outside load, the median of the per-group overheads. During "on" phases the VMM thread syncs
//! the log every round interval, as it would while migrating, so the backend also pays for
//! marking bits that were just cleared.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{vmm_err, CheckError};
use super::options::{CheckOptions, Traffic, Workload};
use super::plan::slot_size;
use super::pool::Workers;
use super::rig::Rig;
use crate::vmm::{MigrationBitmap, SharedLog};

/// A running total of the atomic read-modify-write operations a backend issued on its dirty
/// log (e.g. the sum of its workers' batch counters), for a benchmark run against a backend
/// in the same process; the checker cannot see it over the socket.
#[derive(Clone)]
pub struct RmwCounter(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for RmwCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RmwCounter")
    }
}

/// Settings of a benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Length of one phase.
    pub phase: Duration,
    /// Number of phases (rounded up to a multiple of 4: off, on, on, off).
    pub phases: u32,
    /// Warm-up before the first phase.
    pub warmup: Duration,
    /// net: the backend's log RMW counter, if it is in this process: the report then gives
    /// atomic RMWs per frame with logging on ([`NetBenchSize::rmws_per_frame`]).
    pub rmws: Option<RmwCounter>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            phase: Duration::from_millis(50),
            phases: 200,
            warmup: Duration::from_secs(1),
            rmws: None,
        }
    }
}

/// One measured phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchPhase {
    /// `LOG_ALL` was on.
    pub logging: bool,
    /// Requests per second.
    pub iops: f64,
}

/// The benchmark result (the `--bench --json` output).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// The socket.
    pub socket: String,
    /// Queues driven.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Request size in bytes.
    pub io_size: u64,
    /// IOPS with logging off (all "off" phases).
    pub iops_off: f64,
    /// IOPS with logging on (all "on" phases).
    pub iops_on: f64,
    /// MiB/s with logging off.
    pub mib_s_off: f64,
    /// MiB/s with logging on.
    pub mib_s_on: f64,
    /// `(off - on) / off` in percent over all phases (negative: faster with logging on, i.e.
    /// noise).
    pub overhead_pct: f64,
    /// Median over the off/on/on/off groups of each group's overhead, in percent.
    pub overhead_median_pct: f64,
    /// Pages the log reported during the "on" phases.
    pub pages_marked: u64,
    /// Every phase.
    pub phases: Vec<BenchPhase>,
}

impl BenchReport {
    /// A short summary for people.
    pub fn summary(&self) -> String {
        format!(
            "vhost-dirtylog-check --bench: {}\n  4 KiB random reads, {} queue(s) x {} in flight, {} alternating phases\n  logging off: {:>10.0} IOPS {:>8.1} MiB/s\n  logging on:  {:>10.0} IOPS {:>8.1} MiB/s  ({} pages marked)\n  overhead:    {:+.2}% (all phases), {:+.2}% (median of {} off/on/on/off groups)",
            self.socket,
            self.queues,
            self.depth,
            self.phases.len(),
            self.iops_off,
            self.mib_s_off,
            self.iops_on,
            self.mib_s_on,
            self.pages_marked,
            self.overhead_pct,
            self.overhead_median_pct,
            self.phases.len() / 4
        )
    }
}

/// Measures IOPS and bandwidth with logging off and on (see the module docs). `opts` supplies
/// the socket, memory layout, queues, depth, seed and timeout; the workload is fixed.
pub fn bench(opts: &CheckOptions, b: &BenchOptions) -> Result<BenchReport, CheckError> {
    let mut o = opts.clone();
    o.workload = Workload::Read;
    o.min_io = 4096;
    o.max_io = 4096;
    o.faults.clear();
    let mut s = Rig::new(&o, slot_size(4096))?;
    // One segment per request, page aligned.
    s.max_segs = 1;
    s.max_req = 4096;
    if o.prepare.unwrap_or(!s.backend.read_only) {
        s.prepare(&o)?;
    }
    s.depth = usize::from(o.depth)
        .min(usize::from(o.queue_size) / 3)
        .max(1);
    let log = SharedLog::new(s.shared.ram.gpa_end()).map_err(vmm_err)?;
    let bitmap = MigrationBitmap::new(log.guest_pages()).map_err(vmm_err)?;
    {
        let mut g = s.shared.conn();
        let region = log.dirty_log_region();
        g.with(|c| c.set_log_base(region))?;
    }
    let queues = s.queues.len() as u16;
    let depth = s.depth as u16;
    let mut workers = Workers::spawn(&mut s, &o, 4096, false, false)?;
    let res = (|| -> Result<BenchReport, CheckError> {
        std::thread::sleep(b.warmup);
        let m = measure(&s, &workers, &log, &bitmap, b, o.round_interval, |w| {
            w.sum(|s| &s.completed)
        })?;
        let (phases, overhead_median_pct, marked) = (m.phases, m.median_pct, m.marked);
        let (t_off, t_on, n_off, n_on) = (m.t_off, m.t_on, m.n_off, m.n_on);
        let iops_off = n_off as f64 / t_off.max(1e-9);
        let iops_on = n_on as f64 / t_on.max(1e-9);
        let mib = |iops: f64| iops * 4096.0 / f64::from(1 << 20);
        Ok(BenchReport {
            socket: o.socket.display().to_string(),
            queues,
            depth,
            io_size: 4096,
            iops_off,
            iops_on,
            mib_s_off: mib(iops_off),
            mib_s_on: mib(iops_on),
            overhead_pct: if iops_off > 0.0 {
                (iops_off - iops_on) / iops_off * 100.0
            } else {
                0.0
            },
            overhead_median_pct,
            pages_marked: marked,
            phases,
        })
    })();
    let fin = workers.finish();
    let report = res?;
    fin?;
    Ok(report)
}

/// What the alternating phases measured.
struct Measured {
    phases: Vec<BenchPhase>,
    t_off: f64,
    t_on: f64,
    n_off: u64,
    n_on: u64,
    marked: u64,
    median_pct: f64,
    /// RMWs counted by [`BenchOptions::rmws`] during the "on" phases.
    rmws_on: Option<u64>,
}

/// Runs `b.phases` (a multiple of 4) phases off, on, on, off, ... of `LOG_ALL`, counting with
/// `count` (a running total) and syncing `log` into `bitmap` every `interval` while on.
fn measure(
    s: &Rig,
    workers: &Workers,
    log: &SharedLog,
    bitmap: &MigrationBitmap,
    b: &BenchOptions,
    interval: Duration,
    count: impl Fn(&Workers) -> u64,
) -> Result<Measured, CheckError> {
    let n = b.phases.max(1).next_multiple_of(4);
    let mut phases = Vec::new();
    let (mut t_off, mut t_on, mut n_off, mut n_on) = (0f64, 0f64, 0u64, 0u64);
    let mut marked = 0;
    let rmw = |b: &BenchOptions| b.rmws.as_ref().map(|r| (r.0)());
    let mut rmws_on = b.rmws.as_ref().map(|_| 0);
    for i in 0..n {
        let on = matches!(i % 4, 1 | 2);
        s.shared.conn().with(|c| c.set_log_all(on))?;
        s.shared.check_abort()?;
        let r0 = rmw(b);
        let c0 = count(workers);
        let t0 = Instant::now();
        let end = t0 + b.phase;
        while Instant::now() < end {
            let left = end.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(interval));
            if on {
                marked += bitmap.sync_from_log(log, 0);
                bitmap.clear_range(0, u64::MAX);
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        let dn = count(workers) - c0;
        if on {
            t_on += dt;
            n_on += dn;
            if let (Some(t), Some(a), Some(z)) = (&mut rmws_on, r0, rmw(b)) {
                *t += z.saturating_sub(a);
            }
        } else {
            t_off += dt;
            n_off += dn;
        }
        phases.push(BenchPhase {
            logging: on,
            iops: dn as f64 / dt,
        });
    }
    s.shared.conn().with(|c| c.set_log_all(false))?;
    let mut groups: Vec<f64> = phases
        .chunks(4)
        .map(|g| {
            let off: f64 = g.iter().filter(|p| !p.logging).map(|p| p.iops).sum();
            let on: f64 = g.iter().filter(|p| p.logging).map(|p| p.iops).sum();
            if off > 0.0 {
                (off - on) / off * 100.0
            } else {
                0.0
            }
        })
        .collect();
    groups.sort_by(f64::total_cmp);
    let median_pct = match groups.len() {
        0 => 0.0,
        n if n % 2 == 1 => groups[n / 2],
        n => (groups[n / 2 - 1] + groups[n / 2]) / 2.0,
    };
    Ok(Measured {
        phases,
        t_off,
        t_on,
        n_off,
        n_on,
        marked,
        median_pct,
        rmws_on,
    })
}

/// One frame size of the net benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetBenchSize {
    /// Frame size in bytes (0: whatever the backend generates, `--traffic none`).
    pub frame: u32,
    /// Frames per second into the guest's RX rings with logging off (all "off" phases).
    pub fps_off: f64,
    /// Frames per second with logging on (all "on" phases).
    pub fps_on: f64,
    /// `fps_on / fps_off` (1.0: logging costs nothing).
    pub ratio: f64,
    /// `(off - on) / off` in percent over all phases.
    pub overhead_pct: f64,
    /// Median over the off/on/on/off groups of each group's overhead, in percent.
    pub overhead_median_pct: f64,
    /// Frames spread over more than one RX buffer, in percent of all received.
    pub merged_pct: f64,
    /// Injections refused by a full port (the backend or the guest was the bottleneck).
    pub port_full: u64,
    /// Pages the log reported during the "on" phases.
    pub pages_marked: u64,
    /// Atomic RMWs on the log per received frame during the "on" phases, if the backend's
    /// counter was given ([`BenchOptions::rmws`]).
    pub rmws_per_frame: Option<f64>,
    /// Every phase (`iops` is frames per second).
    pub phases: Vec<BenchPhase>,
}

/// The net benchmark's result (`--device net --bench`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetBenchReport {
    /// The socket.
    pub socket: String,
    /// Queue pairs driven.
    pub pairs: u16,
    /// Bytes per RX buffer.
    pub rx_buf: u32,
    /// The traffic source.
    pub traffic: String,
    /// One entry per frame size.
    pub sizes: Vec<NetBenchSize>,
}

impl NetBenchReport {
    /// A short summary for people.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "vhost-dirtylog-check --device net --bench: {}\n  {} queue pair(s), RX buffers of {} bytes, traffic {}, no TX; alternating LOG_ALL off/on phases",
            self.socket, self.pairs, self.rx_buf, self.traffic
        );
        for z in &self.sizes {
            let frame = if z.frame == 0 {
                "backend's frames".to_string()
            } else {
                format!("{} B frames", z.frame)
            };
            out.push_str(&format!(
                "\n  {frame:>16}: off {:>10.0} frames/s, on {:>10.0} frames/s, on/off {:.3} ({:+.2}% overhead, median {:+.2}% of {} groups); {:.0}% merged, {} pages marked, port full {} times{}",
                z.fps_off,
                z.fps_on,
                z.ratio,
                z.overhead_pct,
                z.overhead_median_pct,
                z.phases.len() / 4,
                z.merged_pct,
                z.pages_marked,
                z.port_full,
                z.rmws_per_frame
                    .map_or(String::new(), |r| format!("; {r:.3} atomic RMWs per frame (on)"))
            ));
        }
        out
    }
}

/// Measures frames per second delivered into the guest's RX rings with logging off and on,
/// for 64-byte and 1,500-byte frames (or the one size `--frame-size N` names), injected as
/// fast as the port takes them; the guest sends no TX frames. With `--traffic none` the
/// backend's own traffic is measured once.
pub fn bench_net(opts: &CheckOptions, b: &BenchOptions) -> Result<NetBenchReport, CheckError> {
    let sizes: Vec<u32> = match opts.net.traffic {
        Traffic::None => vec![0],
        _ if opts.net.frame_min == opts.net.frame_max => vec![opts.net.frame_min],
        _ => vec![64, 1500],
    };
    let mut out = NetBenchReport {
        socket: opts.socket.display().to_string(),
        pairs: 0,
        rx_buf: 0,
        traffic: opts.net.traffic.to_string(),
        sizes: Vec::new(),
    };
    for frame in sizes {
        let mut o = opts.clone();
        o.faults.clear();
        o.net.rate = 0;
        o.net.tx = false;
        if frame > 0 {
            o.net.frame_min = frame;
            o.net.frame_max = frame;
        }
        let mut s = Rig::new(&o, 0)?;
        out.pairs = s.pairs;
        out.rx_buf = s.rx_buf;
        let log = SharedLog::new(s.shared.ram.gpa_end()).map_err(vmm_err)?;
        let bitmap = MigrationBitmap::new(log.guest_pages()).map_err(vmm_err)?;
        {
            let region = log.dirty_log_region();
            s.shared.conn().with(|c| c.set_log_base(region))?;
        }
        let mut workers = Workers::spawn(&mut s, &o, 8, false, false)?;
        let rx = |i: usize| i.is_multiple_of(2);
        let res = (|| -> Result<NetBenchSize, CheckError> {
            std::thread::sleep(b.warmup);
            let m0 = workers.sum_where(rx, |s| &s.rx_merged);
            let f0 = workers.sum_where(rx, |s| &s.rx_frames);
            let m = measure(&s, &workers, &log, &bitmap, b, o.round_interval, |w| {
                w.sum_where(rx, |s| &s.rx_frames)
            })?;
            let merged = workers.sum_where(rx, |s| &s.rx_merged) - m0;
            let frames = workers.sum_where(rx, |s| &s.rx_frames) - f0;
            let fps_off = m.n_off as f64 / m.t_off.max(1e-9);
            let fps_on = m.n_on as f64 / m.t_on.max(1e-9);
            Ok(NetBenchSize {
                frame,
                fps_off,
                fps_on,
                ratio: if fps_off > 0.0 { fps_on / fps_off } else { 0.0 },
                overhead_pct: if fps_off > 0.0 {
                    (fps_off - fps_on) / fps_off * 100.0
                } else {
                    0.0
                },
                overhead_median_pct: m.median_pct,
                merged_pct: merged as f64 * 100.0 / frames.max(1) as f64,
                port_full: workers.injectors().map_or(0, |j| j.sum(|p| &p.full)),
                pages_marked: m.marked,
                rmws_per_frame: m.rmws_on.map(|r| r as f64 / m.n_on.max(1) as f64),
                phases: m.phases,
            })
        })();
        let fin = workers.finish();
        out.sizes.push(res?);
        fin?;
    }
    Ok(out)
}
