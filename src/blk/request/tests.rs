//! Unit tests of the request parser ([`super::parse_chain`]): hand-built descriptor chains
//! over a small guest memory, one test per layout rule and per error the parser must report.
//!
//! Separate from `request.rs` so the parser itself stays short enough to read in one go; the
//! tests are a child module and see the parser's private helpers through `super::*`.

use super::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestMemoryMmap;

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x10000)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity: 64,
        ..Limits::default()
    }
}

fn hdr(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&t.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&b, GuestAddress(at)).unwrap();
}

fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, 0)
}

#[test]
fn read_request() {
    let m = mem();
    hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 2);
    let r = parse_descriptors(
        [d(0x1000, 16, N), d(0x2000, 1024, W | N), d(0x3000, 1, W)],
        &m,
        &limits(),
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::Read);
    assert_eq!(r.sector, 2);
    assert_eq!(r.data_len, 1024);
    assert_eq!(r.status, GuestAddress(0x3000));
}

#[test]
fn split_header_and_combined_status() {
    let m = mem();
    hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
    // Header split 10 + 6 across descriptors; data and status share the last descriptor.
    let r = parse_descriptors(
        [d(0x1000, 10, N), d(0x100a, 6, N), d(0x2000, 513, W)],
        &m,
        &limits(),
    )
    .unwrap();
    assert_eq!(r.sector, 1);
    assert_eq!(
        r.data,
        vec![Segment {
            addr: GuestAddress(0x2000),
            len: 512
        }]
    );
    assert_eq!(r.status, GuestAddress(0x2200));
}

#[test]
fn errors() {
    let m = mem();
    let l = limits();
    hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    // No status (last descriptor readable).
    let e = parse_descriptors([d(0x1000, 16, N), d(0x2000, 512, 0)], &m, &l).unwrap_err();
    assert_eq!(e.status, None);
    // Short header.
    let e = parse_descriptors([d(0x1000, 8, N), d(0x3000, 1, W)], &m, &l).unwrap_err();
    assert_eq!(e.reason, ErrorReason::ShortHeader);
    assert_eq!(e.status, Some(GuestAddress(0x3000)));
    assert_eq!(e.status_code(), VIRTIO_BLK_S_IOERR as u8);
    // Out of range.
    hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 63);
    let e = parse_descriptors(
        [d(0x1000, 16, N), d(0x2000, 1024, W | N), d(0x3000, 1, W)],
        &m,
        &l,
    )
    .unwrap_err();
    assert_eq!(e.reason, ErrorReason::OutOfRange);
    // Overflow.
    hdr(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX / 256);
    let e = parse_descriptors(
        [d(0x1000, 16, N), d(0x2000, 512, W | N), d(0x3000, 1, W)],
        &m,
        &l,
    )
    .unwrap_err();
    assert_eq!(e.reason, ErrorReason::Overflow);
    // Unsupported type.
    hdr(&m, 0x1000, 77, 0);
    let e = parse_descriptors([d(0x1000, 16, N), d(0x3000, 1, W)], &m, &l).unwrap_err();
    assert_eq!(e.status_code(), VIRTIO_BLK_S_UNSUPP as u8);
    // Data outside memory.
    hdr(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
    let e = parse_descriptors(
        [d(0x1000, 16, N), d(0x10_0000, 512, W | N), d(0x3000, 1, W)],
        &m,
        &l,
    )
    .unwrap_err();
    assert_eq!(e.reason, ErrorReason::BadAddress);
    // Readable after writable.
    let e = parse_descriptors(
        [d(0x1000, 16, N), d(0x3000, 1, W | N), d(0x2000, 512, N)],
        &m,
        &l,
    )
    .unwrap_err();
    assert_eq!(e.status, None);
    // Read-only write.
    hdr(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
    let ro = Limits {
        read_only: true,
        ..l
    };
    let e = parse_descriptors(
        [d(0x1000, 16, N), d(0x2000, 512, N), d(0x3000, 1, W)],
        &m,
        &ro,
    )
    .unwrap_err();
    assert_eq!(e.reason, ErrorReason::ReadOnly);
    // Empty chain.
    let e = parse_descriptors([], &m, &l).unwrap_err();
    assert_eq!(e.reason, ErrorReason::EmptyChain);
}

#[test]
fn discard_segments() {
    let m = mem();
    let l = limits();
    hdr(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
    let seg = DiscardWriteZeroes::new(8, 8, 0);
    m.write_obj(seg, GuestAddress(0x1010)).unwrap();
    let r = parse_descriptors([d(0x1000, 32, N), d(0x3000, 1, W)], &m, &l).unwrap();
    assert_eq!(
        r.kind,
        RequestKind::Discard(vec![SectorRange {
            sector: 8,
            num_sectors: 8,
            unmap: false
        }])
    );
    // Unmap flag on discard: UNSUPP.
    m.write_obj(DiscardWriteZeroes::new(8, 8, 1), GuestAddress(0x1010))
        .unwrap();
    let e = parse_descriptors([d(0x1000, 32, N), d(0x3000, 1, W)], &m, &l).unwrap_err();
    assert_eq!(e.status_code(), VIRTIO_BLK_S_UNSUPP as u8);
    // Partial segment.
    let e = parse_descriptors([d(0x1000, 30, N), d(0x3000, 1, W)], &m, &l).unwrap_err();
    assert_eq!(e.reason, ErrorReason::BadSegments);
    // Past the end.
    m.write_obj(DiscardWriteZeroes::new(60, 8, 0), GuestAddress(0x1010))
        .unwrap();
    let e = parse_descriptors([d(0x1000, 32, N), d(0x3000, 1, W)], &m, &l).unwrap_err();
    assert_eq!(e.reason, ErrorReason::OutOfRange);
}

#[test]
fn get_id_needs_20_bytes() {
    let m = mem();
    hdr(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
    let e = parse_descriptors(
        [d(0x1000, 16, N), d(0x2000, 19, W | N), d(0x3000, 1, W)],
        &m,
        &limits(),
    )
    .unwrap_err();
    assert_eq!(e.reason, ErrorReason::ShortIdBuffer);
    let r = parse_descriptors(
        [d(0x1000, 16, N), d(0x2000, 20, W | N), d(0x3000, 1, W)],
        &m,
        &limits(),
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::GetId);
}
