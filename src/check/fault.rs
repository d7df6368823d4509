//! Fault injection: when each requested fault is due ([`Schedule`]), and what it does to the
//! running rig ([`Target::inject`]) — a log resize, memory hot-add/remove and a new memory
//! table, `LOG_ALL` off and on, a frontend reconnect. Each returns a line for the report.
//!
//! The schedule spreads `m` faults evenly over the run: fault `k` (1-based) is due once
//! `k / (m + 1)` of the rounds (or of the duration) have passed, checked after each round.

use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::time::Duration;

use super::dest::Vmm;
use super::error::{proto, vmm_err, CheckError};
use super::options::{CheckOptions, Fault};
use super::plan::MemPlan;
use super::pool::{recv, share, Workers};
use super::report::BackendInfo;
use super::rig::{negotiate, Shared};
use super::worker::Cmd;
use crate::driver::Connection;
use crate::vmm::{SharedLog, MAX_GPA_END};

/// When the faults of a run are due.
#[derive(Debug, Clone)]
pub(super) struct Schedule {
    faults: Vec<Fault>,
    next: usize,
    rounds: Option<u64>,
    duration: Duration,
}

impl Schedule {
    /// `faults` in order, spread over `rounds` rounds if given, else over `duration`.
    pub fn new(faults: &[Fault], rounds: Option<u64>, duration: Duration) -> Self {
        Schedule {
            faults: faults.to_vec(),
            next: 0,
            rounds,
            duration,
        }
    }

    /// The next fault due after round `round` (1-based), `elapsed` into the migration, if one
    /// is; call it until it returns `None`. Several faults can fall due in one round.
    pub fn due(&mut self, round: u64, elapsed: Duration) -> Option<Fault> {
        let m = self.faults.len() as u64;
        let f = *self.faults.get(self.next)?;
        let k = self.next as u64 + 1;
        let due = match self.rounds {
            Some(n) => round * (m + 1) >= n * k,
            None => {
                elapsed.as_secs_f64() * (m + 1) as f64 >= self.duration.as_secs_f64() * k as f64
            }
        };
        if !due {
            return None;
        }
        self.next += 1;
        Some(f)
    }

    /// Every fault has been handed out.
    pub fn finished(&self) -> bool {
        self.next == self.faults.len()
    }
}

/// What a fault acts on: the parts of a running check.
pub(super) struct Target<'a> {
    pub opts: &'a CheckOptions,
    pub shared: &'a Shared,
    pub plan: &'a MemPlan,
    pub backend: &'a BackendInfo,
    pub vmm: &'a mut Vmm,
    pub workers: &'a Workers,
}

