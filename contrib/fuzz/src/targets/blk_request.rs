//! `blk_request`: arbitrary descriptor chains and request headers into the virtio-blk request
//! parser (`vhost_dirtylog::blk::request::parse_descriptors`), over a small guest memory of
//! three regions (two adjacent, one after a hole).
//!
//! The input chooses the device limits (capacity, `seg_max`, read-only, discard and
//! write-zeroes limits), the header (type, sector) and discard/write-zeroes segments, which are
//! written into guest memory through the chain's device-readable buffers (so headers split
//! across descriptors happen), and the descriptors themselves (addresses inside, across and
//! outside guest memory, any length and direction, optionally thousands of them).
//!
//! Checks:
//! - no panic, whatever the chain;
//! - an accepted request satisfies the parser's documented invariants: every data segment is
//!   non-empty, inside guest memory and inside a chain buffer of the right direction; the
//!   status byte is the last byte of the last device-writable buffer; `Read`/`Write` lie within
//!   the disk (`sector * 512 + data_len <= capacity * 512`, computed without overflow), with a
//!   multiple of 512 bytes and at most `seg_max` segments; discard/write-zeroes ranges lie
//!   within the disk and the per-segment limits;
//! - a refusal reports a status address only when the chain has a valid one;
//! - for chains without zero-length descriptors, a straightforward reading of the virtio-blk
//!   rules (`reference`) accepts exactly the chains the parser accepts, with the same type,
//!   sector, data length, status address and ranges.

use arbitrary::{Arbitrary, Unstructured};
use vhost_dirtylog::blk::request::{
    parse_descriptors, Limits, Request, RequestError, RequestKind, SectorRange, Segment,
    MAX_CHAIN_DESCRIPTORS,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Reached;

const VRING_DESC_F_WRITE: u16 = 2;
const MAX_DESCS: usize = 24;
/// Guest memory: (start, length).
const REGIONS: [(u64, u64); 3] = [(0, 0x10000), (0x10000, 0x8000), (0x20000, 0x10000)];

/// One fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Device limits.
    pub limits: LimitsIn,
    /// Request type.
    pub req_type: ReqType,
    /// `ioprio` header field.
    pub ioprio: u32,
    /// Header sector.
    pub sector: Sector,
    /// Discard / write-zeroes segments written after the header.
    pub segments: Vec<SegIn>,
    /// Extra bytes written after the segments.
    pub trailer: Vec<u8>,
    /// The chain.
    pub descs: Vec<DescIn>,
    /// Copies of the last descriptor appended (reduced; makes very long chains).
    pub pad: u16,
}

/// Device limits.
#[derive(Arbitrary, Debug)]
pub struct LimitsIn {
    /// Capacity in sectors.
    pub capacity: Sector,
    /// `seg_max`.
    pub seg_max: u8,
    /// Read-only device.
    pub read_only: bool,
    /// DISCARD offered.
    pub discard: bool,
    /// WRITE_ZEROES offered.
    pub write_zeroes: bool,
    /// Per-segment sector limits.
    pub max_sectors: (u32, u32),
    /// Segment count limits.
    pub max_segs: (u8, u8),
}

/// A request type.
#[derive(Arbitrary, Debug)]
pub enum ReqType {
    /// `IN`.
    In,
    /// `OUT`.
    Out,
    /// `FLUSH`.
    Flush,
    /// `GET_ID`.
    GetId,
    /// `DISCARD`.
    Discard,
    /// `WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else.
    Other(u32),
}

/// A sector number or count.
#[derive(Arbitrary, Debug)]
pub enum Sector {
    /// Small.
    Small(u16),
    /// Near 2^64 / 512 and other overflow edges.
    Huge(u8),
    /// Anything.
    Raw(u64),
}

/// A discard / write-zeroes segment.
#[derive(Arbitrary, Debug)]
pub struct SegIn {
    /// First sector.
    pub sector: Sector,
    /// Sector count.
    pub num: u32,
    /// Flags (mostly 0 or UNMAP).
    pub flags: Flags,
}

/// Segment flags.
#[derive(Arbitrary, Debug)]
pub enum Flags {
    /// 0.
    None,
    /// UNMAP.
    Unmap,
    /// Anything.
    Raw(u32),
}

/// A descriptor.
#[derive(Arbitrary, Debug)]
pub struct DescIn {
    /// Buffer address.
    pub addr: Addr,
    /// Buffer length.
    pub len: DescLen,
    /// Device-writable.
    pub write: bool,
}

