//! The VMM half of the simulated migration: the migration bitmap, the destination's copy of
//! guest memory, pre-copy rounds and the final byte-for-byte comparison.
//!
//! Each round merges two logs into the [`MigrationBitmap`]: the backend's vhost-user log
//! ([`SharedLog`]) and the emulated hypervisor log of the in-process guest's own writes
//! (see [`GuestRam::track_writes`]). Then every dirty page is *taken* from the bitmap (an
//! Acquire swap) and only then copied from the source RAM into the destination (DESIGN.md
//! invariant 2: a write after the take sets the bit again and is copied next round). In
//! deferred mode the log is fetched without clearing and each chunk's log bits are cleared right
//! before that chunk's pages are copied ([`FetchedLog::clear_pages`]).
//!
//! After the last round, a page whose destination copy differs from the source is a page
//! somebody wrote and nobody reported: since the guest's own writes are all in the emulated
//! hypervisor log, that somebody is the backend.
//!
//! With flip sync ([`Logs::Flip`], cloud-hypervisor's way) the backend's log is not consumed in
//! place: each round a [`LogFlip`] hands the backend a fresh log through the session's
//! `SET_LOG_BASE` sender and, once the reply is in, merges the retired one with plain loads.
//! The round trip and the merge are timed apart ([`VmmStats::flip_send_us`],
//! [`VmmStats::flip_merge_us`]).
//!
//! Knows nothing of the backend or the workers: the tests below play the backend by writing
//! guest memory behind the tracker's back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{vmm_err, CheckError};
use crate::driver::{GuestRam, RegionSpec};
use crate::log::{LogRegion, LOG_PAGE_SHIFT, LOG_PAGE_SIZE};
use crate::vmm::{FetchedLog, LogFlip, MigrationBitmap, SharedLog};
use vhost::VhostUserDirtyLogRegion;

/// Counters of the VMM side.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VmmStats {
    /// Pre-copy rounds run (round 0, the full copy, included).
    pub rounds: u64,
    /// Pages copied to the destination, all rounds.
    pub pages_copied: u64,
    /// Pages the backend's log made newly dirty in the migration bitmap (sum over syncs and
    /// drains of retired logs).
    pub pages_marked: u64,
    /// Pages the guest's own writes (emulated hypervisor log) made newly dirty.
    pub guest_pages_marked: u64,
    /// Most pages dirty at the start of one round's copy (round 0 excluded).
    pub max_round_dirty: u64,
    /// Pages taken from retired logs after a resize.
    pub drained_pages: u64,
    /// Time spent merging logs into the bitmap, all rounds, in microseconds (flip sync: the
    /// `SET_LOG_BASE` round trips excluded; they are [`flip_send_us`](Self::flip_send_us)).
    pub sync_us: u64,
    /// Time spent copying pages, all rounds, in microseconds.
    pub copy_us: u64,
    /// Flip sync: log flips (`SET_LOG_BASE` with the standby log, replied, retired log merged).
    pub flips: u64,
    /// Flip sync: time in the `SET_LOG_BASE` round trips, all flips, in microseconds.
    pub flip_send_us: u64,
    /// Flip sync: the longest single `SET_LOG_BASE` round trip, in microseconds.
    pub flip_send_max_us: u64,
    /// Flip sync: time merging (and clearing) retired logs, all flips, in microseconds.
    pub flip_merge_us: u64,
}

/// Sends `SET_LOG_BASE` with a log and waits for the backend's reply (the session's
/// connection).
pub(super) type SendLog = Box<dyn FnMut(VhostUserDirtyLogRegion) -> Result<(), CheckError> + Send>;

/// The backend's log(s), by sync mode.
pub(super) enum Logs {
    /// One log, consumed with atomic swaps.
    Swap(SharedLog),
    /// A flip pair and how to hand the backend the next log.
    Flip {
        /// The pair.
        logs: LogFlip,
        /// The `SET_LOG_BASE` sender.
        send: SendLog,
    },
}

pub(super) struct Vmm {
    ram: Arc<GuestRam>,
    logs: Logs,
    kvm: Arc<LogRegion>,
    bitmap: MigrationBitmap,
    dest: BTreeMap<u64, Vec<u8>>,
    fetched: FetchedLog,
    deferred: bool,
    chunk: u64,
    pub stats: VmmStats,
}