impl Target<'_> {
    /// Injects `f` now; returns what happened, for the report.
    pub fn inject(&mut self, f: Fault) -> Result<String, CheckError> {
        match f {
            Fault::LogResize => self.log_resize(),
            Fault::MemTable => self.mem_table(),
            Fault::LogToggle => self.log_toggle(),
            Fault::Reconnect => self.reconnect(),
            Fault::VringAddr => self.vring_addr(),
        }
    }

    /// The first burst of a `SET_VRING_ADDR` storm; the session sends one more after every
    /// later round until the final stop.
    fn vring_addr(&mut self) -> Result<String, CheckError> {
        let queues = &self.plan.queues[..self.workers.len()];
        let n = self
            .shared
            .vring_addr_storm(queues, self.opts.storm_burst)?;
        Ok(format!(
            "SET_VRING_ADDR storm: the same addresses of {} running ring(s), {} times each per round ({n} in the first burst)",
            queues.len(),
            self.opts.storm_burst
        ))
    }

    fn log_resize(&mut self) -> Result<String, CheckError> {
        if self.vmm.flips() {
            // Flip sync: both logs grow; the bigger standby goes out with the next flip, the
            // current one is replaced once it comes back retired (LogFlip::grow).
            let old_size = self.vmm.log().size();
            let end = (self.vmm.log().gpa_end().saturating_mul(2)).min(MAX_GPA_END);
            let new_size = self.vmm.grow_logs(end)?;
            let before = self.vmm.stats.pages_marked;
            self.vmm.round()?;
            return Ok(format!(
                "logs {old_size} -> {new_size} bytes (flip sync: grown), flipped to the bigger log at once ({} page(s) merged from the retired one)",
                self.vmm.stats.pages_marked - before
            ));
        }
        let old_size = self.vmm.log().size();
        let end = (self.vmm.log().gpa_end().saturating_mul(2)).min(MAX_GPA_END);
        let new = SharedLog::new(end).map_err(vmm_err)?;
        let new_size = new.size();
        self.vmm.grow_for(&new)?;
        let region = new.dirty_log_region();
        self.shared
            .call("SET_LOG_BASE (resize)", |c| c.set_log_base(region))?;
        let before = self.vmm.stats.drained_pages;
        drop(self.vmm.switch_log(new));
        Ok(format!(
            "log {old_size} -> {new_size} bytes, {} page(s) drained from the old log",
            self.vmm.stats.drained_pages - before
        ))
    }

    fn mem_table(&mut self) -> Result<String, CheckError> {
        let (Some(hot), Some(spare)) = (self.plan.hot, self.plan.spare) else {
            return Ok("no regions planned".into());
        };
        let ram = self.shared.ram.clone();
        let slots = self.backend.mem_slots;
        ram.add_region(hot)
            .map_err(|e| CheckError::Setup(e.to_string()))?;
        if slots {
            self.shared
                .call("ADD_MEM_REG", |c| c.add_mem_region(&ram, hot.gpa))?;
        } else {
            self.shared
                .call("SET_MEM_TABLE (region added)", |c| c.set_mem_table(&ram))?;
        }
        // The workers put buffers there next: the backend must have mapped it.
        self.shared
            .barrier("the memory table change (region added)")?;
        self.vmm.add_region(hot)?;
        if self.vmm.flips() {
            self.vmm.grow_logs(ram.gpa_end())?;
        }
        let takers = self.workers.slot_takers();
        for (k, &i) in takers.iter().enumerate() {
            let s = share(&self.plan.hot_slots, k, takers.len());
            self.workers.send(i, Cmd::AddSlots(s))?;
        }
        let removed = ram
            .remove_region(spare.gpa)
            .map_err(|e| CheckError::Setup(e.to_string()))?;
        if slots {
            self.shared
                .call("REM_MEM_REG", |c| c.remove_mem_region(&removed))?;
        } else {
            self.shared
                .call("SET_MEM_TABLE (region removed)", |c| c.set_mem_table(&ram))?;
        }
        self.shared
            .barrier("the memory table change (region removed)")?;
        self.vmm.remove_region(spare.gpa);
        drop(removed);
        let how = if slots {
            self.shared
                .call("SET_MEM_TABLE (re-send)", |c| c.set_mem_table(&ram))?;
            self.shared.barrier("SET_MEM_TABLE (re-send)")?;
            "ADD_MEM_REG, REM_MEM_REG, then the whole table again with SET_MEM_TABLE"
        } else {
            "SET_MEM_TABLE twice (no CONFIGURE_MEM_SLOTS)"
        };
        Ok(format!(
            "added {} KiB at {:#x} (used by later requests), removed {} KiB at {:#x}: {how}",
            hot.size >> 10,
            hot.gpa,
            spare.size >> 10,
            spare.gpa
        ))
    }

    fn log_toggle(&mut self) -> Result<String, CheckError> {
        self.shared.logging.store(false, Ordering::Relaxed);
        self.shared.set_log_all(&self.plan.queues, false)?;
        let before = self.workers.sum(|s| &s.completed);
        let off = self.opts.round_interval.max(Duration::from_millis(20));
        std::thread::sleep(off);
        let during = self.workers.sum(|s| &s.completed) - before;
        self.shared.set_log_all(&self.plan.queues, true)?;
        self.shared.logging.store(true, Ordering::Relaxed);
        // Whatever the device wrote while logging was off is unknown: resend everything.
        self.vmm.mark_all_ram();
        Ok(format!(
            "LOG_ALL off for {} ms ({during} requests completed unlogged), on again; all RAM marked dirty",
            off.as_millis()
        ))
    }

    /// Stops every ring and waits until everything the backend took has completed (before a
    /// restart); returns `(base, used index at the reply)` per ring.
    fn stop_rings(&mut self) -> Result<Vec<(u16, u16)>, CheckError> {
        let mut out = Vec::new();
        let mut replies = Vec::new();
        for i in 0..self.workers.len() {
            let base = self.shared.call("GET_VRING_BASE", |c| c.stop_queue(i))?;
            out.push((base, self.shared.used_idx(&self.plan.queues[i])?));
            let (tx, rx) = channel();
            self.workers.send(
                i,
                Cmd::Stopped {
                    base,
                    wait: true,
                    reply: tx,
                },
            )?;
            replies.push(rx);
        }
        let t = self.opts.timeout * 2;
        for rx in replies {
            recv(&rx, t, "stopping a ring")?;
        }
        Ok(out)
    }

    fn reconnect(&mut self) -> Result<String, CheckError> {
        let bases = self.stop_rings()?;
        // Disconnect: the backend sees the socket close.
        self.shared.set_conn(None);
        let opts = self.opts;
        let mut conn =
            Connection::connect(&opts.socket, opts.timeout).map_err(|e| proto("reconnect", e))?;
        conn.set_timeout(Some(opts.timeout))
            .map_err(|e| CheckError::Setup(format!("watchdog: {e}")))?;
        negotiate(&mut conn, opts.device, opts.reply_ack)
            .map_err(|e| proto("reconnect: feature negotiation", e))?;
        conn.set_mem_table(&self.shared.ram)
            .map_err(|e| proto("reconnect: SET_MEM_TABLE", e))?;
        conn.set_log_base(self.vmm.log().dirty_log_region())
            .map_err(|e| proto("reconnect: SET_LOG_BASE", e))?;
        conn.set_log_all(true)
            .map_err(|e| proto("reconnect: LOG_ALL", e))?;
        if self.shared.barrier {
            conn.barrier()
                .map_err(|e| proto("reconnect: barrier after LOG_ALL", e))?;
        }
        self.shared.set_conn(Some(conn));
        let mut replies = Vec::new();
        for i in 0..self.workers.len() {
            let (tx, rx) = channel();
            self.workers.send(i, Cmd::Restart { reply: tx })?;
            replies.push(rx);
        }
        for rx in replies {
            recv(&rx, self.opts.timeout * 2, "restarting a ring")?;
        }
        Ok(format!(
            "rings stopped at {:?}, disconnected, reconnected with the same log and LOG_ALL on, rings resumed",
            bases.iter().map(|b| b.0).collect::<Vec<_>>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_due(s: &mut Schedule, round: u64, elapsed: Duration) -> Vec<Fault> {
        std::iter::from_fn(|| s.due(round, elapsed)).collect()
    }

    #[test]
    fn faults_spread_over_rounds() {
        let mut s = Schedule::new(&Fault::ALL, Some(10), Duration::ZERO);
        let mut at = Vec::new();
        for round in 1..=10 {
            for f in all_due(&mut s, round, Duration::ZERO) {
                at.push((round, f));
            }
        }
        assert!(s.finished());
        assert_eq!(
            at,
            [
                (2, Fault::LogResize),
                (4, Fault::MemTable),
                (5, Fault::LogToggle),
                (7, Fault::Reconnect),
                (9, Fault::VringAddr)
            ]
        );
        // More faults than rounds: several in one round, none lost.
        let mut s = Schedule::new(
            &[Fault::Reconnect, Fault::LogToggle],
            Some(1),
            Duration::ZERO,
        );
        assert_eq!(
            all_due(&mut s, 1, Duration::ZERO),
            [Fault::Reconnect, Fault::LogToggle]
        );
        assert!(s.finished());
    }

    #[test]
    fn faults_spread_over_time() {
        let mut s = Schedule::new(&[Fault::LogResize], None, Duration::from_secs(3));
        assert!(!s.finished());
        assert_eq!(s.due(5, Duration::from_millis(1400)), None);
        assert_eq!(
            s.due(6, Duration::from_millis(1500)),
            Some(Fault::LogResize)
        );
        assert_eq!(s.due(7, Duration::from_secs(9)), None);
        assert!(s.finished());
        let mut none = Schedule::new(&[], None, Duration::from_secs(3));
        assert!(none.finished());
        assert_eq!(none.due(1, Duration::from_secs(9)), None);
    }
}
