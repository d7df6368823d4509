//! The vm-memory bitmap that routes guest-memory writes to the dirty log.
//!
//! vm-memory calls [`Bitmap::mark_dirty`] with an offset *inside a region* after every write it
//! performs (`write_slice`, `write_obj`, volatile copies, virtio-queue's used-ring updates); the
//! log is indexed by *guest-physical address*. [`GuestDirtyBitmap`] closes that gap: each region
//! owns one slot that is bound once to the [`DirtyLog`] handle and the region's guest-physical
//! base, and every slice of the region shares it.
//!
//! ## Why a binding step, and how no write slips through it
//! vm-memory creates a region's bitmap with [`NewBitmap::with_len`], which knows neither the
//! region's guest address nor the log. vhost-user-backend publishes a new memory table to the
//! vring workers *before* it calls the backend's `update_memory`, where the adapter
//! ([`crate::backend`]) binds each region. A write in that window must not be lost, so an
//! unbound slot remembers that it was written (one flag, SeqCst) and the binder, after
//! publishing the binding (SeqCst fence), marks the whole region if the flag is set. Either the
//! writer sees the binding and marks through it, or the binder sees the flag: a store-buffer
//! handshake with a SeqCst fence on each side. Over-marking one region once is harmless; a lost
//! page is not.
//!
//! ## Why we implement vhost-user-backend's bitmap traits and still validate the log ourselves
//! The stock `SET_LOG_BASE` handler maps the log (`MmapLogReg`) and hands it to
//! [`MemRegionBitmap::new`] for each region, then calls [`BitmapReplace::replace`]. We accept
//! that mapping, but the crate neither exposes its length nor checks the fd's size, so a hostile
//! frontend could give a 4 KiB fd with a 1 MiB `mmap_size` and have the first mark raise
//! `SIGBUS`. We therefore (1) recover the mapped length by asking vhost-user-backend's own bounds
//! check ([`AtomicBitmapMmap::new`]) about probe regions — a binary search, no memory touched —
//! and (2) prove every page of it is backed with `MADV_POPULATE_WRITE`, which fails with
//! `EFAULT` exactly where an access would fault. A log that fails either check, or that does not
//! cover the region, fails the `SET_LOG_BASE` message with a clear error.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice, BS};
use vm_memory::mmap::NewBitmap;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestUsize,
};

use super::sync::{fence, AtomicBool, Mutex, OnceLock};
use super::{DirtyLog, LogError, LogRegion, LOG_PAGE_SHIFT, LOG_PAGE_SIZE, MAX_LOG_BYTES};

struct Binding {
    log: DirtyLog,
    gpa: u64,
}

#[derive(Default)]
struct Slot {
    /// Length of the region in bytes (0 for a default-constructed bitmap).
    len: usize,
    binding: OnceLock<Binding>,
    /// Set by a write that found the slot unbound (see module docs).
    written_unbound: AtomicBool,
    /// A log the stock handler attached before this region was bound.
    pending_log: Mutex<Option<Arc<LogRegion>>>,
}

/// A [`Bitmap`] for `GuestMemoryMmap<GuestDirtyBitmap>` that marks guest writes in the vhost-user
/// dirty log by guest-physical address.
///
/// Bind each region once (the [`crate::backend`] adapter does it in `update_memory`; without the
/// adapter call [`bind_memory`](Self::bind_memory)). After that, every write vm-memory or
/// virtio-queue makes through the region is logged whenever the bound [`DirtyLog`] is logging.
#[derive(Clone, Default)]
pub struct GuestDirtyBitmap {
    slot: Arc<Slot>,
    /// Offset of this slice inside the region.
    base: usize,
}

impl std::fmt::Debug for GuestDirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDirtyBitmap")
            .field("len", &self.slot.len)
            .field("gpa", &self.slot.binding.get().map(|b| b.gpa))
            .field("base", &self.base)
            .finish()
    }
}

impl GuestDirtyBitmap {
    /// Binds this region's bitmap to `log`, with the region starting at guest-physical
    /// `gpa_base`. A region is bound once; binding it again to the same log and address is a
    /// no-op, anything else is refused with a warning (a region never moves).
    pub fn bind(&self, log: &DirtyLog, gpa_base: u64) {
        let slot = &self.slot;
        let mut fresh = false;
        let b = slot.binding.get_or_init(|| {
            fresh = true;
            Binding {
                log: log.clone(),
                gpa: gpa_base,
            }
        });
        if !fresh {
            if !(b.log.ptr_eq(log) && b.gpa == gpa_base) {
                log::warn!(
                    "region bitmap already bound at GPA {:#x}; ignoring rebind to {gpa_base:#x}",
                    b.gpa
                );
            }
            return;
        }
        // Pairs with the fence in `mark_unbound`: either that writer sees the binding, or we
        // see its flag.
        fence(Ordering::SeqCst);
        if slot.written_unbound.load(Ordering::SeqCst) {
            b.log.mark(b.gpa, slot.len as u64);
        }
        let pending = slot
            .pending_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(region) = pending {
            attach_if_new(&b.log, region);
        }
    }

    /// Binds every region of `mem` to `log` at its guest-physical address.
    pub fn bind_memory(mem: &GuestMemoryMmap<GuestDirtyBitmap>, log: &DirtyLog) {
        for region in mem.iter() {
            region.bitmap().bind(log, region.start_addr().raw_value());
        }
    }

    /// Guest-physical address of the start of this slice, once bound.
    pub fn gpa(&self) -> Option<u64> {
        self.slot.binding.get().map(|b| b.gpa + self.base as u64)
    }

