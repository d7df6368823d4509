//! Executing a validated request: moving bytes between the disk and guest memory, and making
//! sure every byte written into guest memory is in the dirty log.
//!
//! Two kinds of guest writes happen here, and they are logged differently:
//! - through vm-memory (`read_exact_volatile_from` on a [`PosFile`](super::disk::PosFile), `write_slice` from a bounce
//!   buffer, `write_obj` of the status byte): the region's
//!   [`GuestDirtyBitmap`] marks the pages itself, after the copy;
//! - around vm-memory (`--direct` zero-copy reads: `preadv` straight into the host addresses of
//!   the guest buffers): the kernel writes guest memory behind vm-memory's back, so the code
//!   calls [`DirtyLog::mark`] for each guest segment *after* `preadv` returned, i.e. after the
//!   data landed (DESIGN invariant 2). A failed transfer may have written part of the buffer, so
//!   it is marked as well.

use std::io;

use vm_memory::volatile_memory::Error as VolatileMemoryError;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, WriteVolatile,
};

use super::disk::{pread_exact, pwrite_all, vectored_all, AlignedBuf, Dir, Disk, HostIov};
use super::request::{Request, RequestKind, Segment};
use crate::log::{DirtyLog, GuestDirtyBitmap};
use crate::virtio_blk::ID_BYTES;

/// Guest memory as the device sees it.
pub type Mem = GuestMemoryMmap<GuestDirtyBitmap>;

/// Largest bounce buffer used for one step of an unaligned `--direct` request.
const BOUNCE_CHUNK: usize = 1 << 20;

/// What the device needs to execute requests.
#[derive(Debug, Clone, Copy)]
pub struct IoContext<'a> {
    /// The backing store.
    pub disk: &'a Disk,
    /// The dirty log, for writes that bypass vm-memory.
    pub log: &'a DirtyLog,
    /// `GET_ID` answer.
    pub serial: &'a [u8; ID_BYTES],
    /// Write cache enabled (writeback); when false every write is followed by `fdatasync`.
    pub writeback: bool,
}

/// Which data path a read or write took (for statistics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// Buffered descriptor through vm-memory.
    Buffered,
    /// `O_DIRECT` zero-copy into/out of guest memory.
    DirectZeroCopy,
    /// `O_DIRECT` through an aligned bounce buffer.
    DirectBounce,
    /// No data moved.
    None,
}

/// Executes `req`, returning the number of bytes written into the guest's data buffers and the
/// path taken. The status byte is *not* written here.
pub fn execute(req: &Request, mem: &Mem, ctx: &IoContext<'_>) -> io::Result<(u32, DataPath)> {
    match &req.kind {
        RequestKind::Read => {
            let path = read(req, mem, ctx)?;
            Ok((u32::try_from(req.data_len).unwrap_or(u32::MAX), path))
        }
        RequestKind::Write => {
            let path = write(req, mem, ctx)?;
            if !ctx.writeback {
                ctx.disk.flush()?;
            }
            Ok((0, path))
        }
        RequestKind::Flush => {
            ctx.disk.flush()?;
            Ok((0, DataPath::None))
        }
        RequestKind::GetId => {
            scatter(mem, &req.data, 0, ctx.serial)?;
            Ok((ID_BYTES as u32, DataPath::None))
        }
        RequestKind::Discard(ranges) => {
            for r in ranges {
                ctx.disk.discard(r.offset(), r.len_bytes())?;
            }
            if !ctx.writeback {
                ctx.disk.flush()?;
            }
            Ok((0, DataPath::None))
        }
        RequestKind::WriteZeroes(ranges) => {
            for r in ranges {
                ctx.disk.write_zeroes(r.offset(), r.len_bytes(), r.unmap)?;
            }
            if !ctx.writeback {
                ctx.disk.flush()?;
            }
            Ok((0, DataPath::None))
        }
    }
}

pub(crate) fn mem_err(e: vm_memory::GuestMemoryError) -> io::Error {
    match e {
        vm_memory::GuestMemoryError::IOError(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidInput, e),
    }
}

fn vol_err(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidInput, e),
    }
}

