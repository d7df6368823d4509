//! virtio-blk, driver side: request builders, status codes, the config space, and
//! [`BlkQueue`], a virtqueue that places request headers and status bytes for you.
//!
//! Requests follow the layout Linux uses: one device-readable descriptor with the 16-byte
//! header (plus, for writes, discard and write-zeroes, the payload descriptors), the data
//! descriptors, and a separate one-byte device-writable status descriptor. Status bytes are
//! pre-set to `0xff` so a device that completes a request without writing its status is caught.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use vm_memory::ByteValued;

use super::{Buf, DriverError, GuestRam, QueueLayout, SplitQueue, UsedElem};
use crate::log::LOG_PAGE_SHIFT;
use crate::virtio_blk::{BlkConfigSpace, DiscardWriteZeroes, OutHdr, ID_BYTES};
pub use crate::virtio_blk::{HEADER_SIZE, SECTOR_SIZE};

/// Status a request has before the device completes it.
pub const STATUS_PENDING: u8 = 0xff;

/// A virtio-blk status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkStatus {
    /// `VIRTIO_BLK_S_OK`.
    Ok,
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp,
    /// Still [`STATUS_PENDING`]: the device never wrote the status.
    NotWritten,
    /// Any other value.
    Other(u8),
}

impl From<u8> for BlkStatus {
    fn from(v: u8) -> Self {
        match u32::from(v) {
            VIRTIO_BLK_S_OK => BlkStatus::Ok,
            VIRTIO_BLK_S_IOERR => BlkStatus::IoErr,
            VIRTIO_BLK_S_UNSUPP => BlkStatus::Unsupp,
            _ if v == STATUS_PENDING => BlkStatus::NotWritten,
            _ => BlkStatus::Other(v),
        }
    }
}

/// One range of a discard / write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` = 1 for write-zeroes).
    pub flags: u32,
}

impl DiscardSegment {
    /// A range with no flags.
    pub fn new(sector: u64, num_sectors: u32) -> Self {
        DiscardSegment {
            sector,
            num_sectors,
            flags: 0,
        }
    }
    /// The 16-byte wire format (`struct virtio_blk_discard_write_zeroes`).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b.copy_from_slice(
            DiscardWriteZeroes::new(self.sector, self.num_sectors, self.flags).as_slice(),
        );
        b
    }
}

/// The 16-byte request header (`struct virtio_blk_outhdr`).
pub fn header_bytes(req_type: u32, sector: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b.copy_from_slice(OutHdr::new(req_type, sector).as_slice());
    b
}

/// Writes a request's header into guest memory, pre-sets its status byte to
/// [`STATUS_PENDING`], and returns its chain: header, data (device-writable if
/// `data_writable`), status.
pub fn build_chain(
    ram: &GuestRam,
    req_type: u32,
    sector: u64,
    header_gpa: u64,
    data: &[(u64, u32)],
    data_writable: bool,
    status_gpa: u64,
) -> Result<Vec<Buf>, DriverError> {
    ram.write(header_gpa, &header_bytes(req_type, sector))?;
    ram.write(status_gpa, &[STATUS_PENDING])?;
    let mut bufs = Vec::with_capacity(data.len() + 2);
    bufs.push(Buf::readable(header_gpa, HEADER_SIZE));
    bufs.extend(data.iter().map(|&(gpa, len)| Buf {
        gpa,
        len,
        writable: data_writable,
    }));
    bufs.push(Buf::writable(status_gpa, 1));
    Ok(bufs)
}

