//! The guest-memory plan: where the rings, the request scratch areas and the data buffers go,
//! which regions the memory-table fault adds and removes, and what a given guest page holds
//! (for the report of a lost page).
//!
//! Pure arithmetic on a layout: no memory is mapped here, so every placement rule is tested
//! on its own below.

use super::error::CheckError;
use super::options::Device;
use crate::driver::blk::BlkQueue;
use crate::driver::{QueueLayout, RegionSpec};
use crate::log::LOG_PAGE_SHIFT;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Data slot size in bytes for a largest request of `max_io` bytes.
pub(super) fn slot_size(max_io: u64) -> u64 {
    max_io.max(4096)
}

/// Bytes of the scratch area each ring gets: request headers and status bytes (blk), TX frame
/// slots of [`TX_SLOT`] bytes per entry (net; RX rings get the same, unused, to keep the
/// arithmetic uniform).
pub(super) fn scratch_bytes(device: Device, qsize: u16) -> u64 {
    match device {
        Device::Blk => BlkQueue::scratch_bytes(qsize),
        Device::Net => u64::from(qsize) * u64::from(TX_SLOT),
    }
}

/// Bytes per TX frame slot of the net workload (a 12-byte virtio-net header and the frame).
pub(super) const TX_SLOT: u32 = 2048;

/// Where everything lives in guest memory.
#[derive(Debug, Clone)]
pub(super) struct MemPlan {
    /// The device the plan is for (names of page kinds).
    pub device: Device,
    /// The RAM at start (sorted), including `spare`.
    pub regions: Vec<RegionSpec>,
    /// One layout per queue.
    pub queues: Vec<QueueLayout>,
    /// Scratch area (headers, status bytes) per queue.
    pub scratch: Vec<u64>,
    /// Bytes of each scratch area.
    pub scratch_bytes: u64,
    /// Data slots (`slot` bytes each), in an order that spreads consecutive slots over regions.
    pub slots: Vec<u64>,
    /// Bytes per data slot.
    pub slot: u64,
    /// Memory-table fault: a small region present at start and removed mid-run (never used).
    pub spare: Option<RegionSpec>,
    /// Memory-table fault: a region added mid-run, whose slots are used from then on.
    pub hot: Option<RegionSpec>,
    /// Slots of `hot`.
    pub hot_slots: Vec<u64>,
}

impl MemPlan {
    /// Guest-physical end of the RAM at start.
    pub fn gpa_end(&self) -> u64 {
        self.regions.iter().map(|r| r.end()).max().unwrap_or(0)
    }
    /// The highest guest-physical end the run can reach (the hot region included).
    pub fn max_gpa_end(&self) -> u64 {
        self.hot.map_or(0, |h| h.end()).max(self.gpa_end())
    }

    /// What guest page `page` (a 4 KiB page number) holds, if the plan put control data
    /// there. blk: `"used-ring"` (a used ring) or `"status"` (request headers and status
    /// bytes). net: `"rx-used-ring"` (an RX queue's used ring, `avail_event` included),
    /// `"tx-used-ring"`, or `"tx-buffer"` (TX frame slots, which only the guest writes).
    /// `None` for data slots and everything else.
    pub fn page_kind(&self, page: u64) -> Option<&'static str> {
        if let Some(i) = self
            .queues
            .iter()
            .position(|l| l.used_pages().contains(&page))
        {
            return Some(match (self.device, i % 2) {
                (Device::Blk, _) => "used-ring",
                (Device::Net, 0) => "rx-used-ring",
                (Device::Net, _) => "tx-used-ring",
            });
        }
        let n = self.scratch_bytes;
        if self
            .scratch
            .iter()
            .any(|&s| (s >> LOG_PAGE_SHIFT..=(s + n - 1) >> LOG_PAGE_SHIFT).contains(&page))
        {
            return Some(match self.device {
                Device::Blk => "status",
                Device::Net => "tx-buffer",
            });
        }
        None
    }
}

fn overlaps(a: &RegionSpec, b: &RegionSpec) -> bool {
    a.gpa < b.end() && b.gpa < a.end()
}

/// A free range of `size` bytes: in the first hole (gap between regions) that fits with a
/// 1 MiB margin on both sides, else above the highest region.
fn place(regions: &[RegionSpec], size: u64) -> RegionSpec {
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.gpa);
    for w in sorted.windows(2) {
        let start = (w[0].end() + MIB).next_multiple_of(MIB);
        if start + size + MIB <= w[1].gpa {
            return RegionSpec::new(start, size);
        }
    }
    let end = sorted.last().map_or(0, |r| r.end());
    RegionSpec::new((end + MIB).next_multiple_of(2 * MIB), size)
}

