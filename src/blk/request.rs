//! The virtio-blk request parser: descriptor chain in, validated request (or a precise error) out.
//!
//! Everything a guest puts on the available ring is hostile input: descriptor lengths, their
//! order, the header, the sector, the discard segments. This module turns one descriptor chain
//! into a [`Request`] whose every field has been checked against the device [`Limits`] and the
//! guest memory map, so the I/O code that executes it can index and add without re-checking.
//! It performs no I/O and writes nothing: it only reads the header and discard/write-zeroes
//! segments from guest memory. That makes it a pure function of (descriptors, memory, limits),
//! which is what the fuzz target drives with arbitrary chains.
//!
//! ## The layout a chain must have (virtio 1.x, `VIRTIO_F_ANY_LAYOUT` semantics)
//! The chain is read as two byte streams: every device-readable descriptor first, then every
//! device-writable one (a readable descriptor after a writable one is an error). The readable
//! stream starts with the 16-byte `virtio_blk_outhdr` (it may be split across descriptors) and,
//! for `OUT`, `DISCARD` and `WRITE_ZEROES`, continues with the payload. The writable stream ends
//! with the one-byte status; for `IN` and `GET_ID` the bytes before it are the data buffer. So
//! the status byte is the *last byte of the last descriptor*, whether the driver gave it its own
//! descriptor (as Linux does) or appended it to the data buffer.
//!
//! ## Errors
//! A request that cannot be served yields a [`RequestError`] carrying the status code the device
//! must complete it with (`VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`) and, when the chain has
//! a valid writable status byte, its guest address. Without one the request is completed with a
//! used length of 0 and nothing is written.

use std::fmt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::guest_memory::Permissions;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory};

use crate::virtio_blk::{
    DiscardWriteZeroes, OutHdr, HEADER_SIZE, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE, SEGMENT_SIZE,
};

/// Hard cap on descriptors per chain the parser will look at, whatever the queue size
/// (an indirect table can hold up to 65535 descriptors).
pub const MAX_CHAIN_DESCRIPTORS: usize = 4096;

/// Device limits a request is validated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum number of data segments (guest-memory pieces) in one `IN`/`OUT` request.
    pub seg_max: u32,
    /// The device refuses writes (`OUT`, `DISCARD`, `WRITE_ZEROES` complete with `IOERR`).
    pub read_only: bool,
    /// `DISCARD` is offered (otherwise it completes with `UNSUPP`).
    pub discard: bool,
    /// `WRITE_ZEROES` is offered (otherwise it completes with `UNSUPP`).
    pub write_zeroes: bool,
    /// Largest `num_sectors` of one discard segment.
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_seg: u32,
    /// Largest `num_sectors` of one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            capacity: 0,
            seg_max: 254,
            read_only: false,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: super::MAX_DISCARD_SECTORS,
            max_discard_seg: super::MAX_DISCARD_SEG,
            max_write_zeroes_sectors: super::MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: super::MAX_DISCARD_SEG,
        }
    }
}

/// One piece of guest memory: `len` bytes at guest-physical `addr`, entirely inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0 in a parsed request).
    pub len: u32,
}

/// One range of a `DISCARD` / `WRITE_ZEROES` request, validated against the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors (at least 1).
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` was set (write-zeroes only).
    pub unmap: bool,
}

impl SectorRange {
    /// Byte offset of the range on the disk.
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }
    /// Length of the range in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.num_sectors) << SECTOR_SHIFT
    }
}

/// What a validated request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read from the disk into the data segments.
    Read,
    /// `VIRTIO_BLK_T_OUT`: write the data segments to the disk.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: write the 20-byte serial into the data segments.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD` with its ranges.
    Discard(Vec<SectorRange>),
    /// `VIRTIO_BLK_T_WRITE_ZEROES` with its ranges.
    WriteZeroes(Vec<SectorRange>),
}