impl Vmm {
    pub fn new(
        ram: Arc<GuestRam>,
        logs: Logs,
        kvm: Arc<LogRegion>,
        deferred: bool,
        chunk: u64,
    ) -> Result<Self, CheckError> {
        if deferred && matches!(logs, Logs::Flip { .. }) {
            return Err(CheckError::Invalid(
                "deferred clearing works with swap sync only".into(),
            ));
        }
        let pages = match &logs {
            Logs::Swap(l) => l.guest_pages(),
            Logs::Flip { logs, .. } => logs.guest_pages(),
        };
        let bitmap = MigrationBitmap::new(pages).map_err(vmm_err)?;
        let dest = ram
            .layout()
            .iter()
            .map(|r| (r.gpa, vec![0u8; r.size as usize]))
            .collect();
        Ok(Vmm {
            ram,
            logs,
            kvm,
            bitmap,
            dest,
            fetched: FetchedLog::new(),
            deferred,
            chunk: chunk.max(1),
            stats: VmmStats::default(),
        })
    }

    /// The backend's current log (with flip sync: the active one).
    pub fn log(&self) -> &SharedLog {
        match &self.logs {
            Logs::Swap(l) => l,
            Logs::Flip { logs, .. } => logs.active(),
        }
    }

    /// Flip sync is in use.
    pub fn flips(&self) -> bool {
        matches!(self.logs, Logs::Flip { .. })
    }

    /// Marks every page of guest RAM dirty (round 0, and re-enabling LOG_ALL).
    pub fn mark_all_ram(&self) {
        for r in self.ram.layout() {
            self.bitmap
                .set_range(r.gpa >> LOG_PAGE_SHIFT, r.size >> LOG_PAGE_SHIFT);
        }
    }

    /// Round 0: consume whatever the logs hold, mark all RAM, copy everything.
    pub fn first_round(&mut self) -> Result<(), CheckError> {
        self.sync()?;
        self.mark_all_ram();
        self.copy()?;
        self.stats.rounds += 1;
        Ok(())
    }

    /// One pre-copy round: merge the logs, copy the dirty pages. Returns the pages copied.
    pub fn round(&mut self) -> Result<u64, CheckError> {
        self.sync()?;
        let dirty = self.bitmap.count_dirty();
        self.stats.max_round_dirty = self.stats.max_round_dirty.max(dirty);
        let n = self.copy()?;
        self.stats.rounds += 1;
        Ok(n)
    }

    fn sync(&mut self) -> Result<(), CheckError> {
        let t = Instant::now();
        let mut sent = 0;
        let newly = match &mut self.logs {
            Logs::Swap(log) if self.deferred => {
                self.bitmap.fetch_log_into(log, 0, &mut self.fetched)
            }
            Logs::Swap(log) => self.bitmap.sync_from_log(log, 0),
            Logs::Flip { logs, send } => {
                let region = logs.begin().map_err(vmm_err)?;
                let t0 = Instant::now();
                if let Err(e) = send(region) {
                    logs.abort().map_err(vmm_err)?;
                    return Err(e);
                }
                sent = micros(t0.elapsed());
                logs.commit().map_err(vmm_err)?;
                // Memory hotplug may have raised the logs' end past the bitmap's.
                self.bitmap.grow(logs.guest_pages()).map_err(vmm_err)?;
                let t1 = Instant::now();
                let newly = logs.merge_retired(&self.bitmap).map_err(vmm_err)?;
                self.stats.flips += 1;
                self.stats.flip_send_us += sent;
                self.stats.flip_send_max_us = self.stats.flip_send_max_us.max(sent);
                self.stats.flip_merge_us += micros(t1.elapsed());
                newly
            }
        };
        self.stats.pages_marked += newly;
        self.stats.guest_pages_marked += self.bitmap.sync_from_log(&self.kvm, 0);
        // The SET_LOG_BASE round trip is the backend's time, not the merge's.
        self.stats.sync_us += micros(t.elapsed()).saturating_sub(sent);
        Ok(())
    }

    /// Flip sync, memory hotplug or a log resize: the logs must cover `[0, gpa_end)` from the
    /// next flip on (the bitmap grows with them). Returns the new log size in bytes.
    pub fn grow_logs(&mut self, gpa_end: u64) -> Result<u64, CheckError> {
        let Logs::Flip { logs, .. } = &mut self.logs else {
            return Err(CheckError::Setup("grow_logs needs flip sync".into()));
        };
        logs.grow(gpa_end).map_err(vmm_err)?;
        self.bitmap.grow(logs.guest_pages()).map_err(vmm_err)?;
        Ok(logs.standby().size())
    }