/// The virtio-blk config space, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfigInfo {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// `size_max`.
    pub size_max: u32,
    /// `seg_max`.
    pub seg_max: u32,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors.
    pub sectors: u8,
    /// `blk_size`.
    pub blk_size: u32,
    /// `physical_block_exp`.
    pub physical_block_exp: u8,
    /// `alignment_offset`.
    pub alignment_offset: u8,
    /// `min_io_size`.
    pub min_io_size: u16,
    /// `opt_io_size`.
    pub opt_io_size: u32,
    /// `wce`.
    pub wce: u8,
    /// `num_queues`.
    pub num_queues: u16,
    /// `max_discard_sectors`.
    pub max_discard_sectors: u32,
    /// `max_discard_seg`.
    pub max_discard_seg: u32,
    /// `discard_sector_alignment`.
    pub discard_sector_alignment: u32,
    /// `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u32,
    /// `max_write_zeroes_seg`.
    pub max_write_zeroes_seg: u32,
    /// `write_zeroes_may_unmap`.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfigInfo {
    /// Size of the layout through `write_zeroes_may_unmap` and its padding.
    pub const LEN: usize = 60;

    /// Decodes `bytes` (the config space from offset 0; shorter input reads as zero past its
    /// end, longer input is truncated to the 96-byte layout).
    pub fn parse(bytes: &[u8]) -> Self {
        let mut raw = BlkConfigSpace::default();
        let n = bytes.len().min(raw.as_slice().len());
        raw.as_mut_slice()[..n].copy_from_slice(&bytes[..n]);
        let c = raw.0;
        let g = c.geometry;
        BlkConfigInfo {
            capacity: u64::from_le(c.capacity),
            size_max: u32::from_le(c.size_max),
            seg_max: u32::from_le(c.seg_max),
            cylinders: u16::from_le(g.cylinders),
            heads: g.heads,
            sectors: g.sectors,
            blk_size: u32::from_le(c.blk_size),
            physical_block_exp: c.physical_block_exp,
            alignment_offset: c.alignment_offset,
            min_io_size: u16::from_le(c.min_io_size),
            opt_io_size: u32::from_le(c.opt_io_size),
            wce: c.wce,
            num_queues: u16::from_le(c.num_queues),
            max_discard_sectors: u32::from_le(c.max_discard_sectors),
            max_discard_seg: u32::from_le(c.max_discard_seg),
            discard_sector_alignment: u32::from_le(c.discard_sector_alignment),
            max_write_zeroes_sectors: u32::from_le(c.max_write_zeroes_sectors),
            max_write_zeroes_seg: u32::from_le(c.max_write_zeroes_seg),
            write_zeroes_may_unmap: c.write_zeroes_may_unmap,
        }
    }
}

/// A virtio-blk operation for [`BlkQueue::submit`].
#[derive(Debug, Clone, Copy)]
pub enum BlkOp<'a> {
    /// Read `sector..` into the device-writable buffers `(gpa, len)`.
    Read {
        /// First sector.
        sector: u64,
        /// Data buffers.
        data: &'a [(u64, u32)],
    },
    /// Write the buffers `(gpa, len)` to `sector..`.
    Write {
        /// First sector.
        sector: u64,
        /// Data buffers.
        data: &'a [(u64, u32)],
    },
    /// Flush the write cache.
    Flush,
    /// Read the 20-byte serial into the buffer `(gpa, len)`.
    GetId {
        /// The buffer (at least 20 bytes for a valid request).
        buf: (u64, u32),
    },
    /// Discard ranges.
    Discard(&'a [DiscardSegment]),
    /// Zero ranges.
    WriteZeroes(&'a [DiscardSegment]),
}

/// A completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index.
    pub head: u16,
    /// The caller's token.
    pub token: u64,
    /// The used length the device reported.
    pub used_len: u32,
    /// The status byte (read after the used entry was seen), if the request had one.
    pub status: Option<u8>,
    /// Guest address of the status byte.
    pub status_gpa: Option<u64>,
}

impl Completion {
    /// The decoded status ([`BlkStatus::NotWritten`] for a request without a status byte).
    pub fn blk_status(&self) -> BlkStatus {
        self.status.map_or(BlkStatus::NotWritten, BlkStatus::from)
    }
    /// Completed with `VIRTIO_BLK_S_OK`.
    pub fn is_ok(&self) -> bool {
        self.blk_status() == BlkStatus::Ok
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    token: u64,
    status_gpa: Option<u64>,
}

/// A virtio-blk request queue: a [`SplitQueue`] plus a scratch area in guest memory holding
/// one header / status / segment slot per possible in-flight request.
///
/// Slot `i` occupies `[scratch + i * SLOT_SIZE, + SLOT_SIZE)`: header at +0, status at +16,
/// discard / write-zeroes segments from +64. The device writes only the status bytes there.
#[derive(Debug)]
pub struct BlkQueue {
    vq: SplitQueue,
    scratch: u64,
    free_slots: Vec<u32>,
    slots: Vec<Option<Slot>>,
}

impl BlkQueue {
    /// Bytes per request slot in the scratch area.
    pub const SLOT_SIZE: u64 = 1024;
    /// Most discard / write-zeroes segments a slot holds.
    pub const MAX_SEGMENTS: usize = ((Self::SLOT_SIZE - 64) / 16) as usize;

    /// Scratch bytes a queue of `size` entries needs.
    pub fn scratch_bytes(size: u16) -> u64 {
        u64::from(size) * Self::SLOT_SIZE
    }