/// A buffer address.
#[derive(Arbitrary, Debug)]
pub enum Addr {
    /// Inside region `region % 3`, at `offset` (reduced).
    In {
        /// Region.
        region: u8,
        /// Offset.
        offset: u16,
    },
    /// `back` bytes before the end of region `region % 3`.
    End {
        /// Region.
        region: u8,
        /// Distance from the end.
        back: u8,
    },
    /// Anything.
    Raw(u64),
}

/// A buffer length.
#[derive(Arbitrary, Debug)]
pub enum DescLen {
    /// Small (headers, status bytes).
    Small(u8),
    /// `n` sectors plus `extra` bytes (`extra` reduced to 0..=16).
    Sectors {
        /// Sectors.
        n: u8,
        /// Extra bytes.
        extra: u8,
    },
    /// Anything.
    Raw(u32),
}

fn sector(s: &Sector, capacity: u64) -> u64 {
    match *s {
        Sector::Small(v) => v as u64,
        Sector::Huge(k) => match k % 4 {
            0 => u64::MAX / 512 - (k as u64 >> 2),
            1 => u64::MAX - (k as u64 >> 2),
            2 => capacity.saturating_sub(k as u64 >> 2),
            _ => capacity.saturating_add(k as u64 >> 2),
        },
        Sector::Raw(v) => v,
    }
}

/// Decodes `data` and runs it.
pub fn run(data: &[u8]) -> Reached {
    match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => exec(&input),
        Err(_) => Reached::default(),
    }
}

fn memory() -> GuestMemoryMmap<()> {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("small anonymous guest memory")
}

fn in_memory(mem: &GuestMemoryMmap<()>, addr: u64, len: u64) -> bool {
    // Reference check, independent of the parser's: every byte lies in some region.
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let _ = mem;
    let mut a = addr;
    while a < end {
        match REGIONS.iter().find(|&&(s, l)| a >= s && a < s + l) {
            Some(&(s, l)) => a = s + l,
            None => return false,
        }
    }
    true
}

/// Runs one input.
pub fn exec(input: &Input) -> Reached {
    exec_with(input, false)
}

