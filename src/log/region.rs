//! The mapped dirty-log region: the frontend's log memory as seen by this process.
//!
//! A [`LogRegion`] is a validated, shared, writable view of the vhost-user log: one bit per
//! 4 KiB guest page, bit `p % 64` of little-endian `u64` word `p / 64`. It is the only type in
//! the crate that touches log memory through raw pointers, and it does so only inside the
//! length it validated when it was created, so every caller above it works on safe indices.
//!
//! Three constructors cover the three ways a log reaches a process:
//! - [`LogRegion::from_fd`]: the `SET_LOG_BASE` triple (fd, `mmap_size`, `mmap_offset`),
//!   checked against the file's real size before it is mapped, so a short fd is an error
//!   instead of a `SIGBUS` on the first mark;
//! - [`LogRegion::anonymous`]: private memory, for tests, fuzzing and benchmarks;
//! - `LogRegion::from_stock` (crate-private): the mapping `vhost-user-backend`'s stock
//!   `SET_LOG_BASE` handler made, validated after the fact (see [`crate::log::bitmap`]).

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::bitmap::MmapLogReg;

use super::sync::{AtomicU64, AtomicU8};
use super::{LogError, LOG_PAGE_SIZE};
use crate::bits::{first_word_mask, last_word_mask, word_mask};

/// Who keeps the log memory alive and how it is released.
enum Owner {
    /// We called `mmap`; `munmap(map_base, map_len)` on drop.
    Mmap {
        map_base: NonNull<u8>,
        map_len: usize,
    },
    /// vhost-user-backend's handler mapped it; the `Arc` keeps that mapping alive. The region
    /// is a view of the mapping's first `len` bytes; `capacity` is the mapping's length, of
    /// which only the view has been proven backed (see [`LogRegion::widened`]).
    Stock {
        map: Arc<MmapLogReg>,
        capacity: usize,
    },
    /// Under `cfg(loom)` only: the log's words and tail bytes are loom's instrumented atomics
    /// (loom cannot observe accesses to raw memory), so the model checks run the real marking
    /// and merging code on them.
    #[cfg(loom)]
    Loom {
        words: Box<[AtomicU64]>,
        tail: Box<[AtomicU8]>,
    },
}

/// A validated, mapped vhost-user dirty log.
///
/// Marks go through [`LogRegion::mark_pages`]; the VMM side consumes the log with
/// [`MigrationBitmap::sync_from_log`](crate::vmm::MigrationBitmap::sync_from_log) (one atomic
/// swap per dirty word). There is deliberately no public view of the log's atomics: a caller
/// holding one could clear a bit without taking it (a load followed by a store of zero), the
/// lost-page bug DESIGN.md invariant 3 forbids; the views are crate-private, and a test-only
/// one exists for test tooling (`LogRegion::raw_words`, with the `test-utils` feature). Reading is
/// free: [`test_page`](Self::test_page), [`count_set`](Self::count_set),
/// [`snapshot`](Self::snapshot). The region never reads or writes outside `len_bytes()` bytes
/// from its base.
pub struct LogRegion {
    /// First byte of the log (8-byte aligned).
    base: NonNull<u8>,
    /// Usable log length in bytes.
    len: usize,
    owner: Owner,
}

// SAFETY: the region is a plain memory mapping that is only accessed through atomics
// (`AtomicU64` / `AtomicU8` views); the raw pointer is never handed out mutably, so moving the
// owner to another thread is sound.
unsafe impl Send for LogRegion {}
// SAFETY: all shared access to the mapped bytes goes through atomic types, so concurrent
// `&LogRegion` use from several threads cannot cause a data race in this process.
unsafe impl Sync for LogRegion {}

impl fmt::Debug for LogRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogRegion")
            .field("base", &self.base)
            .field("len", &self.len)
            .field("pages", &self.pages())
            .finish()
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 {
        4096
    } else {
        v as u64
    }
}