    /// A queue at `layout` with its scratch area at `scratch` (see [`scratch_bytes`](Self::scratch_bytes)).
    pub fn new(
        ram: Arc<GuestRam>,
        layout: QueueLayout,
        scratch: u64,
        event_idx: bool,
    ) -> Result<Self, DriverError> {
        let bytes = Self::scratch_bytes(layout.size);
        ram.host_ptr(scratch, bytes)?;
        let (q0, q1) = (layout.desc, layout.end());
        if scratch < q1 && q0 < scratch + bytes {
            return Err(DriverError::Layout(
                "scratch area overlaps the queue".into(),
            ));
        }
        let vq = SplitQueue::new(ram, layout, event_idx)?;
        let n = u32::from(layout.size);
        Ok(BlkQueue {
            vq,
            scratch,
            free_slots: (0..n).rev().collect(),
            slots: (0..n).map(|_| None).collect(),
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
    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vq.ram()
    }
    /// Start of the scratch area.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }
    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Puts `op` on the ring (no kick). Returns the head descriptor index.
    pub fn submit(&mut self, op: BlkOp<'_>, token: u64) -> Result<u16, DriverError> {
        let slot = *self
            .free_slots
            .last()
            .ok_or(DriverError::QueueFull { need: 1, free: 0 })?;
        let base = self.scratch + u64::from(slot) * Self::SLOT_SIZE;
        let (header, status, segs) = (base, base + 16, base + 64);
        let ram = self.vq.ram().clone();
        let bufs = match op {
            BlkOp::Read { sector, data } => {
                build_chain(&ram, VIRTIO_BLK_T_IN, sector, header, data, true, status)?
            }
            BlkOp::Write { sector, data } => {
                build_chain(&ram, VIRTIO_BLK_T_OUT, sector, header, data, false, status)?
            }
            BlkOp::Flush => build_chain(&ram, VIRTIO_BLK_T_FLUSH, 0, header, &[], false, status)?,
            BlkOp::GetId { buf } => {
                build_chain(&ram, VIRTIO_BLK_T_GET_ID, 0, header, &[buf], true, status)?
            }
            BlkOp::Discard(s) | BlkOp::WriteZeroes(s) => {
                if s.is_empty() || s.len() > Self::MAX_SEGMENTS {
                    return Err(DriverError::Invalid(format!(
                        "{} segments (1..={} per request)",
                        s.len(),
                        Self::MAX_SEGMENTS
                    )));
                }
                let bytes: Vec<u8> = s.iter().flat_map(|d| d.to_bytes()).collect();
                ram.write(segs, &bytes)?;
                let t = if matches!(op, BlkOp::Discard(_)) {
                    VIRTIO_BLK_T_DISCARD
                } else {
                    VIRTIO_BLK_T_WRITE_ZEROES
                };
                build_chain(
                    &ram,
                    t,
                    0,
                    header,
                    &[(segs, bytes.len() as u32)],
                    false,
                    status,
                )?
            }
        };
        let head = self.vq.add_chain(&bufs, u64::from(slot))?;
        self.free_slots.pop();
        self.slots[slot as usize] = Some(Slot {
            token,
            status_gpa: Some(status),
        });
        Ok(head)
    }

    /// Puts an arbitrary chain on the ring (e.g. a deliberately malformed request). The
    /// caller lays out the buffers; `status_gpa` is where the completion's status is read
    /// from, if anywhere. Uses a request slot only for bookkeeping, not its memory.
    pub fn submit_raw(
        &mut self,
        bufs: &[Buf],
        status_gpa: Option<u64>,
        token: u64,
    ) -> Result<u16, DriverError> {
        let slot = *self
            .free_slots
            .last()
            .ok_or(DriverError::QueueFull { need: 1, free: 0 })?;
        if let Some(s) = status_gpa {
            self.vq.ram().write(s, &[STATUS_PENDING])?;
        }
        let head = self.vq.add_chain(bufs, u64::from(slot))?;
        self.free_slots.pop();
        self.slots[slot as usize] = Some(Slot { token, status_gpa });
        Ok(head)
    }

    /// Notifies the device.
    pub fn kick(&mut self) -> Result<(), DriverError> {
        self.vq.kick()
    }

    fn complete(&mut self, e: UsedElem) -> Result<Completion, DriverError> {
        let slot = usize::try_from(e.token)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| {
                DriverError::Backend(format!("completion for unknown slot {}", e.token))
            })?;
        self.free_slots.push(e.token as u32);
        let status = match slot.status_gpa {
            Some(gpa) => Some(self.vq.ram().read_obj::<u8>(gpa)?),
            None => None,
        };
        Ok(Completion {
            head: e.head,
            token: slot.token,
            used_len: e.len,
            status,
            status_gpa: slot.status_gpa,
        })
    }

    /// The next completion, if one is ready.
    pub fn try_complete(&mut self) -> Result<Option<Completion>, DriverError> {
        match self.vq.pop_used()? {
            Some(e) => self.complete(e).map(Some),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for the next completion (woken by the call eventfd).
    pub fn wait(&mut self, timeout: Duration) -> Result<Completion, DriverError> {
        let e = self.vq.wait_used(timeout)?;
        self.complete(e)
    }

    /// Waits until every request in flight completed, within `timeout` in total.
    pub fn wait_all(&mut self, timeout: Duration) -> Result<Vec<Completion>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while self.in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            out.push(self.wait(left).map_err(|e| match e {
                DriverError::Timeout(..) => DriverError::Timeout(timeout, "all requests"),
                e => e,
            })?);
        }
        Ok(out)
    }

    /// Submits `op`, kicks and waits for its completion. Nothing else may be in flight.
    pub fn run(&mut self, op: BlkOp<'_>, timeout: Duration) -> Result<Completion, DriverError> {
        if self.in_flight() != 0 {
            return Err(DriverError::Invalid(
                "run() needs an idle queue; use submit/wait".into(),
            ));
        }
        self.submit(op, 0)?;
        self.kick()?;
        self.wait(timeout)
    }

    /// Reads `sector..` into the buffers.
    pub fn read(
        &mut self,
        sector: u64,
        data: &[(u64, u32)],
        timeout: Duration,
    ) -> Result<Completion, DriverError> {
        self.run(BlkOp::Read { sector, data }, timeout)
    }

    /// Writes the buffers to `sector..`.
    pub fn write(
        &mut self,
        sector: u64,
        data: &[(u64, u32)],
        timeout: Duration,
    ) -> Result<Completion, DriverError> {
        self.run(BlkOp::Write { sector, data }, timeout)
    }

    /// Flushes.
    pub fn flush(&mut self, timeout: Duration) -> Result<Completion, DriverError> {
        self.run(BlkOp::Flush, timeout)
    }

    /// Reads the serial into a 20-byte buffer at `gpa`.
    pub fn get_id(&mut self, gpa: u64, timeout: Duration) -> Result<Completion, DriverError> {
        self.run(
            BlkOp::GetId {
                buf: (gpa, ID_BYTES as u32),
            },
            timeout,
        )
    }

    /// Discards ranges.
    pub fn discard(
        &mut self,
        segs: &[DiscardSegment],
        timeout: Duration,
    ) -> Result<Completion, DriverError> {
        self.run(BlkOp::Discard(segs), timeout)
    }

    /// Zeroes ranges.
    pub fn write_zeroes(
        &mut self,
        segs: &[DiscardSegment],
        timeout: Duration,
    ) -> Result<Completion, DriverError> {
        self.run(BlkOp::WriteZeroes(segs), timeout)
    }

    /// The guest page (4 KiB) holding a completion's status byte, which the device wrote.
    pub fn status_page(&self, c: &Completion) -> Option<u64> {
        c.status_gpa.map(|g| g >> LOG_PAGE_SHIFT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_config_decoding() {
        assert_eq!(BlkStatus::from(0), BlkStatus::Ok);
        assert_eq!(BlkStatus::from(1), BlkStatus::IoErr);
        assert_eq!(BlkStatus::from(2), BlkStatus::Unsupp);
        assert_eq!(BlkStatus::from(STATUS_PENDING), BlkStatus::NotWritten);
        assert_eq!(BlkStatus::from(7), BlkStatus::Other(7));

        let mut b = vec![0u8; 60];
        b[0..8].copy_from_slice(&1234u64.to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&4096u32.to_le_bytes());
        b[32] = 1;
        b[34..36].copy_from_slice(&4u16.to_le_bytes());
        b[56] = 1;
        let c = BlkConfigInfo::parse(&b);
        assert_eq!(c.capacity, 1234);
        assert_eq!(c.seg_max, 126);
        assert_eq!(c.blk_size, 4096);
        assert_eq!(c.wce, 1);
        assert_eq!(c.num_queues, 4);
        assert_eq!(c.write_zeroes_may_unmap, 1);
        // Short input reads as zero past its end.
        assert_eq!(BlkConfigInfo::parse(&b[..8]).num_queues, 0);
        assert_eq!(
            DiscardSegment::new(5, 8).to_bytes(),
            [5, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            &header_bytes(VIRTIO_BLK_T_OUT, 3)[..],
            &[1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