/// Runs one input. With `shrink_disk`, an accepted read or write with data is checked against
/// a disk one sector smaller than the one it was parsed for (a negative control: the checks
/// must then fail).
pub fn exec_with(input: &Input, shrink_disk: bool) -> Reached {
    let mut reached = Reached::default();
    let mem = memory();
    let cap = match input.limits.capacity {
        Sector::Small(v) => v as u64,
        Sector::Huge(k) => u64::MAX >> (k % 64),
        Sector::Raw(v) => v,
    };
    let limits = Limits {
        capacity: cap,
        seg_max: input.limits.seg_max as u32,
        read_only: input.limits.read_only,
        discard: input.limits.discard,
        write_zeroes: input.limits.write_zeroes,
        max_discard_sectors: input.limits.max_sectors.0,
        max_discard_seg: input.limits.max_segs.0 as u32,
        max_write_zeroes_sectors: input.limits.max_sectors.1,
        max_write_zeroes_seg: input.limits.max_segs.1 as u32,
    };

    let mut descs: Vec<Descriptor> = input
        .descs
        .iter()
        .take(MAX_DESCS)
        .map(|d| {
            let addr = match d.addr {
                Addr::In { region, offset } => {
                    let (s, l) = REGIONS[region as usize % 3];
                    s + offset as u64 % l
                }
                Addr::End { region, back } => {
                    let (s, l) = REGIONS[region as usize % 3];
                    s + l - (back as u64).min(l)
                }
                Addr::Raw(r) => r,
            };
            let len = match d.len {
                DescLen::Small(v) => v as u32,
                DescLen::Sectors { n, extra } => n as u32 * 512 + (extra % 17) as u32,
                DescLen::Raw(r) => r,
            };
            let flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    if let Some(&last) = descs.last() {
        let pad = input.pad as usize % (MAX_CHAIN_DESCRIPTORS + 100);
        if pad > 64 {
            reached.hit("long-chain");
        }
        descs.extend(std::iter::repeat_n(last, pad));
    }

    // The readable stream: header, segments, trailer, written through the readable buffers.
    let req_type = match input.req_type {
        ReqType::In => VIRTIO_BLK_T_IN,
        ReqType::Out => VIRTIO_BLK_T_OUT,
        ReqType::Flush => VIRTIO_BLK_T_FLUSH,
        ReqType::GetId => VIRTIO_BLK_T_GET_ID,
        ReqType::Discard => VIRTIO_BLK_T_DISCARD,
        ReqType::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
        ReqType::Other(t) => t,
    };
    let mut stream = Vec::new();
    stream.extend_from_slice(&req_type.to_le_bytes());
    stream.extend_from_slice(&input.ioprio.to_le_bytes());
    stream.extend_from_slice(&sector(&input.sector, cap).to_le_bytes());
    for s in input.segments.iter().take(8) {
        stream.extend_from_slice(&sector(&s.sector, cap).to_le_bytes());
        stream.extend_from_slice(&s.num.to_le_bytes());
        let flags = match s.flags {
            Flags::None => 0,
            Flags::Unmap => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            Flags::Raw(f) => f,
        };
        stream.extend_from_slice(&flags.to_le_bytes());
    }
    stream.extend_from_slice(&input.trailer[..input.trailer.len().min(64)]);
    let mut pos = 0usize;
    for d in descs.iter().take(MAX_DESCS) {
        if d.is_write_only() || pos >= stream.len() {
            continue;
        }
        let n = (d.len() as usize).min(stream.len() - pos);
        if in_memory(&mem, d.addr().0, n as u64) {
            mem.write_slice(&stream[pos..pos + n], d.addr()).unwrap();
        }
        pos += n;
    }

    let got = parse_descriptors(descs.iter().copied(), &mem, &limits);
    match &got {
        Ok(req) => {
            let mut check_limits = limits;
            if matches!(req.kind, RequestKind::Read | RequestKind::Write) && req.data_len > 0 {
                reached.hit("ok-rw-data");
                if shrink_disk {
                    check_limits.capacity = (req.offset() + req.data_len) / 512 - 1;
                }
            }
            check_accepted(req, &descs, &mem, &check_limits);
            reached.hit(match req.kind {
                RequestKind::Read => "ok-read",
                RequestKind::Write => "ok-write",
                RequestKind::Flush => "ok-flush",
                RequestKind::GetId => "ok-get-id",
                RequestKind::Discard(_) => "ok-discard",
                RequestKind::WriteZeroes(_) => "ok-write-zeroes",
            });
            if req.data.len() > 1 {
                reached.hit("ok-multi-segment");
            }
        }
        Err(e) => {
            check_refused(e, &descs, &mem);
            reached.hit("refused");
        }
    }
    if descs.iter().all(|d| d.len() > 0) {
        let want = reference(&descs, &mem, &limits);
        match (&got, &want) {
            (Ok(req), Ok(r)) => {
                assert_eq!(req.kind, r.kind, "request kind");
                assert_eq!(req.sector, r.sector, "sector");
                assert_eq!(req.data_len, r.data_len, "data length");
                assert_eq!(req.status, r.status, "status address");
                reached.hit("reference-agrees-ok");
            }
            (Err(_), Err(_)) => reached.hit("reference-agrees-err"),
            (got, want) => panic!(
                "parser and reference disagree:\n parser:    {got:?}\n reference: {want:?}\n limits: {limits:?}\n chain: {:?}",
                descs.iter().take(32).map(|d| (d.addr().0, d.len(), d.is_write_only())).collect::<Vec<_>>()
            ),
        }
    }
    reached
}

/// `(sector * 512 + len) <= capacity * 512`, in exact arithmetic, with the end representable.
fn within_disk(sector: u64, len: u64, capacity: u64) -> bool {
    let end = sector as u128 * 512 + len as u128;
    end <= (capacity as u128 * 512).min(u64::MAX as u128)
}

fn check_accepted(req: &Request, descs: &[Descriptor], mem: &GuestMemoryMmap<()>, l: &Limits) {
    // Status: last byte of the last non-empty writable buffer, in memory.
    let last_w = descs
        .iter()
        .rev()
        .find(|d| d.len() > 0)
        .expect("an accepted chain has a non-empty buffer");
    assert!(last_w.is_write_only(), "status in a device-readable buffer");
    assert_eq!(
        req.status.0,
        last_w.addr().0 + last_w.len() as u64 - 1,
        "status must be the last byte of the chain"
    );
    assert!(in_memory(mem, req.status.0, 1), "status outside memory");
    // Data segments.
    let writable_data = matches!(req.kind, RequestKind::Read | RequestKind::GetId);
    let mut total = 0u64;
    for s in &req.data {
        assert!(s.len > 0, "empty data segment {s:?}");
        assert!(
            in_memory(mem, s.addr.0, s.len as u64),
            "segment {s:?} outside memory"
        );
        assert!(
            inside_some(s, descs, writable_data),
            "segment {s:?} is not inside a {} buffer",
            if writable_data {
                "writable"
            } else {
                "readable"
            }
        );
        if writable_data {
            let st = req.status.0;
            assert!(
                !(st >= s.addr.0 && st < s.addr.0 + s.len as u64) || overlapping(descs),
                "data segment {s:?} covers the status byte"
            );
        }
        total += s.len as u64;
    }
    assert_eq!(total, req.data_len, "data_len is the sum of the segments");
    match &req.kind {
        RequestKind::Read | RequestKind::Write => {
            assert_eq!(req.data_len % 512, 0, "partial sector");
            assert!(
                within_disk(req.sector, req.data_len, l.capacity),
                "request past the end of the disk: sector {} + {} bytes, capacity {}",
                req.sector,
                req.data_len,
                l.capacity
            );
            assert!(
                req.data.len() <= l.seg_max as usize,
                "more than seg_max segments"
            );
            assert!(
                !(l.read_only && req.kind == RequestKind::Write),
                "write on a read-only device"
            );
        }
        RequestKind::GetId => assert!(req.data_len >= 20, "short GET_ID buffer"),
        RequestKind::Flush => assert!(req.data.is_empty()),
        RequestKind::Discard(r) | RequestKind::WriteZeroes(r) => {
            let discard = matches!(req.kind, RequestKind::Discard(_));
            assert!(!l.read_only, "discard/write-zeroes on a read-only device");
            assert!(
                if discard { l.discard } else { l.write_zeroes },
                "not offered"
            );
            let (max_seg, max_sectors) = if discard {
                (l.max_discard_seg, l.max_discard_sectors)
            } else {
                (l.max_write_zeroes_seg, l.max_write_zeroes_sectors)
            };
            assert!(r.len() <= max_seg as usize, "too many ranges");
            for range in r {
                check_range(range, discard, max_sectors, l.capacity);
            }
        }
    }
}

fn check_range(r: &SectorRange, discard: bool, max_sectors: u32, capacity: u64) {
    assert!(r.num_sectors >= 1, "empty range {r:?}");
    assert!(r.num_sectors <= max_sectors, "range {r:?} above the limit");
    assert!(
        within_disk(r.sector, r.num_sectors as u64 * 512, capacity),
        "range {r:?} past the end of the disk ({capacity} sectors)"
    );
    assert!(!(discard && r.unmap), "unmap flag on a discard");
}

fn inside_some(s: &Segment, descs: &[Descriptor], writable: bool) -> bool {
    descs.iter().any(|d| {
        d.is_write_only() == writable
            && s.addr.0 >= d.addr().0
            && s.addr.0 as u128 + s.len as u128 <= d.addr().0 as u128 + d.len() as u128
    })
}

fn overlapping(descs: &[Descriptor]) -> bool {
    let nz: Vec<_> = descs.iter().filter(|d| d.len() > 0).collect();
    nz.iter().enumerate().any(|(i, a)| {
        nz.iter().skip(i + 1).any(|b| {
            let (a0, a1) = (a.addr().0 as u128, a.addr().0 as u128 + a.len() as u128);
            let (b0, b1) = (b.addr().0 as u128, b.addr().0 as u128 + b.len() as u128);
            a0 < b1 && b0 < a1
        })
    })
}

fn check_refused(e: &RequestError, descs: &[Descriptor], mem: &GuestMemoryMmap<()>) {
    if let Some(st) = e.status {
        let last = descs
            .iter()
            .rev()
            .find(|d| d.len() > 0)
            .expect("a status implies a non-empty buffer");
        assert!(
            last.is_write_only(),
            "status reported in a readable buffer: {e:?}"
        );
        assert_eq!(st.0, last.addr().0 + last.len() as u64 - 1, "{e:?}");
        assert!(in_memory(mem, st.0, 1), "status outside memory: {e:?}");
    }
    let _ = e.status_code();
}

/// What the reference reading of the rules accepts.
#[derive(Debug)]
struct Expected {
    kind: RequestKind,
    sector: u64,
    data_len: u64,
    status: GuestAddress,
}

/// The virtio-blk rules, read straightforwardly, for chains without zero-length buffers.
fn reference(descs: &[Descriptor], mem: &GuestMemoryMmap<()>, l: &Limits) -> Result<Expected, ()> {
    if descs.is_empty() || descs.len() > MAX_CHAIN_DESCRIPTORS {
        return Err(());
    }
    if descs
        .iter()
        .any(|d| !in_memory(mem, d.addr().0, d.len() as u64))
    {
        return Err(());
    }
    let first_w = descs.iter().position(|d| d.is_write_only()).ok_or(())?;
    if descs[first_w..].iter().any(|d| !d.is_write_only()) {
        return Err(());
    }
    let (r, w) = descs.split_at(first_w);
    let last = w.last().unwrap();
    let status = GuestAddress(last.addr().0 + last.len() as u64 - 1);
    let r_len: u64 = r.iter().map(|d| d.len() as u64).sum();
    let w_data: u64 = w.iter().map(|d| d.len() as u64).sum::<u64>() - 1;
    if r_len < 16 {
        return Err(());
    }
    // The readable stream, read back from memory.
    // (Only as much as the rules ever look at: the header and up to 255 segments.)
    let want = r_len.min(16 + 16 * 256) as usize;
    let mut bytes = Vec::new();
    for d in r {
        if bytes.len() >= want {
            break;
        }
        let mut b = vec![0u8; (d.len() as usize).min(want - bytes.len())];
        mem.read_slice(&mut b, d.addr()).unwrap();
        bytes.extend_from_slice(&b);
    }
    let t = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let payload = r_len - 16;
    let ok = |kind, sector, data_len| {
        Ok(Expected {
            kind,
            sector,
            data_len,
            status,
        })
    };
    match t {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let read = t == VIRTIO_BLK_T_IN;
            if !read && l.read_only {
                return Err(());
            }
            let (data, wrong) = if read {
                (w_data, payload)
            } else {
                (payload, w_data)
            };
            if wrong != 0 || data % 512 != 0 {
                return Err(());
            }
            let segs = if read {
                w.len() - usize::from(last.len() == 1)
            } else {
                // Readable buffers with bytes past the 16-byte header.
                let mut skip = 16u64;
                r.iter()
                    .filter(|d| {
                        let len = d.len() as u64;
                        let has = len > skip;
                        skip = skip.saturating_sub(len);
                        has
                    })
                    .count()
            };
            if segs > l.seg_max as usize || !within_disk(sector, data, l.capacity) {
                return Err(());
            }
            ok(
                if read {
                    RequestKind::Read
                } else {
                    RequestKind::Write
                },
                sector,
                data,
            )
        }
        VIRTIO_BLK_T_FLUSH if payload == 0 && w_data == 0 => ok(RequestKind::Flush, 0, 0),
        VIRTIO_BLK_T_GET_ID if payload == 0 && w_data >= 20 => ok(RequestKind::GetId, 0, w_data),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = t == VIRTIO_BLK_T_DISCARD;
            let (offered, max_seg, max_sectors) = if discard {
                (l.discard, l.max_discard_seg, l.max_discard_sectors)
            } else {
                (
                    l.write_zeroes,
                    l.max_write_zeroes_seg,
                    l.max_write_zeroes_sectors,
                )
            };
            if !offered || l.read_only || w_data != 0 {
                return Err(());
            }
            if payload == 0 || !payload.is_multiple_of(16) || payload / 16 > max_seg as u64 {
                return Err(());
            }
            let mut ranges = Vec::new();
            for seg in bytes[16..16 + payload as usize].chunks_exact(16) {
                let s = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let n = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                let f = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if f & !allowed != 0
                    || n > max_sectors
                    || !within_disk(s, n as u64 * 512, l.capacity)
                {
                    return Err(());
                }
                if n > 0 {
                    ranges.push(SectorRange {
                        sector: s,
                        num_sectors: n,
                        unmap: f != 0,
                    });
                }
            }
            ok(
                if discard {
                    RequestKind::Discard(ranges)
                } else {
                    RequestKind::WriteZeroes(ranges)
                },
                0,
                0,
            )
        }
        _ => Err(()),
    }
}