/// A request that passed every check.
///
/// Invariants: every data segment and the status byte lie inside guest memory; for `Read` and
/// `Write`, `sector * 512 + data_len <= capacity * 512` without overflow, `data_len` is a multiple
/// of 512 and there are at most `seg_max` segments; for `GetId`, `data_len >= 20`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// Starting sector (`Read` / `Write`; 0 otherwise).
    pub sector: u64,
    /// The data buffer in guest memory, in stream order: device-writable for `Read`/`GetId`,
    /// device-readable for `Write`, empty otherwise.
    pub data: Vec<Segment>,
    /// Total length of `data` in bytes.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

impl Request {
    /// Byte offset on the disk where a `Read` / `Write` starts.
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorReason {
    /// The chain had no descriptor at all (or its first descriptor could not be read).
    EmptyChain,
    /// The chain has more than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    TooManyDescriptors,
    /// A device-readable descriptor follows a device-writable one.
    ReadableAfterWritable,
    /// The last descriptor is not device-writable, or the writable part is empty.
    NoStatus,
    /// A descriptor points outside guest memory.
    BadAddress,
    /// Fewer than 16 device-readable bytes: no complete header.
    ShortHeader,
    /// The request type is not one this device implements (or not offered).
    Unsupported(u32),
    /// A write-type request on a read-only device.
    ReadOnly,
    /// Data length not a multiple of 512, or data in the wrong direction for the type.
    BadDataLength,
    /// More data segments than `seg_max`.
    TooManySegments,
    /// `sector * 512 + len` overflows.
    Overflow,
    /// The request reaches past the end of the disk.
    OutOfRange,
    /// `GET_ID` buffer shorter than 20 bytes.
    ShortIdBuffer,
    /// Discard / write-zeroes payload malformed (not whole segments, none, too many).
    BadSegments,
    /// Discard / write-zeroes segment exceeds the device's per-segment sector limit.
    SegmentTooLarge,
    /// Discard / write-zeroes segment flags not allowed for the type.
    BadFlags,
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorReason::EmptyChain => write!(f, "empty descriptor chain"),
            ErrorReason::TooManyDescriptors => {
                write!(f, "chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")
            }
            ErrorReason::ReadableAfterWritable => {
                write!(f, "device-readable descriptor after a device-writable one")
            }
            ErrorReason::NoStatus => write!(f, "no device-writable status byte at the end"),
            ErrorReason::BadAddress => write!(f, "descriptor outside guest memory"),
            ErrorReason::ShortHeader => write!(f, "request header shorter than 16 bytes"),
            ErrorReason::Unsupported(t) => write!(f, "unsupported request type {t}"),
            ErrorReason::ReadOnly => write!(f, "write request on a read-only device"),
            ErrorReason::BadDataLength => write!(f, "bad data length or direction"),
            ErrorReason::TooManySegments => write!(f, "more data segments than seg_max"),
            ErrorReason::Overflow => write!(f, "sector/length overflow"),
            ErrorReason::OutOfRange => write!(f, "request beyond the end of the disk"),
            ErrorReason::ShortIdBuffer => write!(f, "GET_ID buffer shorter than 20 bytes"),
            ErrorReason::BadSegments => write!(f, "malformed discard/write-zeroes segments"),
            ErrorReason::SegmentTooLarge => {
                write!(f, "discard/write-zeroes segment above the sector limit")
            }
            ErrorReason::BadFlags => write!(f, "invalid discard/write-zeroes flags"),
        }
    }
}

/// A refused request: how to complete it and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    /// Guest address of the status byte, if the chain has a valid one.
    pub status: Option<GuestAddress>,
    /// Why the request was refused.
    pub reason: ErrorReason,
}

