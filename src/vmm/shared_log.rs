//! The dirty log the VMM allocates and shares with a vhost-user backend.
//!
//! With `VHOST_USER_PROTOCOL_F_LOG_SHMFD` the frontend owns the log: it creates shared memory,
//! maps it itself, and sends the backend an fd plus size and offset in `SET_LOG_BASE`. Like
//! QEMU's vhost log we use an anonymous `memfd`:
//! - `MFD_CLOEXEC`, so the fd leaks into no child the VMM spawns other than by explicit passing;
//! - sized with `ftruncate` to one bit per 4 KiB page of guest-physical address space, rounded
//!   up to whole 64-bit words (the unit both sides operate on);
//! - sealed with `F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`: the backend maps exactly the size
//!   we announced, and because neither side can shrink the file, neither can make the other's
//!   next access to the log raise `SIGBUS`. `F_SEAL_SEAL` keeps anyone from adding seals later
//!   (say `F_SEAL_WRITE`, which would break marking).
//!
//! The VMM's own view is a [`LogRegion`] mapped with [`LogRegion::from_fd`], the very code the
//! backend uses on its side, so both ends agree on the layout by construction.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use vhost::VhostUserDirtyLogRegion;

use super::VmmError;
use crate::log::{log_size_for, LogRegion, LOG_PAGE_SHIFT};

/// Largest guest-physical end address a [`SharedLog`] is made for: 2^52 (4 PiB), the x86-64 and
/// arm64 architectural limit of physical addresses. Its log is 128 GiB of sparse memfd.
pub const MAX_GPA_END: u64 = 1 << 52;

/// A memfd-backed vhost-user dirty log, mapped in the VMM, ready to be sent with
/// `VHOST_USER_SET_LOG_BASE`.
///
/// ```
/// use vhost_dirtylog::vmm::{MigrationBitmap, SharedLog};
///
/// let log = SharedLog::new(1 << 30)?; // 1 GiB of guest memory: 262144 pages, 32 KiB of log
/// assert_eq!(log.size(), 32 * 1024);
/// let region = log.dirty_log_region(); // what `Frontend::set_log_base` takes
/// assert_eq!((region.mmap_size, region.mmap_offset), (32 * 1024, 0));
///
/// let bitmap = MigrationBitmap::new(log.guest_pages())?;
/// log.region().mark_pages(5, 9); // what the backend does after writing pages 5..=9
/// assert_eq!(bitmap.sync_from_log(&log, 0), 5);
/// assert_eq!(bitmap.count_dirty(), 5);
/// # Ok::<(), vhost_dirtylog::vmm::VmmError>(())
/// ```
pub struct SharedLog {
    // Dropped in declaration order: the mapping goes before the fd is closed.
    region: Arc<LogRegion>,
    fd: OwnedFd,
    size: u64,
    gpa_end: u64,
}

impl std::fmt::Debug for SharedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLog")
            .field("fd", &self.fd.as_raw_fd())
            .field("size", &self.size)
            .field("gpa_end", &self.gpa_end)
            .finish()
    }
}

impl SharedLog {
    /// Creates, sizes, seals and maps a zeroed log covering guest-physical addresses
    /// `[0, gpa_end)`.
    ///
    /// Errors: `gpa_end == 0` ([`VmmError::ZeroSize`]), `gpa_end > MAX_GPA_END`
    /// ([`VmmError::GpaTooLarge`]), and any failure of `memfd_create`, `ftruncate`, sealing or
    /// `mmap`.
    pub fn new(gpa_end: u64) -> Result<Self, VmmError> {
        if gpa_end == 0 {
            return Err(VmmError::ZeroSize);
        }
        let too_large = VmmError::GpaTooLarge {
            gpa_end,
            max: MAX_GPA_END,
        };
        if gpa_end > MAX_GPA_END {
            return Err(too_large);
        }
        let size = log_size_for(gpa_end).ok_or(too_large)?;
        let fd = memfd(size)?;
        let region = LogRegion::from_fd(fd.as_fd(), 0, size)?;
        Ok(SharedLog {
            region: Arc::new(region),
            fd,
            size,
            gpa_end,
        })
    }

    /// The log in the form `vhost`'s frontend sends with `SET_LOG_BASE`
    /// (`Frontend::set_log_base(0, Some(log.dirty_log_region()))`): the whole memfd, offset 0.
    ///
    /// The raw fd stays owned by this `SharedLog`; keep it alive until the backend has
    /// acknowledged a replacement log.
    pub fn dirty_log_region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.size,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }

    /// The memfd behind the log.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Log size in bytes (a multiple of 8).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The guest-physical end address the log was made for.
    pub fn gpa_end(&self) -> u64 {
        self.gpa_end
    }

    /// Number of guest pages below [`gpa_end`](Self::gpa_end) (the size a
    /// [`MigrationBitmap`](super::MigrationBitmap) for this guest needs). The log itself has
    /// room for up to 63 more, because it is rounded up to whole words.
    pub fn guest_pages(&self) -> u64 {
        self.gpa_end.div_ceil(1 << LOG_PAGE_SHIFT)
    }

    /// The VMM's mapping of the log.
    pub fn region(&self) -> &Arc<LogRegion> {
        &self.region
    }
}

impl AsRef<LogRegion> for SharedLog {
    fn as_ref(&self) -> &LogRegion {
        &self.region
    }
}

/// Lets the merge functions take a bare [`LogRegion`] (e.g. a test's anonymous log) as well as
/// a [`SharedLog`] or an `Arc<LogRegion>`.
impl AsRef<LogRegion> for LogRegion {
    fn as_ref(&self) -> &LogRegion {
        self
    }
}

impl AsFd for SharedLog {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An anonymous, close-on-exec memfd of `size` bytes, sealed against growing and shrinking.
fn memfd(size: u64) -> Result<OwnedFd, VmmError> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create touches no other memory.
    let raw = unsafe {
        libc::memfd_create(
            c"vhost-dirtylog".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(VmmError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let truncate_err = |source| VmmError::Truncate { size, source };
    let len = libc::off_t::try_from(size)
        .map_err(|_| truncate_err(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
    // SAFETY: ftruncate on an fd we own; no memory arguments.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(truncate_err(std::io::Error::last_os_error()));
    }
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on an fd we own takes an integer argument only.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(VmmError::Seal(std::io::Error::last_os_error()));
    }
    Ok(fd)
}