impl LogRegion {
    /// Maps `size` bytes of `fd` starting at `offset`, shared and writable, as
    /// `VHOST_USER_SET_LOG_BASE` describes.
    ///
    /// Every parameter is checked before `mmap`: a zero size, `offset + size` overflowing, a
    /// range past the end of the file, a size that does not fit the address space and an offset
    /// that would leave the log misaligned for 64-bit atomics are each a [`LogError`].
    pub fn from_fd(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<Self, LogError> {
        #[cfg(loom)]
        if size != 0 {
            return Err(LogError::Map(std::io::Error::other(
                "mapped logs are not available under cfg(loom)",
            )));
        }
        if size == 0 {
            return Err(LogError::ZeroSize);
        }
        let end = offset
            .checked_add(size)
            .ok_or(LogError::Overflow { offset, size })?;
        if size > isize::MAX as u64 / 2 {
            return Err(LogError::TooLarge { size });
        }
        if !offset.is_multiple_of(8) {
            return Err(LogError::Misaligned { offset });
        }
        // SAFETY: `st` is a plain-old-data out parameter that fstat fully initialises on
        // success; the fd is valid for the duration of the borrow.
        let file_len = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return Err(LogError::Stat(std::io::Error::last_os_error()));
            }
            st.st_size as u64
        };
        if end > file_len {
            return Err(LogError::PastEnd {
                offset,
                size,
                file_len,
            });
        }
        let ps = page_size();
        let map_off = offset - offset % ps;
        let delta = (offset - map_off) as usize;
        let map_len = size as usize + delta;
        let map_off_t =
            libc::off_t::try_from(map_off).map_err(|_| LogError::Overflow { offset, size })?;
        // SAFETY: we ask the kernel for a fresh mapping (no MAP_FIXED), so no existing memory
        // is affected; length and offset were validated against the file above.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                map_off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LogError::Map(std::io::Error::last_os_error()));
        }
        let map_base = NonNull::new(ptr as *mut u8)
            .ok_or(LogError::Map(std::io::Error::other("mmap returned NULL")))?;
        // SAFETY: `delta < ps <= map_len`, so the result stays inside the new mapping.
        let base = unsafe { NonNull::new_unchecked(map_base.as_ptr().add(delta)) };
        Ok(LogRegion {
            base,
            len: size as usize,
            owner: Owner::Mmap { map_base, map_len },
        })
    }

    /// A zeroed private log of exactly `size` bytes, for tests, fuzzing and benchmarks.
    pub fn anonymous(size: usize) -> Result<Self, LogError> {
        if size == 0 {
            return Err(LogError::ZeroSize);
        }
        #[cfg(loom)]
        {
            let words: Box<[AtomicU64]> = (0..size / 8).map(|_| AtomicU64::new(0)).collect();
            let tail: Box<[AtomicU8]> = (0..size % 8).map(|_| AtomicU8::new(0)).collect();
            // Identity only (`same_memory`): never dereferenced under loom.
            let base = if words.is_empty() {
                NonNull::from(&tail[0]).cast::<u8>()
            } else {
                NonNull::from(&words[0]).cast::<u8>()
            };
            return Ok(LogRegion {
                base,
                len: size,
                owner: Owner::Loom { words, tail },
            });
        }
        #[cfg_attr(loom, allow(unreachable_code))]
        let map_len = size
            .checked_next_multiple_of(8)
            .filter(|l| *l <= isize::MAX as usize / 2)
            .ok_or(LogError::TooLarge { size: size as u64 })?;
        // SAFETY: anonymous private mapping, no MAP_FIXED: touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LogError::Map(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr as *mut u8)
            .ok_or(LogError::Map(std::io::Error::other("mmap returned NULL")))?;
        Ok(LogRegion {
            base,
            len: size,
            owner: Owner::Mmap {
                map_base: base,
                map_len,
            },
        })
    }

    /// A view of the first `len` bytes (at most `capacity`) of a log that vhost-user-backend's
    /// stock handler mapped, `capacity` bytes long (see `bitmap::stock_log_len`). The caller
    /// proves the view backed ([`prove_backed`](Self::prove_backed)) before marking through it.
    pub(crate) fn from_stock(
        log: Arc<MmapLogReg>,
        capacity: usize,
        len: usize,
    ) -> Result<Self, LogError> {
        let len = len.min(capacity);
        #[cfg(loom)]
        if len != 0 {
            return Err(LogError::Map(std::io::Error::other(
                "mapped logs are not available under cfg(loom)",
            )));
        }
        if len == 0 {
            return Err(LogError::ZeroSize);
        }
        let base = NonNull::from(&log[0]).cast::<u8>();
        if !(base.as_ptr() as usize).is_multiple_of(8) {
            return Err(LogError::Misaligned {
                offset: base.as_ptr() as u64 % 8,
            });
        }
        Ok(LogRegion {
            base,
            len,
            owner: Owner::Stock { map: log, capacity },
        })
    }

    /// Length in bytes of the mapping this region is a view of (its [`len_bytes`] for every
    /// region but a stock-mapped log's view).
    ///
    /// [`len_bytes`]: Self::len_bytes
    pub fn capacity_bytes(&self) -> usize {
        match &self.owner {
            Owner::Stock { capacity, .. } => *capacity,
            _ => self.len,
        }
    }

    /// A wider view of the same stock-mapped log: its first `len` bytes (at most its
    /// capacity), proven backed. `None` if this is not a stock-mapped view or it is already
    /// that wide. Used when guest memory grows past the part of the log proven so far
    /// (DESIGN.md: a log is proven only as far as guest memory needs).
    pub(crate) fn widened(&self, len: usize) -> Option<Result<LogRegion, LogError>> {
        let Owner::Stock { map, capacity } = &self.owner else {
            return None;
        };
        if len.min(*capacity) <= self.len {
            return None;
        }
        Some(
            LogRegion::from_stock(map.clone(), *capacity, len).and_then(|r| {
                r.prove_backed()?;
                Ok(r)
            }),
        )
    }

    /// True if both regions start at the same log memory (views of one mapping, maybe of
    /// different lengths).
    pub(crate) fn same_mapping(&self, other: &LogRegion) -> bool {
        self.base == other.base
    }

    /// The address of the first log byte, as an identity of the mapping.
    pub(crate) fn base_addr(&self) -> usize {
        self.base.as_ptr() as usize
    }

    /// Log length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// Number of guest pages the log can describe (8 per byte).
    pub fn pages(&self) -> u64 {
        self.len as u64 * 8
    }

    /// Highest guest-physical address + 1 the log covers.
    pub fn covered_gpa_end(&self) -> u64 {
        self.pages().saturating_mul(LOG_PAGE_SIZE)
    }

    /// Checks that the log covers guest-physical addresses `[0, gpa_end)`.
    pub fn check_covers(&self, gpa_end: u64) -> Result<(), LogError> {
        let need_pages = gpa_end.div_ceil(LOG_PAGE_SIZE);
        let need = need_pages.div_ceil(8);
        if need > self.len as u64 {
            return Err(LogError::TooSmall {
                need,
                have: self.len as u64,
            });
        }
        Ok(())
    }

    /// The whole 64-bit words of the log (bit `p % 64` of word `p / 64` is page `p`).
    ///
    /// Crate-private: only the VMM's merges (`crate::vmm`) consume through it, with swaps.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        #[cfg(loom)]
        if let Owner::Loom { words, .. } = &self.owner {
            return words;
        }
        // SAFETY: `base` is 8-byte aligned and valid for `len` bytes for the lifetime of
        // `self` (the owner keeps the mapping); `AtomicU64` has the size and alignment of
        // `u64`, and the memory is only ever accessed atomically through these views.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr() as *const AtomicU64, self.len / 8) }
    }

    /// The bytes after the last whole word (a log whose size is not a multiple of 8).
    ///
    /// Crate-private, as [`words`](Self::words).
    pub(crate) fn tail(&self) -> &[AtomicU8] {
        #[cfg(loom)]
        if let Owner::Loom { tail, .. } = &self.owner {
            return tail;
        }
        let whole = self.len / 8 * 8;
        // SAFETY: `whole <= len`, so the `len - whole` bytes starting there are inside the
        // validated mapping; `AtomicU8` has no alignment requirement beyond 1.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(whole) as *const AtomicU8,
                self.len - whole,
            )
        }
    }

    /// True if the two regions view the same memory.
    pub fn same_memory(&self, other: &LogRegion) -> bool {
        self.base == other.base && self.len == other.len
    }

    /// Sets the bits of pages `first..=last`, one Release `fetch_or` per 64-page word (masked
    /// first and last word). Pages past the end of the log are not touched; their number is
    /// returned so the caller can account for them.
    #[inline]
    pub fn mark_pages(&self, first: u64, last: u64) -> u64 {
        // Fast path: the range lies in one whole word (every write of up to 4 KiB that does not
        // straddle a 256 KiB boundary).
        let w = first / 64;
        if w == last / 64 && w < (self.len / 8) as u64 && first <= last {
            self.word(w as usize)
                .fetch_or(word_mask(first % 64, last % 64), Ordering::Release);
            return 0;
        }
        self.mark_pages_slow(first, last)
    }

    /// Word `w` of the log, without a bounds check in normal builds; `w < len / 8`.
    #[inline(always)]
    fn word(&self, w: usize) -> &AtomicU64 {
        debug_assert!(w < self.len / 8);
        #[cfg(not(loom))]
        {
            // SAFETY: the caller guarantees `w < len / 8`, so the word lies inside the
            // validated, 8-byte aligned mapping; it is only accessed atomically.
            unsafe { &*(self.base.as_ptr() as *const AtomicU64).add(w) }
        }
        #[cfg(loom)]
        {
            &self.words()[w]
        }
    }

    fn mark_pages_slow(&self, first: u64, last: u64) -> u64 {
        if first > last {
            return 0;
        }
        let pages = self.pages();
        let mut dropped = 0;
        let last = if last >= pages {
            dropped = last - first.max(pages) + 1;
            if first >= pages {
                return dropped;
            }
            pages - 1
        } else {
            last
        };
        let words = self.words();
        let whole_pages = words.len() as u64 * 64;
        if first < whole_pages {
            let lastw = last.min(whole_pages - 1);
            let (w0, w1) = ((first / 64) as usize, (lastw / 64) as usize);
            if w0 == w1 {
                let m = word_mask(first % 64, lastw % 64);
                words[w0].fetch_or(m, Ordering::Release);
            } else {
                words[w0].fetch_or(first_word_mask(first), Ordering::Release);
                for w in &words[w0 + 1..w1] {
                    w.fetch_or(!0, Ordering::Release);
                }
                words[w1].fetch_or(last_word_mask(lastw), Ordering::Release);
            }
        }
        if last >= whole_pages {
            self.mark_tail(first.max(whole_pages), last, whole_pages);
        }
        dropped
    }

    #[cold]
    fn mark_tail(&self, first: u64, last: u64, whole_pages: u64) {
        let tail = self.tail();
        for p in first..=last {
            let b = ((p - whole_pages) / 8) as usize;
            tail[b].fetch_or(1 << ((p - whole_pages) % 8), Ordering::Release);
        }
    }

    /// Whether page `page` is set (a relaxed read: for tests and diagnostics, not for sync).
    pub fn test_page(&self, page: u64) -> bool {
        if page >= self.pages() {
            return false;
        }
        let words = self.words();
        let w = (page / 64) as usize;
        if w < words.len() {
            words[w].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
        } else {
            let rest = page - words.len() as u64 * 64;
            self.tail()[(rest / 8) as usize].load(Ordering::Relaxed) & (1 << (rest % 8)) != 0
        }
    }

    /// Number of set bits (relaxed reads; diagnostics).
    pub fn count_set(&self) -> u64 {
        let w: u64 = self
            .words()
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        let t: u64 = self
            .tail()
            .iter()
            .map(|b| b.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        w + t
    }

    /// A copy of the log's whole words, read with relaxed loads (bit `p % 64` of word `p / 64`
    /// is page `p`; the tail bytes of a log whose size is not a multiple of 8 are not included,
    /// see [`test_page`](Self::test_page)). For diagnostics and tests: reading never clears
    /// anything.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words()
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    /// Proves the log backed by its file, so a log whose file is shorter than its mapping is
    /// reported now instead of raising `SIGBUS` on a later mark: touches every page of the
    /// view for writing, and the last page of the whole mapping. A file has no holes that
    /// fault (holes read as zeros); only bytes past its end raise `SIGBUS`, so a backed last
    /// page proves the whole mapping backed, while only the view (what guest memory needs) is
    /// populated: an oversized sparse log costs one page, not its size.
    ///
    /// Uses `MADV_POPULATE_WRITE` (Linux 5.14+), which fails with `EFAULT` exactly where an
    /// access would raise `SIGBUS`. On older kernels (`EINVAL`) the check is skipped.
    pub(crate) fn prove_backed(&self) -> Result<(), LogError> {
        #[cfg(loom)]
        if let Owner::Loom { .. } = self.owner {
            return Ok(());
        }
        let ps = page_size() as usize;
        let start = self.base.as_ptr() as usize;
        let aligned = start - start % ps;
        let len = (start + self.len - aligned).next_multiple_of(ps);
        populate(aligned, len)?;
        let end = start + self.capacity_bytes();
        if end > aligned + len {
            let last = (end - 1) - (end - 1) % ps;
            populate(last, ps)?;
        }
        Ok(())
    }
}