fn read(req: &Request, mem: &Mem, ctx: &IoContext<'_>) -> io::Result<DataPath> {
    let offset = req.offset();
    if let Some(direct) = ctx.disk.direct() {
        let align = direct.align();
        if offset.is_multiple_of(align.io) && req.data_len.is_multiple_of(align.io) {
            if let Some(iovs) = host_iovs(mem, &req.data, align.mem, align.io)? {
                // SAFETY: the iovecs come from VolatileSlices of `mem`, a snapshot of guest
                // memory whose mappings stay alive (and writable) until it is dropped, which is
                // after this call; guest memory is never referenced by Rust references.
                let res = unsafe { vectored_all(direct.file(), Dir::Read, &iovs, offset) };
                // Data before mark: the kernel finished writing guest memory when preadv
                // returned. On error part of it may have landed: mark it all either way.
                for seg in &req.data {
                    ctx.log.mark(seg.addr.0, u64::from(seg.len));
                }
                res?;
                return Ok(DataPath::DirectZeroCopy);
            }
            // Offset aligned, buffers not: bounce through aligned memory; the copy into guest
            // memory goes through vm-memory, which marks it.
            let chunk = bounce_chunk(align.io);
            let mut buf = AlignedBuf::new(chunk.min(req.data_len as usize), align.mem);
            let mut pos = 0u64;
            while pos < req.data_len {
                let n = (req.data_len - pos).min(chunk as u64) as usize;
                let bytes = &mut buf.as_mut_slice()[..n];
                pread_exact(direct.file(), bytes, offset + pos)?;
                scatter(mem, &req.data, pos, bytes)?;
                pos += n as u64;
            }
            return Ok(DataPath::DirectBounce);
        }
    }
    // Slice by slice (one per region piece), each filled completely: a short pread resumes
    // at the right file offset instead of failing the request or misplacing data. The
    // `PosFile` marks each piece through the region's bitmap as it lands.
    let mut pos = offset;
    for seg in &req.data {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let mut slice = slice.map_err(mem_err)?;
            ctx.disk
                .at(pos)
                .read_exact_volatile(&mut slice)
                .map_err(vol_err)?;
            pos += slice.len() as u64;
        }
    }
    Ok(DataPath::Buffered)
}

fn write(req: &Request, mem: &Mem, ctx: &IoContext<'_>) -> io::Result<DataPath> {
    let offset = req.offset();
    if let Some(direct) = ctx.disk.direct() {
        let align = direct.align();
        if offset.is_multiple_of(align.io) && req.data_len.is_multiple_of(align.io) {
            if let Some(iovs) = host_iovs(mem, &req.data, align.mem, align.io)? {
                // SAFETY: as in `read`; pwritev only reads the buffers.
                unsafe { vectored_all(direct.file(), Dir::Write, &iovs, offset) }?;
                return Ok(DataPath::DirectZeroCopy);
            }
            let chunk = bounce_chunk(align.io);
            let mut buf = AlignedBuf::new(chunk.min(req.data_len as usize), align.mem);
            let mut pos = 0u64;
            while pos < req.data_len {
                let n = (req.data_len - pos).min(chunk as u64) as usize;
                let bytes = &mut buf.as_mut_slice()[..n];
                gather(mem, &req.data, pos, bytes)?;
                pwrite_all(direct.file(), bytes, offset + pos)?;
                pos += n as u64;
            }
            return Ok(DataPath::DirectBounce);
        }
    }
    let mut pos = offset;
    for seg in &req.data {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.map_err(mem_err)?;
            ctx.disk
                .at(pos)
                .write_all_volatile(&slice)
                .map_err(vol_err)?;
            pos += slice.len() as u64;
        }
    }
    Ok(DataPath::Buffered)
}

pub(crate) fn bounce_chunk(io_align: u64) -> usize {
    let a = io_align.max(1) as usize;
    (BOUNCE_CHUNK / a).max(1) * a
}

/// Host I/O vectors for the guest segments, split at region boundaries, if every piece meets
/// the `O_DIRECT` alignment; `None` if one does not.
pub(crate) fn host_iovs(
    mem: &Mem,
    segs: &[Segment],
    mem_align: usize,
    io_align: u64,
) -> io::Result<Option<Vec<HostIov>>> {
    let mut iovs = Vec::with_capacity(segs.len());
    for seg in segs {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.map_err(mem_err)?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            if !(ptr as usize).is_multiple_of(mem_align)
                || !(slice.len() as u64).is_multiple_of(io_align)
            {
                return Ok(None);
            }
            iovs.push(HostIov {
                ptr,
                len: slice.len(),
            });
        }
    }
    Ok(Some(iovs))
}

/// Calls `f(guest address, range in buf)` for each piece of the stream range
/// `[pos, pos + len)` of `segs`.
fn for_each_piece(
    segs: &[Segment],
    pos: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> io::Result<()>,
) -> io::Result<()> {
    let mut seg_start = 0u64;
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        let seg_end = seg_start + seg_len;
        let want = pos + done as u64;
        if want < seg_end {
            let skip = want - seg_start;
            let n = ((seg_len - skip) as usize).min(len - done);
            f(GuestAddress(seg.addr.0 + skip), done..done + n)?;
            done += n;
        }
        seg_start = seg_end;
    }
    if done != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "data buffer shorter than the transfer",
        ));
    }
    Ok(())
}

/// Writes `buf` into the stream `segs` at stream offset `pos`, through vm-memory (marked).
pub(crate) fn scatter(mem: &Mem, segs: &[Segment], pos: u64, buf: &[u8]) -> io::Result<()> {
    for_each_piece(segs, pos, buf.len(), |addr, r| {
        mem.write_slice(&buf[r], addr).map_err(mem_err)
    })
}

/// Reads the stream `segs` at stream offset `pos` into `buf`.
pub(crate) fn gather(mem: &Mem, segs: &[Segment], pos: u64, buf: &mut [u8]) -> io::Result<()> {
    let len = buf.len();
    for_each_piece(segs, pos, len, |addr, r| {
        mem.read_slice(&mut buf[r], addr).map_err(mem_err)
    })
}
