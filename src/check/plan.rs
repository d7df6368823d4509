//! Parsing of sizes, durations and layouts, and the guest-memory plan: where the rings, the
//! request scratch areas and the data buffers go, and which regions the memory-table fault adds
//! and removes.

use std::time::Duration;

use super::{CheckError, Fault};
use crate::driver::blk::BlkQueue;
use crate::driver::{QueueLayout, RegionSpec};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Parses a size: a number with an optional binary suffix `K`, `M`, `G`, `T` (`KiB`, `MB`...
/// are accepted too; all are powers of 1024), or a `0x` hexadecimal number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).map_err(|e| format!("invalid size {s:?}: {e}"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 4096, 64K, 256M, 1G"))?;
    let mult = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => KIB,
        "M" | "MB" | "MIB" => MIB,
        "G" | "GB" | "GIB" => GIB,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("invalid size suffix in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Parses a duration: a number with `ms`, `s`, `m` (default seconds), e.g. `500ms`, `3s`, `1.5`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 3s, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => v,
        "ms" => v / 1000.0,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    if !(0.0..=1e7).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `GPA:SIZE[,GPA:SIZE...]`, e.g. `0:64M,1G:64M,4G:32M`.
pub fn parse_layout(s: &str) -> Result<Vec<RegionSpec>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (g, z) = part
            .split_once(':')
            .ok_or_else(|| format!("layout entry {part:?} is not GPA:SIZE"))?;
        out.push(RegionSpec::new(parse_size(g)?, parse_size(z)?));
    }
    if out.is_empty() {
        return Err("empty layout".into());
    }
    Ok(out)
}

/// `regions` regions totalling `total` bytes (1 MiB multiples), each starting at the next
/// 1 GiB boundary after the previous one ends, so every pair is separated by a hole.
pub fn default_layout(total: u64, regions: u32) -> Result<Vec<RegionSpec>, String> {
    if regions == 0 {
        return Err("--regions must be at least 1".into());
    }
    let each = total / u64::from(regions) / MIB * MIB;
    if each == 0 {
        return Err(format!(
            "{total} bytes of RAM cannot be split into {regions} regions of at least 1 MiB"
        ));
    }
    let mut out = Vec::new();
    let mut gpa = 0u64;
    for i in 0..regions {
        let size = if i + 1 == regions {
            (total - each * u64::from(regions - 1)) / MIB * MIB
        } else {
            each
        };
        out.push(RegionSpec::new(gpa, size));
        gpa = (gpa + size + 1).next_multiple_of(GIB);
    }
    Ok(out)
}

/// Where everything lives in guest memory.
#[derive(Debug, Clone)]
pub(crate) struct MemPlan {
    /// The RAM at start (sorted), including `spare`.
    pub regions: Vec<RegionSpec>,
    /// One layout per queue.
    pub queues: Vec<QueueLayout>,
    /// Scratch area (headers, status bytes) per queue.
    pub scratch: Vec<u64>,
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
/// update on the same page.
fn queue_layout(at: u64, qsize: u16, isolate_event: bool) -> Result<QueueLayout, CheckError> {
    let l = QueueLayout::new(at, qsize).map_err(|e| CheckError::Invalid(e.to_string()))?;
    if !isolate_event {
        return Ok(l);
    }
    // flags, idx, ring[N]: everything before avail_event.
    let ring = 4 + 8 * u64::from(qsize);
    let avail_end = l.avail + QueueLayout::avail_bytes(qsize);
    let used = (avail_end + ring).next_multiple_of(4096) - ring;
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
/// scratch areas and data slots of `slot` bytes in `layout`; adds the spare and hot regions
/// when `faults` includes the memory-table fault.
pub(crate) fn plan(
    layout: &[RegionSpec],
    nq: u16,
    qsize: u16,
    isolate_event: bool,
    slot: u64,
    faults: &[Fault],
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
        let l = queue_layout(at, qsize, isolate_event)?;
        queues.push(l);
        at = l.end().next_multiple_of(4096);
    }
    let mut scratch = Vec::new();
    for _ in 0..nq {
        scratch.push(at);
        at = (at + BlkQueue::scratch_bytes(qsize)).next_multiple_of(4096);
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
    if faults.contains(&Fault::MemTable) {
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
        regions,
        queues,
        scratch,
        slots,
        slot,
        spare,
        hot,
        hot_slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_layouts() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("3h").is_err());
        assert_eq!(
            parse_layout("0:64M,1G:32M").unwrap(),
            vec![
                RegionSpec::new(0, 64 << 20),
                RegionSpec::new(1 << 30, 32 << 20)
            ]
        );
        assert!(parse_layout("0-64M").is_err());
    }

    #[test]
    fn default_layout_has_holes() {
        let l = default_layout(96 << 20, 3).unwrap();
        assert_eq!(
            l,
            vec![
                RegionSpec::new(0, 32 << 20),
                RegionSpec::new(1 << 30, 32 << 20),
                RegionSpec::new(2 << 30, 32 << 20)
            ]
        );
        assert!(default_layout(1 << 20, 3).is_err());
        assert!(default_layout(64 << 20, 0).is_err());
    }

    #[test]
    fn plan_places_everything_without_overlap() {
        let layout = default_layout(48 << 20, 3).unwrap();
        let p = plan(&layout, 2, 256, true, 128 << 10, &[Fault::MemTable]).unwrap();
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
            &[RegionSpec::new(0, 256 << 10)],
            4,
            256,
            false,
            128 << 10,
            &[]
        )
        .is_err());
        // Without isolation the used ring starts a page, as QueueLayout::new puts it.
        let p = plan(&layout, 1, 256, false, 128 << 10, &[]).unwrap();
        assert_eq!(p.queues[0], QueueLayout::new(0, 256).unwrap());
    }
}