    #[cold]
    fn mark_unbound(&self) {
        self.slot.written_unbound.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if let Some(b) = self.slot.binding.get() {
            // The binder may have missed our flag: mark through the binding ourselves.
            b.log.mark(b.gpa, self.slot.len as u64);
        }
    }
}

impl Bitmap for GuestDirtyBitmap {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        let Some(b) = self.slot.binding.get() else {
            return self.mark_unbound();
        };
        let off = self.base.saturating_add(offset) as u64;
        // Into this thread's `LogBatch::scope`, if one of this log is running.
        b.log.mark_routed(b.gpa.saturating_add(off), len as u64);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let Some(b) = self.slot.binding.get() else {
            return false;
        };
        let gpa = b
            .gpa
            .saturating_add(self.base.saturating_add(offset) as u64);
        b.log
            .region()
            .is_some_and(|r| r.test_page(gpa >> LOG_PAGE_SHIFT))
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        GuestDirtyBitmap {
            slot: self.slot.clone(),
            base: self.base.saturating_add(offset),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for GuestDirtyBitmap {
    type S = Self;
}

impl BitmapSlice for GuestDirtyBitmap {}

impl NewBitmap for GuestDirtyBitmap {
    fn with_len(len: usize) -> Self {
        GuestDirtyBitmap {
            slot: Arc::new(Slot {
                len,
                ..Slot::default()
            }),
            base: 0,
        }
    }
}

/// A log that vhost-user-backend's stock `SET_LOG_BASE` handler mapped, validated for one
/// region; [`BitmapReplace::replace`] makes it the bound [`DirtyLog`]'s current log.
#[derive(Debug)]
pub struct StockLogAttach {
    region: Arc<LogRegion>,
}

impl MemRegionBitmap for StockLogAttach {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> std::io::Result<Self> {
        let capacity = stock_log_len(&logmem).ok_or(LogError::ZeroSize)?;
        if capacity as u64 > MAX_LOG_BYTES {
            return Err(LogError::Absurd {
                size: capacity as u64,
                max: MAX_LOG_BYTES,
            }
            .into());
        }
        let end = region
            .start_addr()
            .raw_value()
            .checked_add(region.len())
            .ok_or(LogError::Overflow {
                offset: region.start_addr().raw_value(),
                size: region.len(),
            })?;
        // Only the part of the log this region needs is mapped into use and proven backed:
        // a log far bigger than guest memory (sparse, or hostile) costs nothing more. The
        // view grows with guest memory (`DirtyLog::cover`).
        let need = need_bytes(end);
        if need > capacity as u64 {
            return Err(LogError::TooSmall {
                need,
                have: capacity as u64,
            }
            .into());
        }
        let view = need.next_multiple_of(8).min(capacity as u64) as usize;
        let log = LogRegion::from_stock(logmem, capacity, view)?;
        log.prove_backed()?;
        Ok(StockLogAttach {
            region: Arc::new(log),
        })
    }
}

impl BitmapReplace for GuestDirtyBitmap {
    type InnerBitmap = StockLogAttach;

    fn replace(&self, inner: StockLogAttach) {
        match self.slot.binding.get() {
            Some(b) => attach_if_new(&b.log, inner.region),
            None => {
                *self
                    .slot
                    .pending_log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(inner.region)
            }
        }
    }
}

/// The stock handler calls `replace` once per region with views of the same mapping: attach
/// the first, skip the rest.
/// A view of the same mapping is attached only if it is wider (regions further up in guest
/// memory need more of the log).
fn attach_if_new(log: &DirtyLog, region: Arc<LogRegion>) {
    if let Some(cur) = log.region() {
        if cur.same_mapping(&region) {
            if cur.len_bytes() < region.len_bytes() {
                log.replace_region(Some(region));
            }
            return;
        }
    }
    log::info!(
        "dirty log: attached log of {} bytes, {} in use ({} pages, GPA < {:#x})",
        region.capacity_bytes(),
        region.len_bytes(),
        region.pages(),
        region.covered_gpa_end()
    );
    log.replace_region(Some(region));
}

/// Bytes of log (8 pages a byte) that cover guest-physical addresses `[0, gpa_end)`.
pub(crate) fn need_bytes(gpa_end: u64) -> u64 {
    gpa_end.div_ceil(LOG_PAGE_SIZE).div_ceil(8)
}

/// A region-shaped probe: only its start and length are ever looked at.
struct Probe {
    len: u64,
}

impl GuestMemoryRegion for Probe {
    type B = ();
    fn len(&self) -> GuestUsize {
        self.len
    }
    fn start_addr(&self) -> GuestAddress {
        GuestAddress(0)
    }
    fn bitmap(&self) -> BS<'_, ()> {}
}

impl GuestMemoryRegionBytes for Probe {}

/// Length in bytes of a stock-mapped log, recovered with vhost-user-backend's own bounds check:
/// `AtomicBitmapMmap::new` accepts a region ending in page `8 * i` iff byte `i` exists. The
/// check only compares numbers; no log memory is touched.
fn stock_log_len(log: &Arc<MmapLogReg>) -> Option<usize> {
    let has_byte = |i: u64| {
        let probe = Probe {
            len: (i * 8 + 1) << LOG_PAGE_SHIFT,
        };
        AtomicBitmapMmap::new(&probe, log.clone()).is_ok()
    };
    if !has_byte(0) {
        return None;
    }
    // Invariant: has_byte(lo) && !has_byte(hi).
    let (mut lo, mut hi) = (0u64, 1u64 << 44);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if has_byte(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    usize::try_from(lo + 1).ok()
}
