//! A virtio-net guest driver over [`Connection`] and [`SplitQueue`]: negotiation, RX queues
//! with mergeable buffers, TX queues.
//!
//! - [`negotiate`]: the standard negotiation with what this driver handles (`VERSION_1`,
//!   `MRG_RXBUF`, `EVENT_IDX`, `INDIRECT_DESC`, `MAC`, `STATUS`, `MQ`, `MTU`; no offloads, no
//!   `LOG_ALL` — turned on later with [`Connection::set_log_all`]).
//! - [`RxQueue`]: `n` equal device-writable buffers in guest RAM, posted one descriptor each
//!   (mergeable RX buffers, as Linux posts them) and filled with [`POISON`] before posting, so a
//!   test sees exactly which bytes the device wrote. [`RxQueue::recv`] reassembles a frame from
//!   `num_buffers` used elements, insists they are all in the used ring when the first one is
//!   (the device must publish a frame's buffers together; Linux's `receive_mergeable` drops the
//!   frame otherwise) and re-posts the buffers.
//! - [`TxQueue`]: slots in guest RAM holding a 12-byte header and the frame; [`TxQueue::send`]
//!   puts one frame (header and frame in one descriptor, or split, as the caller asks) on the
//!   ring; [`TxQueue::reap`] collects completions.
//!
//! Queue `2 * p` is the RX queue of pair `p`, `2 * p + 1` its TX queue. Like the rest of the
//! toolkit it treats the backend as untrusted: nonsense from it is a [`DriverError`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

use super::{Buf, Connection, DriverError, GuestRam, QueueLayout, SplitQueue};
use crate::virtio_net::{NetHdr, NET_HDR_SIZE};

/// The byte RX buffers are filled with before they are posted.
pub const POISON: u8 = 0xE7;

/// Virtio features this driver handles (offered ∩ these are acked).
pub const DRIVER_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_MQ)
    | (1 << VIRTIO_NET_F_MTU);

/// Negotiates with the features of `want` ∩ [`DRIVER_FEATURES`] ∩ offered, and the protocol
/// features `MQ`, `LOG_SHMFD`, `REPLY_ACK`, `CONFIG`, `CONFIGURE_MEM_SLOTS` ∩ offered. Returns
/// the acked features.
pub fn negotiate(conn: &mut Connection, want: u64) -> Result<u64, DriverError> {
    conn.negotiate(
        want & DRIVER_FEATURES & !VhostUserVirtioFeatures::LOG_ALL.bits(),
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    )
}

/// The fields of the virtio-net config space this driver reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfigInfo {
    /// MAC address.
    pub mac: [u8; 6],
    /// `status` (`VIRTIO_NET_S_LINK_UP` = 1).
    pub status: u16,
    /// `max_virtqueue_pairs`.
    pub max_virtqueue_pairs: u16,
    /// `mtu`.
    pub mtu: u16,
}

impl NetConfigInfo {
    /// Parses the first 12 bytes of the config space (shorter input reads as zeroes).
    pub fn parse(bytes: &[u8]) -> Self {
        let mut b = [0u8; 12];
        let n = bytes.len().min(12);
        b[..n].copy_from_slice(&bytes[..n]);
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetConfigInfo {
            mac: [b[0], b[1], b[2], b[3], b[4], b[5]],
            status: w(6),
            max_virtqueue_pairs: w(8),
            mtu: w(10),
        }
    }
}

/// A received frame.
#[derive(Debug, Clone, PartialEq)]
pub struct RxFrame {
    /// The virtio-net header the device wrote.
    pub hdr: NetHdr,
    /// The frame (without the header).
    pub data: Vec<u8>,
    /// The buffers it arrived in: (guest-physical address, bytes the device said it wrote).
    pub bufs: Vec<(u64, u32)>,
}

/// An RX queue with mergeable buffers (see the module docs).
#[derive(Debug)]
pub struct RxQueue {
    vq: SplitQueue,
    base: u64,
    buf_len: u32,
    count: u16,
    hdr_len: usize,
}

