//! The virtio-net wire format, in one place for the device (`net`) and the guest driver
//! (`driver::net`).
//!
//! The structures are virtio-bindings' (`virtio_net_hdr_v1`, `virtio_net_config`) wrapped so
//! that vm-memory can read and write them byte-exact ([`ByteValued`]). Every multi-byte field
//! is little-endian on the wire (`VIRTIO_F_VERSION_1`); this crate only runs on little-endian
//! hosts (x86_64, aarch64), so the in-memory representation is the wire representation.
//!
//! Sizes in this module are bytes.

use virtio_bindings::virtio_net::{virtio_net_config, virtio_net_hdr_v1};
use vm_memory::ByteValued;

/// Size of the header in front of every frame with `VIRTIO_F_VERSION_1` or
/// `VIRTIO_NET_F_MRG_RXBUF` (`struct virtio_net_hdr_v1`, with `num_buffers`; virtio 1.2, 5.1.6).
pub const NET_HDR_SIZE: usize = std::mem::size_of::<NetHdr>();
/// Size of the legacy header without `num_buffers` (neither `VERSION_1` nor `MRG_RXBUF`;
/// virtio 1.2, 5.1.6.1 "Legacy Interface").
pub const NET_HDR_LEGACY_SIZE: usize = 10;
/// Ethernet header: destination and source MAC, EtherType (IEEE 802.3). A frame shorter than
/// this is a runt.
pub const ETH_HLEN: usize = 14;
/// Largest frame (without the virtio-net header) either direction carries: a 64 KiB GSO
/// packet (IP total length 65,535) plus Ethernet and VLAN headers, as QEMU's
/// `NET_BUFSIZE` / Linux's `GSO_MAX_SIZE` allow. Longer frames are counted and dropped.
pub const MAX_FRAME_LEN: usize = 65_550;
/// Offset of `status` in the config space.
pub const CONFIG_STATUS_OFFSET: usize = 6;
/// Offset of `max_virtqueue_pairs` in the config space.
pub const CONFIG_MAX_PAIRS_OFFSET: usize = 8;
/// Offset of `mtu` in the config space.
pub const CONFIG_MTU_OFFSET: usize = 10;

/// The header in front of every frame (`struct virtio_net_hdr_v1`, 12 bytes).
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct NetHdr(pub virtio_net_hdr_v1);

// SAFETY: `virtio_net_hdr_v1` is `repr(C)`: u8, u8, u16, u16, a union of two u16 pairs, u16;
// 12 bytes without padding, and every bit pattern is a valid value.
unsafe impl ByteValued for NetHdr {}

impl NetHdr {
    /// A receive header: no offload flags, `GSO_NONE`, and `num_buffers` (the number of
    /// mergeable buffers the frame spans; 1 without `MRG_RXBUF`).
    pub fn rx(num_buffers: u16) -> Self {
        NetHdr(virtio_net_hdr_v1 {
            num_buffers: num_buffers.to_le(),
            ..Default::default()
        })
    }
    /// `num_buffers`.
    pub fn num_buffers(&self) -> u16 {
        u16::from_le(self.0.num_buffers)
    }
}

/// The device config space (`struct virtio_net_config`, 24 bytes): MAC, status,
/// `max_virtqueue_pairs`, `mtu`, and the speed / duplex / RSS fields this device leaves zero.
#[repr(transparent)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NetConfigSpace(pub virtio_net_config);

// SAFETY: `virtio_net_config` is `repr(C, packed)`-equivalent (alignment 1, 24 bytes, fields
// of u8 arrays and little-endian integers) and every bit pattern is a valid value.
unsafe impl ByteValued for NetConfigSpace {}

/// Header size for the negotiated features: [`NET_HDR_SIZE`] with `VERSION_1` or
/// `MRG_RXBUF`, else [`NET_HDR_LEGACY_SIZE`] (virtio 1.2, 5.1.6.1).
pub fn hdr_size(version_1: bool, mrg_rxbuf: bool) -> usize {
    if version_1 || mrg_rxbuf {
        NET_HDR_SIZE
    } else {
        NET_HDR_LEGACY_SIZE
    }
}

/// Parses a MAC address written as six colon-separated hex bytes (`52:54:00:12:34:56`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_byte_exact() {
        assert_eq!(NET_HDR_SIZE, 12);
        assert_eq!(std::mem::size_of::<NetConfigSpace>(), 24);
        let h = NetHdr::rx(3);
        assert_eq!(h.as_slice(), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]);
        let c = NetConfigSpace(virtio_net_config {
            mac: [1, 2, 3, 4, 5, 6],
            status: 1u16.to_le(),
            max_virtqueue_pairs: 4u16.to_le(),
            mtu: 1500u16.to_le(),
            ..Default::default()
        });
        let b = c.as_slice();
        assert_eq!(&b[0..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&b[CONFIG_STATUS_OFFSET..][..2], &[1, 0]);
        assert_eq!(&b[CONFIG_MAX_PAIRS_OFFSET..][..2], &[4, 0]);
        assert_eq!(&b[CONFIG_MTU_OFFSET..][..2], &1500u16.to_le_bytes());
        assert_eq!(hdr_size(false, false), 10);
        assert_eq!(hdr_size(true, false), 12);
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        );
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:ef:01"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:xyz"), None);
    }
}
