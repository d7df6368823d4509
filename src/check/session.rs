//! The migration session: the VMM thread's side of a check run. It sets up the rig, starts
//! the workers, hands over the log and turns `LOG_ALL` on, runs the pre-copy rounds with the
//! faults the [`Schedule`] makes due, stops every ring, and turns the comparison into a
//! [`Report`].

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dest::{Logs, SendLog, Vmm};
use super::error::{vmm_err, CheckError};
use super::fault::{Schedule, Target};
use super::options::{CheckOptions, Device, Fault, SyncMode, VmmStyle};
use super::plan::{slot_size, MemPlan};
use super::pool::{recv, Workers};
use super::report::{BackendInfo, FaultRecord, NetStats, Report, StopStats};
use super::rig::{Rig, Shared};
use super::traffic::PortStats;
use super::worker::Cmd;
use crate::vmm::{LogFlip, SharedLog};

/// Runs the check described by `opts` against the backend and returns its report.
///
/// `Err` means no verdict could be reached (the backend cannot log, broke the protocol,
/// stalled); a completed run with lost pages is an `Ok` report whose
/// [`exit_code`](Report::exit_code) is [`EXIT_LOST`](super::EXIT_LOST).
pub fn run(opts: &CheckOptions) -> Result<Report, CheckError> {
    let slot = slot_size(opts.max_io);
    let mut s = Rig::new(opts, slot)?;
    if opts.device == Device::Blk && opts.prepare.unwrap_or(!s.backend.read_only) {
        s.prepare(opts)?;
    }
    let gpa_end = s.shared.ram.gpa_end();
    let logs = match opts.sync_mode() {
        SyncMode::Swap => Logs::Swap(SharedLog::new(gpa_end).map_err(vmm_err)?),
        SyncMode::Flip => {
            let shared = s.shared.clone();
            let send: SendLog = Box::new(move |region| {
                shared.call("SET_LOG_BASE (log flip)", |c| c.set_log_base(region))
            });
            Logs::Flip {
                logs: LogFlip::new(gpa_end).map_err(vmm_err)?,
                send,
            }
        }
    };
    let vmm = Vmm::new(
        s.shared.ram.clone(),
        logs,
        s.kvm.clone(),
        opts.deferred,
        opts.clear_chunk,
    )?;
    let workers = Workers::spawn(&mut s, opts, 512, true, true)?;
    let mut r = Run {
        opts,
        shared: s.shared.clone(),
        plan: s.plan.clone(),
        backend: s.backend.clone(),
        depth: s.depth,
        rx_buf: s.rx_buf,
        vmm,
        workers,
        fault_log: Vec::new(),
        start: Instant::now(),
        round: 0,
        progress: opts.progress && std::io::stderr().is_terminal(),
        storm: None,
    };
    let res = r.migrate();
    if res.is_err() {
        r.shared.logging.store(false, Ordering::Relaxed);
        // The workers' own error, if one failed, explains more than ours.
        r.workers.finish()?;
    }
    res
}
/// The state of a running check (the VMM thread's).
struct Run<'a> {
    opts: &'a CheckOptions,
    shared: Arc<Shared>,
    plan: MemPlan,
    backend: BackendInfo,
    depth: usize,
    /// net: bytes per RX buffer.
    rx_buf: u32,
    vmm: Vmm,
    workers: Workers,
    fault_log: Vec<FaultRecord>,
    start: Instant,
    round: u64,
    progress: bool,
    /// A `SET_VRING_ADDR` storm is on: (index of its fault record, bursts, messages).
    storm: Option<(usize, u64, u64)>,
}