/// A queue at `at`; with `isolate_event`, the used ring is placed so that its last field,
/// `avail_event`, starts a page of its own (split virtqueues only need 4-byte alignment), so a
/// backend that writes `avail_event` without logging it cannot hide behind the logged used-index
/// update on the same page. With `own_pages` as well, the rest of the used ring (flags, index,
/// elements) starts after the avail ring's last page, so no guest write (the avail ring,
/// `used_event`) shares a page with it either: an unlogged used-element write is not hidden
/// by the guest's next avail update (net: the RX queue is reposted after every frame).
fn queue_layout(
    at: u64,
    qsize: u16,
    isolate_event: bool,
    own_pages: bool,
) -> Result<QueueLayout, CheckError> {
    let l = QueueLayout::new(at, qsize).map_err(|e| CheckError::Invalid(e.to_string()))?;
    if !isolate_event {
        return Ok(l);
    }
    // flags, idx, ring[N]: everything before avail_event.
    let ring = 4 + 8 * u64::from(qsize);
    let avail_end = l.avail + QueueLayout::avail_bytes(qsize);
    let used = if own_pages {
        avail_end.next_multiple_of(4096) + ring.next_multiple_of(4096) - ring
    } else {
        (avail_end + ring).next_multiple_of(4096) - ring
    };
    Ok(QueueLayout { used, ..l })
}

fn slots_in(gpa: u64, end: u64, slot: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut s = gpa.next_multiple_of(4096);
    while s + slot <= end {
        out.push(s);
        s += slot;
    }
    out
}

/// Lays out `nq` queues of `qsize` entries (see [`queue_layout`] for `isolate_event`),
/// scratch areas ([`scratch_bytes`] of `device`) and data slots of `slot` bytes in `layout`;
/// with `hotplug` (the memory-table fault will run) adds the spare and hot regions.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan(
    device: Device,
    layout: &[RegionSpec],
    nq: u16,
    qsize: u16,
    isolate_event: bool,
    slot: u64,
    hotplug: bool,
) -> Result<MemPlan, CheckError> {
    let bad = |m: String| CheckError::Invalid(m);
    let mut regions = layout.to_vec();
    regions.sort_by_key(|r| r.gpa);
    for r in &regions {
        if r.size == 0 || r.size % 4096 != 0 || r.gpa % 4096 != 0 {
            return Err(bad(format!(
                "region {:#x}+{:#x}: start and size must be non-zero multiples of 4 KiB",
                r.gpa, r.size
            )));
        }
    }
    for w in regions.windows(2) {
        if overlaps(&w[0], &w[1]) {
            return Err(bad(format!(
                "regions {:#x}+{:#x} and {:#x}+{:#x} overlap",
                w[0].gpa, w[0].size, w[1].gpa, w[1].size
            )));
        }
    }
    // Rings and scratch at the start of the first region.
    let r0 = regions[0];
    let mut at = r0.gpa;
    let mut queues = Vec::new();
    for _ in 0..nq {
        let l = queue_layout(at, qsize, isolate_event, device == Device::Net)?;
        queues.push(l);
        at = l.end().next_multiple_of(4096);
    }
    let mut scratch = Vec::new();
    for _ in 0..nq {
        scratch.push(at);
        at = (at + scratch_bytes(device, qsize)).next_multiple_of(4096);
    }
    let control_end = at.next_multiple_of(64 * KIB);
    if control_end > r0.end() {
        return Err(bad(format!(
            "the first region ({} KiB) is too small for {nq} queue(s) of {qsize} entries ({} KiB needed before any data)",
            r0.size / KIB,
            (control_end - r0.gpa) / KIB
        )));
    }
    // Data slots per region, interleaved round-robin so consecutive slots (and so each
    // queue's share) spread over every region.
    let per_region: Vec<Vec<u64>> = regions
        .iter()
        .map(|r| {
            let start = if r.gpa == r0.gpa { control_end } else { r.gpa };
            slots_in(start, r.end(), slot)
        })
        .collect();
    let mut slots = Vec::new();
    let longest = per_region.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for v in &per_region {
            if let Some(&s) = v.get(i) {
                slots.push(s);
            }
        }
    }
    let (mut spare, mut hot, mut hot_slots) = (None, None, Vec::new());
    if hotplug {
        let s = place(&regions, MIB);
        regions.push(s);
        regions.sort_by_key(|r| r.gpa);
        spare = Some(s);
        let hsize = (4 * slot).max(4 * MIB).next_multiple_of(MIB);
        let h = place(&regions, hsize);
        hot_slots = slots_in(h.gpa, h.end(), slot);
        hot = Some(h);
    }
    Ok(MemPlan {
        device,
        regions,
        queues,
        scratch,
        scratch_bytes: scratch_bytes(device, qsize),
        slots,
        slot,
        spare,
        hot,
        hot_slots,
    })
}

