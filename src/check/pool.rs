//! The worker pool: one thread per ring running the guest workload (`worker.rs` for blk,
//! `netq.rs` for net RX and TX rings, each in the shared loop of `worker.rs`), the traffic
//! injectors of a net run (`traffic.rs`), and the VMM thread's handle on them — commands, summed counters, and the join that collects their
//! results (the first worker error wins).
//!
//! Dropping the pool disconnects the workers' command channels and joins them, so a run that
//! fails half-way never leaves a thread behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::error::CheckError;
use super::netq::{NetRingCfg, RxWork, TxWork};
use super::options::{CheckOptions, Device, Workload};
use super::pattern::BLOCK;
use super::plan::TX_SLOT;
use super::rig::{Rig, Ring};
use super::traffic::{Injectors, Origin};
use super::worker::{Cmd, Runner, Worker, WorkerCfg, WorkerFinal, WorkerStats};

/// What a worker thread returns.
type WorkerResult = Result<WorkerFinal, CheckError>;

/// The workload threads (one per ring) and, for net, the traffic injectors.
pub(super) struct Workers {
    tx: Vec<Sender<Cmd>>,
    handles: Vec<Option<JoinHandle<WorkerResult>>>,
    stats: Vec<Arc<WorkerStats>>,
    injectors: Option<Injectors>,
    /// The rings are net queues (odd ones TX, which use no data slots).
    net: bool,
}

impl Workers {
    /// Starts one worker per queue of `s` (taking its rings). Segments are aligned to `align`
    /// bytes in their slots; `verify` checks reads against the pattern, `track` records the
    /// pages the device writes while logging is on.
    pub fn spawn(
        s: &mut Rig,
        opts: &CheckOptions,
        align: u64,
        verify: bool,
        track: bool,
    ) -> Result<Workers, CheckError> {
        let nq = s.queues.len();
        let span = s.backend.span;
        let mut w = Workers {
            tx: Vec::new(),
            handles: Vec::new(),
            stats: Vec::new(),
            injectors: None,
            net: opts.device == Device::Net,
        };
        let origin = Origin::new(s.salt);
        if opts.device == Device::Net {
            w.injectors = Injectors::start(&opts.net, s.pairs, origin, opts.seed)?;
        }
        let pairs = usize::from(s.pairs.max(1));
        for (i, ring) in std::mem::take(&mut s.queues).into_iter().enumerate() {
            let (tx, rx) = channel();
            let stats = Arc::new(WorkerStats::default());
            let spawn = |name: String, f: Box<dyn FnOnce() -> WorkerResult + Send>| {
                std::thread::Builder::new()
                    .name(name)
                    .spawn(f)
                    .map_err(|e| CheckError::Setup(format!("cannot start a worker thread: {e}")))
            };
            let h = match ring {
                Ring::Blk(q) => {
                    let (disk_first, disk_len) = disk_share(opts.workload, span, nq, i);
                    let cfg = WorkerCfg {
                        index: i,
                        workload: opts.workload,
                        depth: s.depth,
                        min_io: opts.min_io,
                        max_io: s.max_req.min(disk_len),
                        max_segs: s.max_segs,
                        max_seg_len: s.max_seg_len,
                        align,
                        slot: s.plan.slot,
                        disk_first,
                        disk_len,
                        salt: s.salt,
                        seed: opts.seed,
                        verify,
                        track,
                    };
                    let slots = share(&s.plan.slots, i, nq);
                    let work = Worker::new(cfg, q, slots, s.shared.clone(), stats.clone());
                    let r =
                        Runner::new(work, s.shared.clone(), rx, opts.timeout, opts.stall_timeout);
                    spawn(format!("check-queue-{i}"), Box::new(move || r.run()))?
                }
                Ring::Net(q) => {
                    let mut net = opts.net.clone();
                    net.rx_buf = s.rx_buf;
                    let cfg = NetRingCfg {
                        index: i,
                        net,
                        slot: s.plan.slot,
                        salt: s.salt,
                        origin,
                        seed: opts.seed,
                        verify: verify && w.injectors.is_some(),
                        per_pair: w.injectors.as_ref().is_some_and(Injectors::per_pair),
                        pairs: s.pairs,
                        track,
                    };
                    let pair = i / 2;
                    if i.is_multiple_of(2) {
                        let slots = share(&s.plan.slots, pair, pairs);
                        let port = w
                            .injectors
                            .as_ref()
                            .and_then(|j| j.stats.get(pair).cloned());
                        let work =
                            RxWork::new(cfg, q, slots, s.shared.clone(), stats.clone(), port);
                        let r = Runner::new(
                            work,
                            s.shared.clone(),
                            rx,
                            opts.timeout,
                            opts.stall_timeout,
                        );
                        spawn(format!("check-rx-{pair}"), Box::new(move || r.run()))?
                    } else {
                        let mut cfg = cfg;
                        cfg.net.tx &= w.injectors.is_some();
                        let work = TxWork::new(
                            cfg,
                            q,
                            s.plan.scratch[i],
                            TX_SLOT,
                            s.shared.clone(),
                            stats.clone(),
                        );
                        let r = Runner::new(
                            work,
                            s.shared.clone(),
                            rx,
                            opts.timeout,
                            opts.stall_timeout,
                        );
                        spawn(format!("check-tx-{pair}"), Box::new(move || r.run()))?
                    }
                }
            };
            w.tx.push(tx);
            w.handles.push(Some(h));
            w.stats.push(stats);
        }
        Ok(w)
    }