impl Run<'_> {
    /// `SET_LOG_BASE`, `LOG_ALL` on, and the ring addresses again with the log flag (QEMU's
    /// order when a migration starts).
    fn start_logging(&mut self) -> Result<(), CheckError> {
        let region = self.vmm.log().dirty_log_region();
        self.shared
            .call("SET_LOG_BASE", |c| c.set_log_base(region))?;
        self.shared.set_log_all(&self.plan.queues, true)?;
        self.shared.logging.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn migrate(&mut self) -> Result<Report, CheckError> {
        // Let the workload run before the migration starts, as a guest's would.
        std::thread::sleep(Duration::from_millis(50));
        self.shared.check_abort()?;
        let completed_before = self.workers.sum(|s| &s.completed);
        let bytes_before = self.workers.sum(|s| &s.bytes);
        let reads_before = self.workers.sum(|s| &s.reads);
        let rx_before = self.net_counters();
        let writes_before = self.workers.sum(|s| &s.writes);
        self.start = Instant::now();
        self.start_logging()?;
        self.vmm.first_round()?;
        let mut schedule = Schedule::new(&self.opts.faults, self.opts.rounds, self.opts.duration);
        loop {
            self.round += 1;
            let next = self.start + self.opts.round_interval * self.round as u32;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            self.shared.check_abort()?;
            self.vmm.round()?;
            if let Some((_, bursts, msgs)) = &mut self.storm {
                let queues = &self.plan.queues[..self.workers.len()];
                *msgs += self
                    .shared
                    .vring_addr_storm(queues, self.opts.storm_burst)?;
                *bursts += 1;
            }
            let elapsed = self.start.elapsed();
            while let Some(f) = schedule.due(self.round, elapsed) {
                let at_s = elapsed.as_secs_f64();
                let detail = Target {
                    opts: self.opts,
                    shared: &self.shared,
                    plan: &self.plan,
                    backend: &self.backend,
                    vmm: &mut self.vmm,
                    workers: &self.workers,
                }
                .inject(f)?;
                if f == Fault::VringAddr && self.storm.is_none() {
                    let msgs = (self.workers.len() as u64) * u64::from(self.opts.storm_burst);
                    self.storm = Some((self.fault_log.len(), 1, msgs));
                }
                self.fault_log.push(FaultRecord {
                    fault: f,
                    at_s,
                    round: self.round,
                    detail,
                });
            }
            self.show_progress();
            let done = match self.opts.rounds {
                Some(n) => self.round >= n,
                None => self.start.elapsed() >= self.opts.duration,
            };
            if done && schedule.finished() {
                break;
            }
        }
        let stop = match self.opts.vmm_style {
            VmmStyle::Qemu => self.final_stop()?,
            VmmStyle::Ch => self.final_stop_ch()?,
        };
        if let Some((at, bursts, msgs)) = self.storm {
            if let Some(r) = self.fault_log.get_mut(at) {
                r.detail = format!(
                    "{}; {msgs} SET_VRING_ADDR in {bursts} burst(s) until the final stop",
                    r.detail
                );
            }
        }
        let elapsed = self.start.elapsed().as_secs_f64() - self.opts.settle.as_secs_f64();
        if self.progress {
            eprint!("\r\x1b[K");
        }
        self.vmm.stats.rounds = self.vmm.stats.rounds.max(1);
        let finals = self.workers.finish()?;
        self.vmm.final_guest_sync()?;
        let lost = self.vmm.compare();
        let requests = self.workers.sum(|s| &s.completed) - completed_before;
        let bytes = self.workers.sum(|s| &s.bytes) - bytes_before;
        let elapsed = elapsed.max(1e-3);
        let net = self.net_stats(&rx_before, elapsed);
        let mut report = Report {
            device: self.opts.device,
            backend: self.backend.clone(),
            layout: self.plan.regions.iter().map(|r| (r.gpa, r.size)).collect(),
            queues: self.workers.len() as u16,
            queue_size: self.opts.queue_size,
            depth: self.depth as u16,
            workload: self.opts.workload,
            vmm_style: self.opts.vmm_style,
            sync: self.opts.sync_mode(),
            faults: self.opts.faults.clone(),
            deferred: self.opts.deferred,
            seed: self.opts.seed,
            elapsed_s: elapsed,
            requests,
            reads: self.workers.sum(|s| &s.reads) - reads_before,
            writes: self.workers.sum(|s| &s.writes) - writes_before,
            bytes,
            iops: requests as f64 / elapsed,
            mib_s: bytes as f64 / elapsed / f64::from(1 << 20),
            io_errors: self.workers.sum(|s| &s.io_errors),
            data_errors: self.workers.sum(|s| &s.data_errors),
            device_pages_written: self.shared.written.count_dirty(),
            device_page_writes: self.workers.sum(|s| &s.device_page_writes),
            ram_pages: self.vmm.ram_pages(),
            vmm: self.vmm.stats.clone(),
            log_bytes: self.vmm.log().size(),
            lost_pages: 0,
            lost_unmarked: 0,
            lost_late: 0,
            lost_data: 0,
            lost_status: 0,
            lost_used_ring: 0,
            lost_rx_buffer: 0,
            lost_rx_used_ring: 0,
            lost_tx_used_ring: 0,
            lost_other: 0,
            net,
            lost_samples: Vec::new(),
            stop,
            fault_log: std::mem::take(&mut self.fault_log),
            samples: finals.into_iter().flat_map(|f| f.samples).collect(),
            verdict: String::new(),
            exit_code: 0,
        };
        let written = &self.shared.written;
        let (plan, vmm) = (&self.plan, &self.vmm);
        let data = match self.opts.device {
            Device::Blk => "data",
            Device::Net => "rx-buffer",
        };
        report.tally_lost(&lost, |p| {
            let kind = plan
                .page_kind(p)
                .unwrap_or(if written.test(p) { data } else { "other" });
            (kind, vmm.log_has(p))
        });
        report.conclude();
        Ok(report)
    }

    /// The net counters summed over the RX rings (even indices) and TX rings: `[rx frames,
    /// rx bytes, rx buffers, merged, gaps, tx frames, foreign]`.
    fn net_counters(&self) -> [u64; 7] {
        let w = &self.workers;
        let rx = |i: usize| i.is_multiple_of(2);
        [
            w.sum_where(rx, |s| &s.rx_frames),
            w.sum_where(rx, |s| &s.rx_bytes),
            w.sum_where(rx, |s| &s.rx_buffers),
            w.sum_where(rx, |s| &s.rx_merged),
            w.sum_where(rx, |s| &s.rx_seq_gaps),
            w.sum_where(|i| i % 2 == 1, |s| &s.tx_frames),
            w.sum_where(rx, |s| &s.rx_foreign),
        ]
    }

    /// The net figures of the run (`None` for blk): counters since `before`, over `elapsed`
    /// seconds.
    fn net_stats(&self, before: &[u64; 7], elapsed: f64) -> Option<NetStats> {
        if self.opts.device != Device::Net {
            return None;
        }
        let now = self.net_counters();
        let d: Vec<u64> = now.iter().zip(before).map(|(a, b)| a - b).collect();
        let j = self.workers.injectors();
        let port = |f: fn(&PortStats) -> &std::sync::atomic::AtomicU64| j.map_or(0, |j| j.sum(f));
        Some(NetStats {
            pairs: (self.workers.len() / 2) as u16,
            traffic: self.opts.net.traffic.to_string(),
            rx_buf: self.rx_buf,
            rx_frames: d[0],
            rx_bytes: d[1],
            rx_buffers: d[2],
            rx_merged: d[3],
            rx_seq_gaps: d[4],
            rx_fps: d[0] as f64 / elapsed,
            tx_frames: d[5],
            rx_foreign: d[6],
            injected: port(|p| &p.sent),
            port_full: port(|p| &p.full),
            tx_at_port: port(|p| &p.tx_seen),
            tx_bad_at_port: port(|p| &p.tx_bad),
        })
    }

    fn show_progress(&self) {
        if !self.progress {
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        let total = match self.opts.rounds {
            Some(n) => format!("round {}/{n}", self.round),
            None => format!(
                "{t:.1}/{:.1} s, round {}",
                self.opts.duration.as_secs_f64(),
                self.round
            ),
        };
        let req = self.workers.sum(|s| &s.completed);
        let bytes = self.workers.sum(|s| &s.bytes);
        eprint!(
            "\r\x1b[K  migrating: {total} | {req} requests, {:.0} MiB | {} pages marked, {} copied",
            bytes as f64 / f64::from(1 << 20),
            self.vmm.stats.pages_marked,
            self.vmm.stats.pages_copied
        );
    }

    /// `GET_VRING_BASE` on every ring, the last sync and copy, then a settle time.
    ///
    /// A backend that fails here (drops the connection after the first ring stopped, say)
    /// does not end the run: the rings it did stop are accounted for, the error is recorded,
    /// and the comparison still shows what its late writes did to guest memory.
    fn final_stop(&mut self) -> Result<StopStats, CheckError> {
        let mut st = StopStats {
            message: "GET_VRING_BASE".into(),
            ..StopStats::default()
        };
        let mut stops = Vec::new();
        let mut replies = Vec::new();
        for i in 0..self.workers.len() {
            match self.shared.call("GET_VRING_BASE", |c| c.stop_queue(i)) {
                Ok(base) => {
                    let used = self.shared.used_idx(&self.plan.queues[i])?;
                    stops.push(Some((base, used)));
                }
                Err(e) => {
                    st.error.get_or_insert_with(|| format!("queue {i}: {e}"));
                    stops.push(None);
                }
            }
            let (tx, rx) = channel();
            self.workers.send(
                i,
                Cmd::Stopped {
                    base: 0,
                    wait: false,
                    reply: tx,
                },
            )?;
            replies.push(rx);
        }
        for rx in replies {
            recv(&rx, self.opts.timeout * 2, "stopping a ring")?;
        }
        self.vmm.round()?;
        std::thread::sleep(self.opts.settle);
        self.account_stop(&mut st, &stops)?;
        Ok(st)
    }

    /// Fills in `st` from each ring's `(base, used index at the stop reply)` (`None`: the
    /// stop failed) and the used indices now.
    fn account_stop(
        &self,
        st: &mut StopStats,
        stops: &[Option<(u16, u16)>],
    ) -> Result<(), CheckError> {
        st.inflight_by_queue = vec![0; stops.len()];
        for (i, stop) in stops.iter().enumerate() {
            let Some((base, used)) = *stop else { continue };
            let allowed = base.wrapping_sub(used);
            st.inflight_at_stop += u64::from(allowed);
            st.inflight_by_queue[i] = u64::from(allowed);
            let after = self
                .shared
                .used_idx(&self.plan.queues[i])?
                .wrapping_sub(used);
            st.completed_after_stop += u64::from(after.min(allowed));
            st.processed_after_stop += u64::from(after.saturating_sub(allowed));
        }
        Ok(())
    }

    /// cloud-hypervisor's stop: `SET_VRING_ENABLE(0)` on every ring (each followed by a
    /// barrier, which is its reply when `REPLY_ACK` is off), then one more log flip whose
    /// retired log is merged and copied; the new log is never read. After the settle time,
    /// `GET_VRING_BASE` tells how many requests the backend had taken: those not completed
    /// when the disable was answered were in flight at the stop.
    fn final_stop_ch(&mut self) -> Result<StopStats, CheckError> {
        let mut st = StopStats {
            message: "SET_VRING_ENABLE(0)".into(),
            ..StopStats::default()
        };
        let mut used_at = Vec::new();
        let mut replies = Vec::new();
        for i in 0..self.workers.len() {
            let r = self
                .shared
                .call("SET_VRING_ENABLE(0)", |c| c.set_vring_enable(i, false))
                .and_then(|()| self.shared.barrier("SET_VRING_ENABLE(0)"));
            match r {
                Ok(()) => used_at.push(Some(self.shared.used_idx(&self.plan.queues[i])?)),
                Err(e) => {
                    st.error.get_or_insert_with(|| format!("queue {i}: {e}"));
                    used_at.push(None);
                }
            }
            let (tx, rx) = channel();
            self.workers.send(
                i,
                Cmd::Stopped {
                    base: 0,
                    wait: false,
                    reply: tx,
                },
            )?;
            replies.push(rx);
        }
        for rx in replies {
            recv(&rx, self.opts.timeout * 2, "stopping a ring")?;
        }
        // The last flip: the log written until now is retired and merged; the fresh one the
        // backend gets is never read.
        self.vmm.round()?;
        std::thread::sleep(self.opts.settle);
        let mut stops = Vec::new();
        for (i, used) in used_at.iter().enumerate() {
            let Some(used) = *used else {
                stops.push(None);
                continue;
            };
            match self
                .shared
                .call("GET_VRING_BASE (after the migration)", |c| c.stop_queue(i))
            {
                Ok(base) => stops.push(Some((base, used))),
                Err(e) => {
                    st.error.get_or_insert_with(|| format!("queue {i}: {e}"));
                    stops.push(None);
                }
            }
        }
        self.account_stop(&mut st, &stops)?;
        Ok(st)
    }
}