#[cfg(test)]
mod tests {
    use super::super::layout::default_layout;
    use super::*;

    #[test]
    fn plan_places_everything_without_overlap() {
        let layout = default_layout(48 << 20, 3).unwrap();
        let p = plan(Device::Blk, &layout, 2, 256, true, 128 << 10, true).unwrap();
        // avail_event (the last 2 bytes of the used ring) starts a page.
        for l in &p.queues {
            assert_eq!((l.end() - 2) % 4096, 0, "{l:?}");
            assert_eq!(l.used % 4, 0);
            assert!(l.used >= l.avail + QueueLayout::avail_bytes(256));
        }
        assert_eq!(p.queues[1].desc % 16, 0);
        assert_eq!(p.queues.len(), 2);
        let spare = p.spare.unwrap();
        let hot = p.hot.unwrap();
        // The spare region lands in the first hole, the hot one in the next that fits.
        assert!(spare.gpa > layout[0].end() && spare.end() < layout[1].gpa);
        for r in p.regions.iter().filter(|r| **r != spare) {
            assert!(!overlaps(r, &hot), "{r:?} {hot:?}");
        }
        // Slots lie inside regions, after the control area, and never overlap.
        let ctl_end = p.scratch[1] + BlkQueue::scratch_bytes(256);
        let mut s = p.slots.clone();
        s.sort();
        for w in s.windows(2) {
            assert!(w[0] + p.slot <= w[1]);
        }
        for &x in &p.slots {
            assert!(x >= ctl_end);
            assert!(layout.iter().any(|r| r.gpa <= x && x + p.slot <= r.end()));
        }
        // Interleaved: the first three slots are in three different regions.
        let region_of = |x: u64| layout.iter().position(|r| r.gpa <= x && x < r.end());
        assert_ne!(region_of(p.slots[0]), region_of(p.slots[1]));
        assert_ne!(region_of(p.slots[1]), region_of(p.slots[2]));
        assert!(!p.hot_slots.is_empty());
        assert!(p.max_gpa_end() >= hot.end());
        // Too small a first region is a clear error.
        assert!(plan(
            Device::Blk,
            &[RegionSpec::new(0, 256 << 10)],
            4,
            256,
            false,
            128 << 10,
            false
        )
        .is_err());
        // Without isolation the used ring starts a page, as QueueLayout::new puts it.
        let p = plan(Device::Blk, &layout, 1, 256, false, 128 << 10, false).unwrap();
        assert_eq!(p.queues[0], QueueLayout::new(0, 256).unwrap());
    }

    #[test]
    fn net_used_rings_share_no_page_with_guest_writes() {
        let layout = default_layout(48 << 20, 3).unwrap();
        for qsize in [128u16, 256, 1024] {
            let p = plan(Device::Net, &layout, 4, qsize, true, 8192, false).unwrap();
            for l in &p.queues {
                let avail_last = (l.avail + QueueLayout::avail_bytes(qsize) - 1) >> 12;
                assert!(l.used >> 12 > avail_last, "{l:?}");
                assert_eq!((l.end() - 2) % 4096, 0, "{l:?}");
                assert_eq!(l.used % 4, 0);
            }
            for w in p.queues.windows(2) {
                assert!(w[0].end() <= w[1].desc);
            }
        }
        let p = plan(Device::Net, &layout, 2, 256, true, 8192, false).unwrap();
        let used = p.queues[1].used_pages();
        assert_eq!(p.page_kind(*used.start()), Some("tx-used-ring"));
        assert_eq!(
            p.page_kind(*p.queues[0].used_pages().end()),
            Some("rx-used-ring")
        );
        assert_eq!(p.page_kind(p.scratch[1] >> 12), Some("tx-buffer"));
    }

    #[test]
    fn page_kinds() {
        let layout = default_layout(48 << 20, 3).unwrap();
        let p = plan(Device::Blk, &layout, 2, 256, true, 128 << 10, false).unwrap();
        for l in &p.queues {
            for page in l.used_pages() {
                assert_eq!(p.page_kind(page), Some("used-ring"));
            }
        }
        for &s in &p.scratch {
            assert_eq!(p.page_kind(s >> LOG_PAGE_SHIFT), Some("status"));
            assert_eq!(
                p.page_kind((s + p.scratch_bytes - 1) >> LOG_PAGE_SHIFT),
                Some("status")
            );
        }
        for &x in &p.slots[..8] {
            assert_eq!(p.page_kind(x >> LOG_PAGE_SHIFT), None);
        }
        assert_eq!(p.page_kind(layout[1].gpa >> LOG_PAGE_SHIFT), None);
    }
}