impl RxQueue {
    /// A queue at `layout` with `count` buffers of `buf_len` bytes from guest-physical `base`.
    /// The driver needs `VERSION_1` (12-byte header).
    pub fn new(
        ram: Arc<GuestRam>,
        layout: QueueLayout,
        base: u64,
        buf_len: u32,
        count: u16,
        event_idx: bool,
    ) -> Result<Self, DriverError> {
        if count == 0 || count > layout.size || (buf_len as usize) < NET_HDR_SIZE {
            return Err(DriverError::Layout(format!(
                "{count} RX buffers of {buf_len} bytes on a queue of {}",
                layout.size
            )));
        }
        let bytes = u64::from(count) * u64::from(buf_len);
        ram.host_ptr(base, bytes)?;
        if base < layout.end() && layout.desc < base + bytes {
            return Err(DriverError::Layout("RX buffers overlap the queue".into()));
        }
        Ok(RxQueue {
            vq: SplitQueue::new(ram, layout, event_idx)?,
            base,
            buf_len,
            count,
            hdr_len: NET_HDR_SIZE,
        })
    }

    /// The underlying virtqueue (for `Connection::start_queue`).
    pub fn queue(&self) -> &SplitQueue {
        &self.vq
    }
    /// The underlying virtqueue, mutably.
    pub fn queue_mut(&mut self) -> &mut SplitQueue {
        &mut self.vq
    }
    /// Guest-physical address of buffer `i`.
    pub fn buf_gpa(&self, i: u16) -> u64 {
        self.base + u64::from(i) * u64::from(self.buf_len)
    }
    /// Bytes per buffer.
    pub fn buf_len(&self) -> u32 {
        self.buf_len
    }
    /// The guest-physical range of all buffers.
    pub fn area(&self) -> std::ops::Range<u64> {
        self.base..self.buf_gpa(self.count)
    }

    /// Fills buffer `i` with [`POISON`] and posts it (no kick).
    pub fn post(&mut self, i: u16) -> Result<(), DriverError> {
        let gpa = self.buf_gpa(i);
        self.vq.ram().fill(gpa, self.buf_len as usize, POISON)?;
        self.vq
            .add_chain(&[Buf::writable(gpa, self.buf_len)], u64::from(i))?;
        Ok(())
    }

    /// Posts every buffer and kicks.
    pub fn post_all(&mut self) -> Result<(), DriverError> {
        for i in 0..self.count {
            self.post(i)?;
        }
        self.vq.kick()
    }

    /// Waits up to `timeout` for the next frame, reassembles it from `num_buffers` buffers,
    /// checks the device's lengths, and re-posts the buffers (kicking if the device asks).
    pub fn recv(&mut self, timeout: Duration) -> Result<RxFrame, DriverError> {
        let first = self.vq.poll_used(timeout)?;
        self.take_frame(first)
    }

    /// Like [`recv`](Self::recv) without waiting: `None` if no frame is in the used ring.
    pub fn try_recv(&mut self) -> Result<Option<RxFrame>, DriverError> {
        match self.vq.pop_used()? {
            Some(e) => self.take_frame(e).map(Some),
            None => Ok(None),
        }
    }

    /// Receives `n` frames within `timeout` in total.
    pub fn recv_n(&mut self, n: usize, timeout: Duration) -> Result<Vec<RxFrame>, DriverError> {
        let deadline = Instant::now() + timeout;
        (0..n)
            .map(|_| self.recv(deadline.saturating_duration_since(Instant::now())))
            .collect()
    }

    fn take_frame(&mut self, first: super::UsedElem) -> Result<RxFrame, DriverError> {
        let ram = self.vq.ram().clone();
        let (base, buf_len) = (self.base, self.buf_len);
        let check = |e: &super::UsedElem| -> Result<u64, DriverError> {
            if e.len > buf_len {
                return Err(DriverError::Backend(format!(
                    "RX used length {} exceeds the {buf_len}-byte buffer",
                    e.len
                )));
            }
            Ok(base + e.token * u64::from(buf_len))
        };
        let gpa = check(&first)?;
        if (first.len as usize) < self.hdr_len {
            return Err(DriverError::Backend(format!(
                "RX used length {} is shorter than the header",
                first.len
            )));
        }
        let mut raw = [0u8; NET_HDR_SIZE];
        ram.read(gpa, &mut raw[..self.hdr_len])?;
        let hdr = NetHdr::from_slice(&raw)
            .copied()
            .ok_or_else(|| DriverError::Backend("header".into()))?;
        let n = hdr.num_buffers();
        if n == 0 || n > self.count {
            return Err(DriverError::Backend(format!("num_buffers {n}")));
        }
        let mut data =
            ram.read_vec(gpa + self.hdr_len as u64, first.len as usize - self.hdr_len)?;
        let mut bufs = vec![(gpa, first.len)];
        let mut elems = vec![first];
        for k in 1..n {
            // All of a frame's buffers are in the used ring once its first one is.
            let e = self.vq.pop_used()?.ok_or_else(|| {
                DriverError::Backend(format!(
                    "frame of {n} buffers published with only {k} in the used ring"
                ))
            })?;
            let g = check(&e)?;
            data.extend(ram.read_vec(g, e.len as usize)?);
            bufs.push((g, e.len));
            elems.push(e);
        }
        for e in &elems {
            self.post(e.token as u16)?;
        }
        self.vq.kick_if_needed()?;
        Ok(RxFrame { hdr, data, bufs })
    }
}

