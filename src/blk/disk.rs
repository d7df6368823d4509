//! The backing store: a raw image file or a block device, opened once per daemon.
//!
//! [`Disk`] owns the file descriptors and knows the disk's geometry and the `O_DIRECT`
//! alignment rules; it moves bytes between the disk and *host* memory with positional system
//! calls (`pread`/`pwrite`/`preadv`/`pwritev`), so any number of queue threads can share one
//! descriptor without a seek race. Which guest bytes those are, and the dirty-log marking that
//! must follow every write into guest memory, is the device's business ([`super::io`]).
//!
//! With `--direct` the disk is opened a second time with `O_DIRECT`; requests whose disk offset,
//! length and guest buffers satisfy the alignment the kernel reports (`statx(STATX_DIOALIGN)`,
//! `BLKSSZGET` for block devices, 4 KiB when unknown) go straight between the disk and guest
//! memory, others fall back to a bounce buffer or the buffered descriptor. The page cache keeps
//! the two descriptors coherent (direct I/O writes back and invalidates cached pages first).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::Error as VolatileMemoryError;
use vm_memory::{ReadVolatile, VolatileSlice, WriteVolatile};
use vmm_sys_util::fallocate::FallocateMode;

use crate::virtio_blk::{SECTOR_SHIFT, SECTOR_SIZE};

/// Why the disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `open` failed.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    /// The disk is smaller than one sector.
    #[error("disk image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
    /// Querying the size failed.
    #[error("cannot determine the size of {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `O_DIRECT` was asked for but the file system refuses it.
    #[error("cannot open {path} with O_DIRECT (--direct): {source}")]
    Direct {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Alignment `O_DIRECT` needs for this disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    /// Required alignment of buffer addresses in memory.
    pub mem: usize,
    /// Required alignment of disk offsets and of every length.
    pub io: u64,
}

/// The second, `O_DIRECT` descriptor and its alignment rules.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    align: DirectAlign,
}

impl DirectFile {
    /// The `O_DIRECT` descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Its alignment rules.
    pub fn align(&self) -> DirectAlign {
        self.align
    }
}

/// An opened disk image or block device.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    file: File,
    direct: Option<DirectFile>,
    /// In 512-byte sectors; changes only through [`Disk::refresh_capacity`].
    capacity: std::sync::atomic::AtomicU64,
    read_only: bool,
    block_device: bool,
}