/// `MADV_POPULATE_WRITE` over `[addr, addr + len)` (page-aligned, inside one of our log
/// mappings).
fn populate(addr: usize, len: usize) -> Result<(), LogError> {
    // SAFETY: callers pass a page-aligned range inside a live log mapping (rounded to whole
    // pages of the same mapping); MADV_POPULATE_WRITE only faults pages in, it never changes
    // their contents.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => Ok(()),
        Some(libc::EFAULT) | Some(libc::ENOMEM) => Err(LogError::NotBacked),
        _ => Err(LogError::Map(err)),
    }
}

impl Drop for LogRegion {
    fn drop(&mut self) {
        if let Owner::Mmap { map_base, map_len } = self.owner {
            // SAFETY: `map_base`/`map_len` describe exactly the mapping this region created,
            // and no reference into it outlives `self` (all views borrow `self`).
            unsafe {
                libc::munmap(map_base.as_ptr() as *mut libc::c_void, map_len);
            }
        }
    }
}

/// Raw access to the log's atomics, for test tooling only: compiled with `cfg(test)`,
/// `cfg(loom)`, `cfg(fuzzing)` or the `test-utils` feature, never for a VMM or backend build
/// without it.
///
/// With these a caller can clear a bit without consuming it, which DESIGN.md invariant 3
/// forbids in production. Tests use them for what production must not do: negative controls
/// (a load-then-store clear must be caught), benchmark set-up (refill a log with a pattern
/// between timed syncs, and time a bare scan and the bare swaps as baselines) and test set-up
/// (wipe a log between steps).
#[cfg(any(test, loom, fuzzing, feature = "test-utils"))]
impl LogRegion {
    /// Test tooling: the log's whole 64-bit words as atomics (bit `p % 64` of word `p / 64`
    /// is page `p`). To consume a log use
    /// [`MigrationBitmap::sync_from_log`](crate::vmm::MigrationBitmap::sync_from_log); to read
    /// it, [`snapshot`](Self::snapshot).
    pub fn raw_words(&self) -> &[AtomicU64] {
        self.words()
    }

    /// Test tooling: clears every bit with relaxed stores (test set-up between steps, on a log
    /// nothing marks concurrently; a VMM consumes a log with swaps instead).
    pub fn clear_all(&self) {
        for w in self.words() {
            w.store(0, Ordering::Relaxed);
        }
        for b in self.tail() {
            b.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_bytes_are_marked() {
        // 8 whole bytes + 3 tail bytes: pages 64..88 live in the tail.
        let r = LogRegion::anonymous(11).unwrap();
        assert_eq!(r.words().len(), 1);
        assert_eq!(r.tail().len(), 3);
        assert_eq!(r.mark_pages(60, 100), 100 - 88 + 1);
        for p in 0..100 {
            assert_eq!(r.test_page(p), (60..88).contains(&p), "page {p}");
        }
        assert_eq!(r.count_set(), 28);
    }

    #[test]
    fn marks_past_end_are_counted_not_written() {
        let r = LogRegion::anonymous(8).unwrap();
        assert_eq!(r.mark_pages(64, 70), 7);
        assert_eq!(r.mark_pages(u64::MAX - 1, u64::MAX), 2);
        assert_eq!(r.count_set(), 0);
        assert_eq!(r.mark_pages(5, 3), 0);
    }
}