    fn copy(&mut self) -> Result<u64, CheckError> {
        let t = Instant::now();
        // (Vmm::new refuses deferred clearing with flip sync.)
        let n = if self.deferred && !self.flips() {
            // Clear each chunk's fetched log bits right before copying that chunk.
            let pages = self.bitmap.pages().max(self.log().region().pages());
            let mut n = 0;
            let mut c = 0;
            while c < pages {
                let Logs::Swap(log) = &self.logs else { break };
                self.fetched
                    .clear_pages(log, c, self.chunk)
                    .map_err(vmm_err)?;
                n += self.copy_range(c, self.chunk);
                c += self.chunk;
            }
            n
        } else {
            self.copy_range(0, u64::MAX)
        };
        self.stats.pages_copied += n;
        self.stats.copy_us += micros(t.elapsed());
        Ok(n)
    }

    /// Takes and copies the dirty pages of `[first, first + npages)`, run by run.
    fn copy_range(&mut self, first: u64, npages: u64) -> u64 {
        let mut it = self.bitmap.iter_range(first, npages);
        let mut run: Option<(u64, u64)> = None;
        let mut copied = 0;
        loop {
            let next = it.next();
            match (run, next) {
                (Some((s, e)), Some(p)) if p == e => run = Some((s, e + 1)),
                (r, n) => {
                    if let Some((s, e)) = r {
                        copied += self.copy_run(s, e);
                    }
                    match n {
                        Some(p) => run = Some((p, p + 1)),
                        None => break,
                    }
                }
            }
        }
        copied
    }

    /// Clear-before-copy for pages `[s, e)`, all dirty.
    fn copy_run(&mut self, s: u64, e: u64) -> u64 {
        self.bitmap.test_and_clear(s, e - s);
        let mut p = s;
        let mut copied = 0;
        while p < e {
            let gpa = p << LOG_PAGE_SHIFT;
            let hit = self
                .dest
                .range_mut(..=gpa)
                .next_back()
                .filter(|(&rg, v)| gpa < rg + v.len() as u64);
            match hit {
                Some((&rg, v)) => {
                    let end = (e << LOG_PAGE_SHIFT).min(rg + v.len() as u64);
                    let off = (gpa - rg) as usize;
                    let len = (end - gpa) as usize;
                    // Our own RAM: fails only for a region being removed, which is then
                    // dropped from the destination as well.
                    let _ = self.ram.read(gpa, &mut v[off..off + len]);
                    copied += (end - gpa) >> LOG_PAGE_SHIFT;
                    p = end >> LOG_PAGE_SHIFT;
                }
                None => {
                    // Not RAM (a hole, a removed region): nothing to send; skip to the next
                    // region.
                    let next = self.dest.range(gpa..).next().map_or(u64::MAX, |(g, _)| *g);
                    p = (next >> LOG_PAGE_SHIFT).clamp(p + 1, e);
                }
            }
        }
        copied
    }

    /// After the final round: copies what the guest itself wrote since (the in-process guest
    /// keeps reaping completions after the rings stopped, which updates `used_event` in its
    /// avail rings), as a VMM copies a paused guest's last dirty pages. The backend's log is
    /// left alone, so its late marks stay visible to [`log_has`](Self::log_has).
    pub fn final_guest_sync(&mut self) -> Result<u64, CheckError> {
        self.stats.guest_pages_marked += self.bitmap.sync_from_log(&self.kvm, 0);
        let n = self.copy_range(0, u64::MAX);
        self.stats.pages_copied += n;
        Ok(n)
    }

    /// Memory hotplug: the region is in the RAM (and announced to the backend); it is sent in
    /// full, as QEMU does for a new RAM block.
    pub fn add_region(&mut self, spec: RegionSpec) -> Result<(), CheckError> {
        self.bitmap
            .grow(spec.end().div_ceil(LOG_PAGE_SIZE))
            .map_err(vmm_err)?;
        self.dest.insert(spec.gpa, vec![0u8; spec.size as usize]);
        self.bitmap
            .set_range(spec.gpa >> LOG_PAGE_SHIFT, spec.size >> LOG_PAGE_SHIFT);
        Ok(())
    }