    /// The workers that put buffers in data slots (blk queues, net RX queues), by index.
    pub fn slot_takers(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| !self.net || i.is_multiple_of(2))
            .collect()
    }

    /// The injectors, if the checker makes the traffic.
    pub fn injectors(&self) -> Option<&Injectors> {
        self.injectors.as_ref()
    }

    /// Sum of a counter over the workers of the rings `filter` selects (by index).
    pub fn sum_where(
        &self,
        filter: impl Fn(usize) -> bool,
        f: impl Fn(&WorkerStats) -> &AtomicU64,
    ) -> u64 {
        self.stats
            .iter()
            .enumerate()
            .filter(|(i, _)| filter(*i))
            .map(|(_, s)| f(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Workers (queues) in the pool.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Sends `cmd` to worker `i`; `Err` if it has stopped.
    pub fn send(&self, i: usize, cmd: Cmd) -> Result<(), CheckError> {
        self.tx[i]
            .send(cmd)
            .map_err(|_| CheckError::Protocol(format!("queue {i}: worker has stopped")))
    }

    /// Sum of a counter over all workers.
    pub fn sum(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Tells every worker to finish and collects their results; the first worker error wins.
    pub fn finish(&mut self) -> Result<Vec<WorkerFinal>, CheckError> {
        for tx in &self.tx {
            let _ = tx.send(Cmd::Finish);
        }
        let mut out = Vec::new();
        let mut err = None;
        for h in self.handles.iter_mut().filter_map(Option::take) {
            match h.join() {
                Ok(Ok(f)) => out.push(f),
                Ok(Err(e)) => {
                    err.get_or_insert(e);
                }
                Err(_) => {
                    err.get_or_insert(CheckError::Setup("a worker thread panicked".into()));
                }
            }
        }
        if let Some(j) = &mut self.injectors {
            j.stop();
            if !j.samples.is_empty() {
                out.push(WorkerFinal {
                    samples: std::mem::take(&mut j.samples),
                });
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.tx.clear();
        for h in self.handles.iter_mut().filter_map(Option::take) {
            let _ = h.join();
        }
    }
}

/// Worker `i`'s part of `items` when `n` workers share them: every `n`-th from the `i`-th, so
/// each worker gets slots from every region.
pub(super) fn share(items: &[u64], i: usize, n: usize) -> Vec<u64> {
    items.iter().skip(i).step_by(n).copied().collect()
}

/// The disk bytes worker `i` of `n` uses, `(first, len)`: all of the `span` for reads; a
/// block-aligned slice of its own when it writes, so no two workers race on a block.
fn disk_share(workload: Workload, span: u64, n: usize, i: usize) -> (u64, u64) {
    if workload == Workload::Read {
        (0, span)
    } else {
        let slice = span / n as u64 / BLOCK * BLOCK;
        (i as u64 * slice, slice)
    }
}

/// A worker's reply to a command, or `Err` if it does not come within `timeout` (`what` names
/// the command).
pub(super) fn recv<T>(
    rx: &Receiver<Result<T, CheckError>>,
    timeout: Duration,
    what: &str,
) -> Result<T, CheckError> {
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => Err(CheckError::Protocol(format!(
            "{what}: the worker did not answer"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        let v: Vec<u64> = (0..7).collect();
        assert_eq!(share(&v, 0, 2), [0, 2, 4, 6]);
        assert_eq!(share(&v, 1, 2), [1, 3, 5]);
        assert_eq!(share(&v, 2, 3), [2, 5]);
        assert_eq!(disk_share(Workload::Read, 1 << 20, 2, 1), (0, 1 << 20));
        // Writers get disjoint block-aligned slices.
        let span = 10 * BLOCK + 100;
        assert_eq!(disk_share(Workload::Write, span, 3, 0), (0, 3 * BLOCK));
        assert_eq!(
            disk_share(Workload::Mixed, span, 3, 2),
            (6 * BLOCK, 3 * BLOCK)
        );
    }
}