impl RequestError {
    /// The virtio-blk status to complete the request with.
    pub fn status_code(&self) -> u8 {
        match self.reason {
            ErrorReason::Unsupported(_) | ErrorReason::BadFlags => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        if self.status.is_none() {
            write!(f, " (no status byte to report it)")?;
        }
        Ok(())
    }
}

impl std::error::Error for RequestError {}

/// Parses a chain popped from a virtio-queue [`Queue`](virtio_queue::Queue).
pub fn parse_chain<M>(chain: DescriptorChain<M>, limits: &Limits) -> Result<Request, RequestError>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.clone();
    parse_descriptors(chain, mem.memory(), limits)
}

/// Parses a request from its descriptors (in chain order) over guest memory `mem`.
///
/// This is the pure core behind [`parse_chain`]: it reads the header and segment payload from
/// `mem` and writes nothing. Any descriptor sequence and any memory content yields `Ok` or `Err`,
/// never a panic.
pub fn parse_descriptors<I, M>(
    descriptors: I,
    mem: &M,
    limits: &Limits,
) -> Result<Request, RequestError>
where
    I: IntoIterator<Item = Descriptor>,
    M: GuestMemory + ?Sized,
{
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut count = 0usize;
    let mut order_error = false;
    let mut address_error = false;
    for desc in descriptors {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            // The status would be the last descriptor we never reach: nothing to report into.
            return Err(RequestError {
                status: None,
                reason: ErrorReason::TooManyDescriptors,
            });
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if seg.len > 0 && !range_ok(mem, seg.addr, u64::from(seg.len)) {
            address_error = true;
        }
        if desc.is_write_only() {
            if seg.len > 0 {
                writable.push(seg);
            }
        } else {
            if !writable.is_empty() {
                order_error = true;
            }
            if seg.len > 0 {
                readable.push(seg);
            }
        }
    }
    if count == 0 {
        return Err(RequestError {
            status: None,
            reason: ErrorReason::EmptyChain,
        });
    }

    // The status byte: last byte of the writable stream, which must be the chain's last bytes.
    let status = match writable.last_mut() {
        Some(last) if !order_error => {
            let addr = last.addr.checked_add(u64::from(last.len) - 1);
            match addr {
                Some(a) if range_ok(mem, a, 1) => {
                    last.len -= 1;
                    if last.len == 0 {
                        writable.pop();
                    }
                    Some(a)
                }
                _ => None,
            }
        }
        _ => None,
    };
    let fail = |reason| RequestError { status, reason };
    let Some(status) = status else {
        return Err(RequestError {
            status: None,
            reason: if order_error {
                ErrorReason::ReadableAfterWritable
            } else if writable.is_empty() {
                ErrorReason::NoStatus
            } else {
                ErrorReason::BadAddress
            },
        });
    };
    if address_error {
        return Err(fail(ErrorReason::BadAddress));
    }

    // Header: first 16 readable bytes, possibly split.
    let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    let header_size = u64::from(HEADER_SIZE);
    if readable_len < header_size {
        return Err(fail(ErrorReason::ShortHeader));
    }
    let mut hdr = OutHdr::default();
    read_stream(mem, &readable, 0, hdr.as_mut_slice())
        .map_err(|_| fail(ErrorReason::BadAddress))?;
    let (req_type, sector) = (u32::from_le(hdr.req_type()), u64::from_le(hdr.sector()));
    let payload = sub_stream(&readable, header_size);
    let payload_len = readable_len - header_size;
    let writable_len: u64 = writable.iter().map(|s| u64::from(s.len)).sum();

    let kind = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = req_type == VIRTIO_BLK_T_IN;
            if !is_read && limits.read_only {
                return Err(fail(ErrorReason::ReadOnly));
            }
            let (data, data_len, wrong_dir_len) = if is_read {
                (writable, writable_len, payload_len)
            } else {
                (payload, payload_len, writable_len)
            };
            if wrong_dir_len != 0 || data_len % SECTOR_SIZE != 0 {
                return Err(fail(ErrorReason::BadDataLength));
            }
            if data.len() > limits.seg_max as usize {
                return Err(fail(ErrorReason::TooManySegments));
            }
            check_range(sector, data_len, limits.capacity).map_err(fail)?;
            return Ok(Request {
                kind: if is_read {
                    RequestKind::Read
                } else {
                    RequestKind::Write
                },
                sector,
                data,
                data_len,
                status,
            });
        }
        VIRTIO_BLK_T_FLUSH => {
            if payload_len != 0 || writable_len != 0 {
                return Err(fail(ErrorReason::BadDataLength));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if payload_len != 0 {
                return Err(fail(ErrorReason::BadDataLength));
            }
            if writable_len < ID_BYTES as u64 {
                return Err(fail(ErrorReason::ShortIdBuffer));
            }
            return Ok(Request {
                kind: RequestKind::GetId,
                sector: 0,
                data: writable,
                data_len: writable_len,
                status,
            });
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let offered = if discard {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !offered {
                return Err(fail(ErrorReason::Unsupported(req_type)));
            }
            if limits.read_only {
                return Err(fail(ErrorReason::ReadOnly));
            }
            if writable_len != 0 {
                return Err(fail(ErrorReason::BadDataLength));
            }
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let segment_size = u64::from(SEGMENT_SIZE);
            if payload_len == 0
                || !payload_len.is_multiple_of(segment_size)
                || payload_len / segment_size > u64::from(max_seg)
            {
                return Err(fail(ErrorReason::BadSegments));
            }
            let n = (payload_len / segment_size) as usize;
            let mut ranges = Vec::with_capacity(n);
            for i in 0..n {
                let mut raw = DiscardWriteZeroes::default();
                read_stream(mem, &payload, i as u64 * segment_size, raw.as_mut_slice())
                    .map_err(|_| fail(ErrorReason::BadAddress))?;
                let seg_sector = u64::from_le(raw.sector());
                let num_sectors = u32::from_le(raw.num_sectors());
                let flags = u32::from_le(raw.flags());
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(fail(ErrorReason::BadFlags));
                }
                if num_sectors > max_sectors {
                    return Err(fail(ErrorReason::SegmentTooLarge));
                }
                check_range(
                    seg_sector,
                    u64::from(num_sectors) << SECTOR_SHIFT,
                    limits.capacity,
                )
                .map_err(fail)?;
                if num_sectors == 0 {
                    continue;
                }
                ranges.push(SectorRange {
                    sector: seg_sector,
                    num_sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
            if discard {
                RequestKind::Discard(ranges)
            } else {
                RequestKind::WriteZeroes(ranges)
            }
        }
        other => return Err(fail(ErrorReason::Unsupported(other))),
    };
    Ok(Request {
        kind,
        sector: 0,
        data: Vec::new(),
        data_len: 0,
        status,
    })
}

/// `sector * 512 + len <= capacity * 512`, without overflow.
fn check_range(sector: u64, len: u64, capacity: u64) -> Result<(), ErrorReason> {
    let start = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(ErrorReason::Overflow)?;
    let end = start.checked_add(len).ok_or(ErrorReason::Overflow)?;
    // capacity * 512 cannot overflow for any real disk, but the limit is caller-supplied.
    let cap_bytes = capacity.saturating_mul(SECTOR_SIZE);
    if end > cap_bytes {
        return Err(ErrorReason::OutOfRange);
    }
    Ok(())
}

/// Whether `[addr, addr + len)` lies in guest memory (possibly across adjacent regions).
fn range_ok<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, len: u64) -> bool {
    if addr.checked_add(len).is_none() {
        return false;
    }
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    mem.check_range(addr, len, Permissions::ReadWrite)
}

/// The stream `segs` with its first `skip` bytes removed.
fn sub_stream(segs: &[Segment], mut skip: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // `skip < len <= u32::MAX`, and the address was range-checked.
        out.push(Segment {
            addr: s.addr.unchecked_add(skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    out
}

/// Reads `buf.len()` bytes starting `offset` bytes into the stream `segs`.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ()> {
    let mut done = 0usize;
    for s in sub_stream(segs, offset) {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| ())?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests;