    /// Memory unplug: the destination forgets the region.
    pub fn remove_region(&mut self, gpa: u64) {
        self.dest.remove(&gpa);
    }

    /// Log resize, step 1: room in the bitmap for the new log's pages.
    pub fn grow_for(&self, log: &SharedLog) -> Result<(), CheckError> {
        self.bitmap.grow(log.guest_pages()).map_err(vmm_err)?;
        Ok(())
    }

    /// Log resize, step 2 (after the backend acknowledged `SET_LOG_BASE` with `new`): switch,
    /// drain the retired log, and return it (drop it only now).
    /// Swap sync only (flip sync grows with [`grow_logs`](Self::grow_logs)).
    pub fn switch_log(&mut self, new: SharedLog) -> SharedLog {
        let Logs::Swap(log) = &mut self.logs else {
            return new;
        };
        let old = std::mem::replace(log, new);
        let n = self.bitmap.drain_log(&old);
        self.stats.drained_pages += n;
        self.stats.pages_marked += n;
        // A deferred fetch record refers to the old log; the next round refetches.
        self.fetched = FetchedLog::new();
        old
    }

    /// Pages whose destination copy differs from the source, sorted.
    pub fn compare(&self) -> Vec<u64> {
        let mut lost = Vec::new();
        let mut src = Vec::new();
        for (&gpa, d) in &self.dest {
            src.resize(d.len(), 0);
            if self.ram.read(gpa, &mut src).is_err() {
                continue;
            }
            for (i, (a, b)) in src
                .chunks(LOG_PAGE_SIZE as usize)
                .zip(d.chunks(LOG_PAGE_SIZE as usize))
                .enumerate()
            {
                if a != b {
                    lost.push((gpa >> LOG_PAGE_SHIFT) + i as u64);
                }
            }
        }
        lost
    }

    /// Whether `page` is set in the backend's log right now (after the final sync: marked
    /// too late).
    pub fn log_has(&self, page: u64) -> bool {
        self.log().region().test_page(page)
    }