impl Disk {
    /// Opens `path` (read-only if `read_only`), and a second `O_DIRECT` descriptor if `direct`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Disk, DiskError> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags)
                .open(path)
        };
        let file = open(libc::O_CLOEXEC).map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: path.to_owned(),
            source,
        })?;
        let ft = meta.file_type();
        let block_device = ft.is_block_device();
        if !ft.is_file() && !block_device {
            return Err(DiskError::NotADisk(path.to_owned()));
        }
        let size = if block_device {
            block_device_size(&file).map_err(|source| DiskError::Size {
                path: path.to_owned(),
                source,
            })?
        } else {
            meta.len()
        };
        let capacity = size >> SECTOR_SHIFT;
        if capacity == 0 {
            return Err(DiskError::TooSmall(path.to_owned()));
        }
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "{}: size {size} is not a multiple of 512; the last {} bytes are not exposed",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let direct = if direct {
            let dfile =
                open(libc::O_CLOEXEC | libc::O_DIRECT).map_err(|source| DiskError::Direct {
                    path: path.to_owned(),
                    source,
                })?;
            let align = direct_align(&dfile, block_device);
            log::info!(
                "{}: O_DIRECT with memory alignment {} and I/O alignment {}",
                path.display(),
                align.mem,
                align.io
            );
            Some(DirectFile { file: dfile, align })
        } else {
            None
        };
        Ok(Disk {
            path: path.to_owned(),
            file,
            direct,
            capacity: capacity.into(),
            read_only,
            block_device,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Re-reads the size of the file or block device (a disk grown or shrunk while the daemon
    /// runs) and returns `(old, new)` capacity in 512-byte sectors. Call it only while no
    /// frontend is connected: a connected guest keeps the capacity it read from the config
    /// space (the daemon cannot tell it otherwise; see the README's known limits).
    pub fn refresh_capacity(&self) -> io::Result<(u64, u64)> {
        let size = if self.block_device {
            block_device_size(&self.file)?
        } else {
            self.file.metadata()?.len()
        };
        let new = size >> SECTOR_SHIFT;
        if new == 0 {
            return Err(io::Error::other("the disk is now smaller than one sector"));
        }
        let old = self
            .capacity
            .swap(new, std::sync::atomic::Ordering::Relaxed);
        Ok((old, new))
    }

    /// The path the disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The path is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The buffered descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The `O_DIRECT` descriptor, when opened with `direct`.
    pub fn direct(&self) -> Option<&DirectFile> {
        self.direct.as_ref()
    }

    /// A positional reader/writer on the buffered descriptor starting at byte `offset`.
    pub fn at(&self, offset: u64) -> PosFile<'_> {
        PosFile {
            file: &self.file,
            offset,
        }
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `[offset, offset + len)` (`FALLOC_FL_PUNCH_HOLE`). A file system or device
    /// that cannot punch holes makes this a successful no-op: discard is a hint.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.file, true, offset, len) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    /// Makes `[offset, offset + len)` read back as zeroes, deallocating it if `unmap` and the
    /// file system can (`PUNCH_HOLE`), else `ZERO_RANGE`, else writing zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match fallocate(&self.file, true, offset, len) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match fallocate(&self.file, false, offset, len) {
            Err(e) if unsupported(&e) => {}
            r => return r,
        }
        // Fallback: write zeroes in 1 MiB chunks.
        let zeroes = vec![0u8; (1 << 20).min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            pwrite_all(&self.file, &zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// `fallocate` with `FALLOC_FL_KEEP_SIZE`: punch a hole, or zero the range.
fn fallocate(file: &File, punch: bool, offset: u64, len: u64) -> io::Result<()> {
    loop {
        let mode = if punch {
            FallocateMode::PunchHole
        } else {
            FallocateMode::ZeroRange
        };
        match vmm_sys_util::fallocate::fallocate(file, mode, true, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

// Block-device ioctls (linux/fs.h): BLKSSZGET = _IO(0x12, 104) answers the logical block size
// as an int, BLKGETSIZE64 = _IOR(0x12, 114, size_t) the device size in bytes as a u64.
mod ioctls {
    vmm_sys_util::ioctl_io_nr!(BLKSSZGET, 0x12, 104);
    vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
}
use ioctls::{BLKGETSIZE64, BLKSSZGET};

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the reference, which points to a live local;
    // `file` is an open descriptor for the call's duration.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKGETSIZE64(), &mut size) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn direct_align(file: &File, block_device: bool) -> DirectAlign {
    const FALLBACK: DirectAlign = DirectAlign {
        mem: 4096,
        io: 4096,
    };
    // SAFETY: `stx` is a plain-old-data out parameter; statx with AT_EMPTY_PATH and an empty
    // C string inspects the open descriptor only.
    let stx = unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let rc = libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        );
        (rc == 0).then_some(stx)
    };
    if let Some(stx) = stx {
        if stx.stx_mask & libc::STATX_DIOALIGN != 0
            && stx.stx_dio_mem_align.is_power_of_two()
            && stx.stx_dio_offset_align.is_power_of_two()
        {
            return DirectAlign {
                mem: stx.stx_dio_mem_align as usize,
                io: u64::from(stx.stx_dio_offset_align).max(SECTOR_SIZE),
            };
        }
    }
    if block_device {
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the reference, which points to a live local;
        // `file` is an open descriptor for the call's duration.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKSSZGET(), &mut ssz) };
        if rc == 0 && ssz > 0 && (ssz as u32).is_power_of_two() {
            return DirectAlign {
                mem: ssz as usize,
                io: ssz as u64,
            };
        }
    }
    FALLBACK
}

/// `pwrite` the whole buffer.
pub fn pwrite_all(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while !buf.is_empty() {
        match file.write_at(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pread` exactly `buf.len()` bytes; end of file is an error.
pub fn pread_exact(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// One I/O vector into host memory: a raw pointer and length, valid for the duration of the
/// vectored call the caller makes (the caller holds the guest-memory snapshot that maps it).
#[derive(Debug, Clone, Copy)]
pub struct HostIov {
    /// Start of the buffer.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// Direction of a vectored transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Disk to memory (`preadv`).
    Read,
    /// Memory to disk (`pwritev`).
    Write,
}

/// Positional vectored I/O over `iovs` until every byte moved; short transfers are resumed, end
/// of file is an error.
///
/// # Safety
/// Every `HostIov` must describe memory that is mapped and (for [`Dir::Read`]) writable for the
/// whole call, and that no Rust reference aliases mutably.
pub unsafe fn vectored_all(file: &File, dir: Dir, iovs: &[HostIov], offset: u64) -> io::Result<()> {
    const MAX_IOV: usize = 1024; // IOV_MAX on Linux
    let mut vecs: Vec<libc::iovec> = iovs
        .iter()
        .filter(|v| v.len > 0)
        .map(|v| libc::iovec {
            iov_base: v.ptr.cast(),
            iov_len: v.len,
        })
        .collect();
    let mut start = 0usize;
    let mut offset = offset;
    while start < vecs.len() {
        let end = (start + MAX_IOV).min(vecs.len());
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let batch = &vecs[start..end];
        // SAFETY: the iovecs point to memory the caller guarantees is mapped (and writable for
        // reads) for the duration of this call; `batch` is a live slice of `end - start` iovecs.
        let n = unsafe {
            match dir {
                Dir::Read => libc::preadv(
                    file.as_fd().as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    off,
                ),
                Dir::Write => libc::pwritev(
                    file.as_fd().as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    off,
                ),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(match dir {
                Dir::Read => io::ErrorKind::UnexpectedEof.into(),
                Dir::Write => io::ErrorKind::WriteZero.into(),
            });
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && start < vecs.len() {
            let v = &mut vecs[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// A file read and written at an explicit, advancing offset (`pread`/`pwrite`), for vm-memory's
/// volatile copies: several queue threads can use one descriptor without seeking.
///
/// Like vm-memory's own `File` implementation, a read marks the destination slice's bitmap
/// (which, for guest memory with [`GuestDirtyBitmap`](crate::log::GuestDirtyBitmap), is the
/// dirty log) after the data landed.
#[derive(Debug)]
pub struct PosFile<'a> {
    file: &'a File,
    offset: u64,
}

impl PosFile<'_> {
    /// The current offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl ReadVolatile for PosFile<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let off = libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput))
        })?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the VolatileSlice guarantees `guard.as_ptr()` is valid for writes of
        // `buf.len()` bytes while the guard lives; the descriptor is borrowed for the call.
        let n =
            unsafe { libc::pread(self.file.as_raw_fd(), guard.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            // A partial transfer may have happened: mark it all, as vm-memory does.
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for PosFile<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let off = libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput))
        })?;
        let guard = buf.ptr_guard();
        // SAFETY: the VolatileSlice guarantees `guard.as_ptr()` is valid for reads of
        // `buf.len()` bytes while the guard lives; the descriptor is borrowed for the call.
        let n =
            unsafe { libc::pwrite(self.file.as_raw_fd(), guard.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        self.offset += n as u64;
        Ok(n as usize)
    }
}

/// A heap buffer whose start is aligned to `align` (for `O_DIRECT` bounce I/O), without unsafe
/// allocation: an over-sized `Vec` and an aligned window into it.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1);
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// The aligned bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// The aligned bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}
