//! The virtio-blk wire format, in one place for the device (`blk`) and the guest driver
//! (`driver::blk`).
//!
//! The structures are virtio-bindings' (`virtio_blk_outhdr`, `virtio_blk_discard_write_zeroes`,
//! `virtio_blk_config`) wrapped so that vm-memory can read and write them byte-exact
//! ([`ByteValued`]); the constants are virtio 1.2 section 5.2 ("Block Device") values that
//! virtio-bindings does not name. Every multi-byte field is little-endian on the wire
//! (`VIRTIO_F_VERSION_1`); this crate only runs on little-endian hosts (x86_64, aarch64), so the
//! in-memory representation is the wire representation.
//!
//! Units: `sector` fields and `capacity` count 512-byte sectors ([`SECTOR_SIZE`]) whatever the
//! device's logical block size; sizes in this module are bytes.

use virtio_bindings::virtio_blk::{
    virtio_blk_config, virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_ID_BYTES,
};
use vm_memory::ByteValued;

/// Bytes per virtio-blk sector; `sector` fields and `capacity` count in this unit
/// (virtio 1.2, 5.2.6: "the sector number indicates the offset (multiplied by 512)").
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size in bytes of the request header ([`OutHdr`], `struct virtio_blk_outhdr`).
pub const HEADER_SIZE: u32 = std::mem::size_of::<OutHdr>() as u32;
/// Size in bytes of one discard / write-zeroes segment ([`DiscardWriteZeroes`]).
pub const SEGMENT_SIZE: u32 = std::mem::size_of::<DiscardWriteZeroes>() as u32;
/// Length in bytes of the `VIRTIO_BLK_T_GET_ID` answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Offset in bytes of the `wce` (writeback cache enable) byte in the config space, the one
/// field a driver writes (virtio 1.2, 5.2.4: `struct virtio_blk_config`).
pub const CONFIG_WCE_OFFSET: u32 = 32;

/// The request header a driver puts first in every chain (`struct virtio_blk_outhdr`, 16 bytes).
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy)]
pub struct OutHdr(pub virtio_blk_outhdr);

// SAFETY: `virtio_blk_outhdr` is `repr(C)` with fields u32, u32, u64 (no padding) and every
// bit pattern is a valid value.
unsafe impl ByteValued for OutHdr {}

impl OutHdr {
    /// A header for request type `req_type` (`VIRTIO_BLK_T_*`) at 512-byte sector `sector`.
    pub fn new(req_type: u32, sector: u64) -> Self {
        OutHdr(virtio_blk_outhdr {
            type_: req_type,
            ioprio: 0,
            sector,
        })
    }
    /// The request type (`VIRTIO_BLK_T_*`).
    pub fn req_type(&self) -> u32 {
        self.0.type_
    }
    /// The first 512-byte sector of the request.
    pub fn sector(&self) -> u64 {
        self.0.sector
    }
}

/// One range of a discard or write-zeroes request (`struct virtio_blk_discard_write_zeroes`,
/// 16 bytes).
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DiscardWriteZeroes(pub virtio_blk_discard_write_zeroes);

// SAFETY: `virtio_blk_discard_write_zeroes` is `repr(C)` with fields u64, u32, u32 (no padding)
// and every bit pattern is a valid value.
unsafe impl ByteValued for DiscardWriteZeroes {}

impl DiscardWriteZeroes {
    /// A range of `num_sectors` 512-byte sectors from `sector`, with `flags`
    /// (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` = 1 is the only one defined).
    pub fn new(sector: u64, num_sectors: u32, flags: u32) -> Self {
        DiscardWriteZeroes(virtio_blk_discard_write_zeroes {
            sector,
            num_sectors,
            flags,
        })
    }
    /// First 512-byte sector.
    pub fn sector(&self) -> u64 {
        self.0.sector
    }
    /// Number of 512-byte sectors.
    pub fn num_sectors(&self) -> u32 {
        self.0.num_sectors
    }
    /// Flags (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`).
    pub fn flags(&self) -> u32 {
        self.0.flags
    }
}

/// The virtio-blk config space, byte-exact (`struct virtio_blk_config`, 96 bytes).
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct BlkConfigSpace(pub virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` and made only of integers and arrays of
// integers, so it has no padding and every bit pattern is a valid value.
unsafe impl ByteValued for BlkConfigSpace {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_sizes_match_the_spec() {
        assert_eq!(HEADER_SIZE, 16);
        assert_eq!(SEGMENT_SIZE, 16);
        assert_eq!(std::mem::size_of::<BlkConfigSpace>(), 96);
        assert_eq!(ID_BYTES, 20);
        assert_eq!(1u64 << SECTOR_SHIFT, SECTOR_SIZE);
    }

    #[test]
    fn header_bytes_are_little_endian_type_ioprio_sector() {
        let h = OutHdr::new(8, 0x0102_0304_0506_0708);
        let b = h.as_slice();
        assert_eq!(&b[0..4], &8u32.to_le_bytes());
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        let s = DiscardWriteZeroes::new(7, 9, 1);
        assert_eq!(s.as_slice()[8..12], 9u32.to_le_bytes());
        assert_eq!(s.as_slice()[12..16], 1u32.to_le_bytes());
    }

    #[test]
    fn wce_offset_is_the_wce_field() {
        let mut c = BlkConfigSpace::default();
        c.0.wce = 1;
        assert_eq!(c.as_slice()[CONFIG_WCE_OFFSET as usize], 1);
    }
}