    /// Pages in the destination.
    pub fn ram_pages(&self) -> u64 {
        self.dest
            .values()
            .map(|v| v.len() as u64 >> LOG_PAGE_SHIFT)
            .sum()
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(deferred: bool) -> (Arc<GuestRam>, Vmm) {
        let ram = Arc::new(
            GuestRam::new(&[
                RegionSpec::new(0, 1 << 20),
                RegionSpec::new(4 << 20, 1 << 20),
            ])
            .unwrap(),
        );
        let log = SharedLog::new(ram.gpa_end()).unwrap();
        let kvm = Arc::new(LogRegion::anonymous(log.size() as usize).unwrap());
        ram.track_writes(Some(kvm.clone()));
        let vmm = Vmm::new(ram.clone(), Logs::Swap(log), kvm, deferred, 64).unwrap();
        (ram, vmm)
    }

    /// A write the "backend" makes behind the tracker's back (straight to the host mapping).
    fn backend_write(ram: &GuestRam, gpa: u64, byte: u8) {
        let p = ram.host_ptr(gpa, 1).unwrap();
        // SAFETY: `p` points at one byte of our own mapped guest RAM.
        unsafe { p.write_volatile(byte) };
    }

    #[test]
    fn unmarked_backend_writes_are_lost_marked_ones_are_not() {
        for deferred in [false, true] {
            let (ram, mut vmm) = setup(deferred);
            ram.write(0x3000, &[1; 100]).unwrap(); // guest write before round 0
            vmm.first_round().unwrap();
            assert!(vmm.compare().is_empty());
            // Guest writes are tracked; backend writes need the log.
            ram.write(0x5000, &[2; 10]).unwrap();
            backend_write(&ram, 0x7000, 3);
            vmm.log().region().mark_pages(7, 7);
            backend_write(&ram, (4 << 20) + 0x2000, 4); // never marked
            vmm.round().unwrap();
            assert_eq!(
                vmm.compare(),
                [(4 << 20 >> LOG_PAGE_SHIFT) + 2],
                "deferred={deferred}"
            );
            assert!(vmm.stats.pages_marked >= 1 && vmm.stats.guest_pages_marked >= 1);
        }
    }

    #[test]
    fn flip_sync_reads_retired_logs_and_grows() {
        use std::sync::Mutex;
        let ram = Arc::new(GuestRam::new(&[RegionSpec::new(0, 1 << 20)]).unwrap());
        let kvm = Arc::new(LogRegion::anonymous(512).unwrap());
        ram.track_writes(Some(kvm.clone()));
        // The "backend": the log it was last handed (an fd duplicate is enough to compare).
        let sent = Arc::new(Mutex::new(Vec::new()));
        let s2 = sent.clone();
        let send: SendLog = Box::new(move |r: VhostUserDirtyLogRegion| {
            s2.lock().unwrap().push(r.mmap_size);
            Ok(())
        });
        let logs = Logs::Flip {
            logs: LogFlip::new(ram.gpa_end()).unwrap(),
            send,
        };
        let mut vmm = Vmm::new(ram.clone(), logs, kvm, false, 64).unwrap();
        assert!(vmm.flips());
        vmm.first_round().unwrap();
        // A mark in the active log: the next flip retires and merges it.
        backend_write(&ram, 0x7000, 3);
        vmm.log().region().mark_pages(7, 7);
        vmm.round().unwrap();
        assert!(vmm.compare().is_empty());
        assert_eq!(vmm.stats.flips, 2);
        assert_eq!(vmm.stats.pages_marked, 1);
        // Hotplug past the log's end: the logs grow, a mark past the old end is merged.
        let spec = RegionSpec::new(4 << 20, 1 << 20);
        ram.add_region(spec).unwrap();
        vmm.add_region(spec).unwrap();
        vmm.grow_logs(ram.gpa_end()).unwrap();
        vmm.round().unwrap(); // hands out the grown standby
        let p = (spec.gpa >> LOG_PAGE_SHIFT) + 3;
        backend_write(&ram, spec.gpa + 0x3000, 7);
        vmm.log().region().mark_pages(p, p);
        vmm.round().unwrap();
        assert!(vmm.compare().is_empty(), "{:?}", vmm.compare());
        let sizes = sent.lock().unwrap().clone();
        assert_eq!(sizes.len(), 4);
        assert!(sizes[2] > sizes[0], "{sizes:?}");
        // A send failure aborts the flip: the backend keeps its log, nothing is lost.
        let mut failing = Vmm::new(
            ram.clone(),
            Logs::Flip {
                logs: LogFlip::new(ram.gpa_end()).unwrap(),
                send: Box::new(|_| Err(CheckError::Protocol("gone".into()))),
            },
            Arc::new(LogRegion::anonymous(512).unwrap()),
            false,
            64,
        )
        .unwrap();
        assert!(failing.round().is_err());
        // Deferred clearing is refused with flip sync.
        assert!(Vmm::new(
            ram.clone(),
            Logs::Flip {
                logs: LogFlip::new(ram.gpa_end()).unwrap(),
                send: Box::new(|_| Ok(())),
            },
            Arc::new(LogRegion::anonymous(512).unwrap()),
            true,
            64,
        )
        .is_err());
    }

    #[test]
    fn hotplug_and_log_switch() {
        let (ram, mut vmm) = setup(false);
        vmm.first_round().unwrap();
        let spec = RegionSpec::new(8 << 20, 1 << 20);
        ram.add_region(spec).unwrap();
        ram.write(spec.gpa + 0x1000, &[9; 8]).unwrap();
        vmm.add_region(spec).unwrap();
        let new = SharedLog::new(16 << 20).unwrap();
        vmm.grow_for(&new).unwrap();
        backend_write(&ram, 0x9000, 5);
        vmm.log().region().mark_pages(9, 9); // marked in the log about to retire
        let old = vmm.switch_log(new);
        assert_eq!(vmm.stats.drained_pages, 1);
        drop(old);
        backend_write(&ram, spec.gpa + 0x4000, 6);
        vmm.log().region().mark_pages(
            (spec.gpa >> LOG_PAGE_SHIFT) + 4,
            (spec.gpa >> LOG_PAGE_SHIFT) + 4,
        );
        vmm.round().unwrap();
        assert!(vmm.compare().is_empty());
        assert_eq!(vmm.ram_pages(), 768);
        let removed = ram.remove_region(spec.gpa).unwrap();
        vmm.remove_region(removed.gpa());
        assert_eq!(vmm.ram_pages(), 512);
    }
}