/// A TX queue (see the module docs): slot `i` at `base + i * slot_len` holds the header and
/// the frame.
#[derive(Debug)]
pub struct TxQueue {
    vq: SplitQueue,
    base: u64,
    slot_len: u32,
    free: Vec<u16>,
}

impl TxQueue {
    /// A queue at `layout` with one slot of `slot_len` bytes per queue entry from `base`.
    pub fn new(
        ram: Arc<GuestRam>,
        layout: QueueLayout,
        base: u64,
        slot_len: u32,
        event_idx: bool,
    ) -> Result<Self, DriverError> {
        let bytes = u64::from(layout.size) * u64::from(slot_len);
        ram.host_ptr(base, bytes)?;
        if base < layout.end() && layout.desc < base + bytes {
            return Err(DriverError::Layout("TX slots overlap the queue".into()));
        }
        Ok(TxQueue {
            vq: SplitQueue::new(ram, layout, event_idx)?,
            base,
            slot_len,
            free: (0..layout.size).rev().collect(),
        })
    }

    /// The underlying virtqueue (for `Connection::start_queue`).
    pub fn queue(&self) -> &SplitQueue {
        &self.vq
    }
    /// The underlying virtqueue, mutably.
    pub fn queue_mut(&mut self) -> &mut SplitQueue {
        &mut self.vq
    }
    /// Guest-physical address of slot `i`.
    pub fn slot_gpa(&self, i: u16) -> u64 {
        self.base + u64::from(i) * u64::from(self.slot_len)
    }

    /// Puts `frame` (behind a zero header) on the ring in one descriptor, or in two (header,
    /// frame) with `split`. No kick.
    pub fn send(&mut self, frame: &[u8], split: bool) -> Result<u16, DriverError> {
        let need = NET_HDR_SIZE + frame.len();
        if need > self.slot_len as usize {
            return Err(DriverError::Invalid(format!(
                "a {}-byte frame does not fit a {}-byte TX slot",
                frame.len(),
                self.slot_len
            )));
        }
        let slot = self
            .free
            .pop()
            .ok_or(DriverError::QueueFull { need: 1, free: 0 })?;
        let gpa = self.slot_gpa(slot);
        let ram = self.vq.ram().clone();
        ram.write(gpa, NetHdr::default().as_slice())?;
        ram.write(gpa + NET_HDR_SIZE as u64, frame)?;
        let bufs = if split {
            vec![
                Buf::readable(gpa, NET_HDR_SIZE as u32),
                Buf::readable(gpa + NET_HDR_SIZE as u64, frame.len() as u32),
            ]
        } else {
            vec![Buf::readable(gpa, need as u32)]
        };
        match self.vq.add_chain(&bufs, u64::from(slot)) {
            Ok(h) => Ok(h),
            Err(e) => {
                self.free.push(slot);
                Err(e)
            }
        }
    }

    /// Puts a raw chain on the ring (for bad-input tests); its completion frees no slot.
    pub fn send_raw(&mut self, bufs: &[Buf]) -> Result<u16, DriverError> {
        self.vq.add_chain(bufs, u64::MAX)
    }

    /// Kicks if the device asks for it.
    pub fn kick(&mut self) -> Result<(), DriverError> {
        self.vq.kick_if_needed().map(|_| ())
    }

    /// Waits up to `timeout` until `n` chains completed; checks the used lengths are 0 (the
    /// device writes nothing into TX buffers).
    pub fn reap(&mut self, n: usize, timeout: Duration) -> Result<(), DriverError> {
        let deadline = Instant::now() + timeout;
        for _ in 0..n {
            let e = self
                .vq
                .poll_used(deadline.saturating_duration_since(Instant::now()))?;
            if e.len != 0 {
                return Err(DriverError::Backend(format!(
                    "TX used length {} (the device writes nothing into TX buffers)",
                    e.len
                )));
            }
            if let Ok(slot) = u16::try_from(e.token) {
                self.free.push(slot);
            }
        }
        Ok(())
    }
}
