//! Guest RAM for the in-process VMM: memfd-backed regions at arbitrary guest-physical
//! addresses, shareable with a vhost-user backend.
//!
//! Each region is its own `memfd` mapped `MAP_SHARED` here (through vm-memory's
//! [`GuestRegionMmap`]) and sent to the backend in `SET_MEM_TABLE` / `ADD_MEM_REG`; both
//! processes then see the same pages. Layouts may have holes (regions need not be contiguous)
//! and regions can be added and removed at run time, like memory hotplug. All accessors take
//! `&self`, so one [`GuestRam`] can be shared (`Arc`) by a connection and many queue threads.
//!
//! ## The guest's own writes: an emulated hypervisor dirty log
//! In a real VM the guest CPU's writes (descriptors, ring indices, request headers, data it
//! wants written to disk) are tracked by the hypervisor (KVM's dirty log), and only the
//! backend's writes go through the vhost-user log. A migration simulation built on this RAM
//! needs the same split, or every page the in-process driver writes would look like a page the
//! backend forgot to mark. [`GuestRam::track_writes`] attaches a log that every write accessor
//! marks after storing the data, exactly as the backend marks its own log.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwapOption;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    AtomicAccess, ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use super::DriverError;
use crate::log::{LogRegion, LOG_PAGE_SHIFT, LOG_PAGE_SIZE};

/// A guest-memory region to create: `size` bytes at guest-physical `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical start (page aligned).
    pub gpa: u64,
    /// Size in bytes (a positive multiple of the page size).
    pub size: u64,
}

impl RegionSpec {
    /// `size` bytes at `gpa`.
    pub const fn new(gpa: u64, size: u64) -> Self {
        RegionSpec { gpa, size }
    }
    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// Creates an anonymous `memfd` of `size` bytes (close-on-exec).
pub fn memfd(name: &str, size: u64) -> Result<File, DriverError> {
    let cname =
        CString::new(name).map_err(|_| DriverError::Layout("memfd name contains NUL".into()))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; memfd_create
    // returns a new descriptor or -1 and touches no other memory.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(DriverError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Shared guest RAM (see the module docs).
#[derive(Debug)]
pub struct GuestRam {
    mem: RwLock<Arc<GuestMemoryMmap>>,
    /// The emulated hypervisor dirty log of the guest's own writes, if attached.
    tracker: ArcSwapOption<LogRegion>,
}

/// A region taken out of [`GuestRam`]; keeps the mapping (and its fd) alive until dropped, so
/// the frontend can still tell the backend about it (`REM_MEM_REG`).
#[derive(Debug)]
pub struct RemovedRegion {
    region: Arc<GuestRegionMmap>,
}

impl RemovedRegion {
    /// The region as `REM_MEM_REG` describes it.
    pub fn info(&self) -> Result<VhostUserMemoryRegionInfo, DriverError> {
        Ok(VhostUserMemoryRegionInfo::from_guest_region(&self.region)?)
    }
    /// Guest-physical start.
    pub fn gpa(&self) -> u64 {
        self.region.start_addr().0
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.len()
    }
}

fn check_spec(spec: &RegionSpec) -> Result<(), DriverError> {
    if spec.size == 0
        || !spec.size.is_multiple_of(LOG_PAGE_SIZE)
        || !spec.gpa.is_multiple_of(LOG_PAGE_SIZE)
    {
        return Err(DriverError::Layout(format!(
            "region {:#x}+{:#x}: start and size must be non-zero multiples of 4 KiB",
            spec.gpa, spec.size
        )));
    }
    if spec.gpa.checked_add(spec.size).is_none() || usize::try_from(spec.size).is_err() {
        return Err(DriverError::Layout(format!(
            "region {:#x}+{:#x} overflows",
            spec.gpa, spec.size
        )));
    }
    Ok(())
}

fn make_region(spec: &RegionSpec) -> Result<GuestRegionMmap, DriverError> {
    check_spec(spec)?;
    let file = memfd(&format!("guest-ram-{:#x}", spec.gpa), spec.size)?;
    GuestRegionMmap::from_range(
        GuestAddress(spec.gpa),
        spec.size as usize,
        Some(FileOffset::new(file, 0)),
    )
    .map_err(|e| DriverError::Layout(format!("region {:#x}+{:#x}: {e}", spec.gpa, spec.size)))
}

impl GuestRam {
    /// RAM with the given regions (any order; they must not overlap).
    pub fn new(layout: &[RegionSpec]) -> Result<Self, DriverError> {
        if layout.is_empty() {
            return Err(DriverError::Layout("no regions".into()));
        }
        let mut specs = layout.to_vec();
        specs.sort_by_key(|s| s.gpa);
        let regions = specs
            .iter()
            .map(make_region)
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| DriverError::Layout(format!("{e}")))?;
        Ok(GuestRam {
            mem: RwLock::new(Arc::new(mem)),
            tracker: ArcSwapOption::empty(),
        })
    }

    /// Emulates the hypervisor's dirty log for the in-process guest: from now on every write
    /// through this RAM's accessors ([`write`](Self::write), [`fill`](Self::fill),
    /// [`write_obj`](Self::write_obj), [`store`](Self::store) — everything [`SplitQueue`] and
    /// [`BlkQueue`] write: descriptors, ring indices, headers, pre-set status bytes) sets the
    /// bits of the pages it touched in `log`, indexed by guest-physical address, with a Release
    /// `fetch_or` after the data is stored (the backend's own ordering, DESIGN.md invariant 2).
    /// Pages past the end of `log` are not recorded. `None` detaches.
    ///
    /// The backend's writes go to the backend's mapping and are *not* seen here, so a
    /// migration simulation that merges this log and the backend's vhost-user log every round
    /// can blame any page it failed to copy on the backend alone.
    ///
    /// [`SplitQueue`]: super::SplitQueue
    /// [`BlkQueue`]: super::BlkQueue
    pub fn track_writes(&self, log: Option<Arc<LogRegion>>) {
        self.tracker.store(log);
    }

    #[inline]
    fn tracked(&self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        if let Some(t) = &*self.tracker.load() {
            let last = gpa.saturating_add(len as u64 - 1);
            t.mark_pages(gpa >> LOG_PAGE_SHIFT, last >> LOG_PAGE_SHIFT);
        }
    }

    /// One region of `size` bytes at guest-physical 0.
    pub fn single(size: u64) -> Result<Self, DriverError> {
        Self::new(&[RegionSpec::new(0, size)])
    }

    /// The current memory map (a snapshot; later hotplug does not change it).
    pub fn memory(&self) -> Arc<GuestMemoryMmap> {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The regions as `(gpa, size)`, sorted by address.
    pub fn layout(&self) -> Vec<RegionSpec> {
        self.memory()
            .iter()
            .map(|r| RegionSpec::new(r.start_addr().0, r.len()))
            .collect()
    }

    /// One past the highest guest-physical address (what the dirty log must cover).
    pub fn gpa_end(&self) -> u64 {
        self.memory()
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0)
    }

    /// The regions in the form `SET_MEM_TABLE` sends. The fds inside stay valid while the
    /// regions are part of this RAM.
    pub fn region_infos(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, DriverError> {
        self.memory()
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(DriverError::from))
            .collect()
    }

    /// The region containing `gpa`, in the form `ADD_MEM_REG` sends.
    pub fn region_info(&self, gpa: u64) -> Result<VhostUserMemoryRegionInfo, DriverError> {
        let mem = self.memory();
        let r = mem
            .find_region(GuestAddress(gpa))
            .ok_or(DriverError::BadAddress(gpa))?;
        Ok(VhostUserMemoryRegionInfo::from_guest_region(r)?)
    }

    /// Adds a region (hotplug). Send it to the backend with
    /// [`Connection::add_mem_region`](super::Connection::add_mem_region).
    pub fn add_region(&self, spec: RegionSpec) -> Result<(), DriverError> {
        let region = Arc::new(make_region(&spec)?);
        let mut cur = self.mem.write().unwrap_or_else(|e| e.into_inner());
        let new = cur
            .insert_region(region)
            .map_err(|e| DriverError::Layout(format!("{e}")))?;
        *cur = Arc::new(new);
        Ok(())
    }

    /// Removes the region starting at `gpa`.
    pub fn remove_region(&self, gpa: u64) -> Result<RemovedRegion, DriverError> {
        let mut cur = self.mem.write().unwrap_or_else(|e| e.into_inner());
        let size = cur
            .iter()
            .find(|r| r.start_addr().0 == gpa)
            .map(|r| r.len())
            .ok_or(DriverError::BadAddress(gpa))?;
        let (new, region) = cur
            .remove_region(GuestAddress(gpa), size)
            .map_err(|e| DriverError::Layout(format!("{e}")))?;
        *cur = Arc::new(new);
        Ok(RemovedRegion { region })
    }

    /// This process's virtual address of guest-physical `gpa` (what vring addresses are
    /// expressed in, for the backend to translate through the memory table).
    pub fn gpa_to_hva(&self, gpa: u64) -> Result<u64, DriverError> {
        Ok(self.host_ptr(gpa, 1)? as u64)
    }

    /// Host pointer to `len` bytes at `gpa`, which must lie inside one region. Valid while that
    /// region is part of the RAM.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, DriverError> {
        let mem = self.memory();
        let r = mem
            .find_region(GuestAddress(gpa))
            .ok_or(DriverError::BadAddress(gpa))?;
        let off = gpa - r.start_addr().0;
        if off.checked_add(len).is_none_or(|e| e > r.len()) {
            return Err(DriverError::BadAddress(gpa));
        }
        Ok(r.get_host_address(vm_memory::MemoryRegionAddress(off))?)
    }

    /// Reads `buf.len()` bytes at `gpa` (may span adjacent regions).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        self.memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| DriverError::BadAddress(gpa))
    }

    /// Reads `len` bytes at `gpa` into a new vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>, DriverError> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        self.memory()
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| DriverError::BadAddress(gpa))?;
        self.tracked(gpa, data.len());
        Ok(())
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<(), DriverError> {
        self.write(gpa, &vec![byte; len])
    }

    /// Reads a plain-old-data value at `gpa`.
    pub fn read_obj<T: ByteValued>(&self, gpa: u64) -> Result<T, DriverError> {
        self.memory()
            .read_obj(GuestAddress(gpa))
            .map_err(|_| DriverError::BadAddress(gpa))
    }

    /// Writes a plain-old-data value at `gpa`.
    pub fn write_obj<T: ByteValued>(&self, val: T, gpa: u64) -> Result<(), DriverError> {
        self.memory()
            .write_obj(val, GuestAddress(gpa))
            .map_err(|_| DriverError::BadAddress(gpa))?;
        self.tracked(gpa, std::mem::size_of::<T>());
        Ok(())
    }

    /// Atomic load at `gpa` (naturally aligned).
    pub fn load<T: AtomicAccess>(&self, gpa: u64, order: Ordering) -> Result<T, DriverError> {
        self.memory()
            .load(GuestAddress(gpa), order)
            .map_err(|_| DriverError::BadAddress(gpa))
    }

    /// Atomic store at `gpa` (naturally aligned).
    pub fn store<T: AtomicAccess>(
        &self,
        val: T,
        gpa: u64,
        order: Ordering,
    ) -> Result<(), DriverError> {
        self.memory()
            .store(val, GuestAddress(gpa), order)
            .map_err(|_| DriverError::BadAddress(gpa))?;
        self.tracked(gpa, std::mem::size_of::<T>());
        Ok(())
    }

    /// A copy of every region's contents, to compare against later.
    pub fn snapshot(&self) -> RamSnapshot {
        let mem = self.memory();
        let regions = mem
            .iter()
            .map(|r| {
                let mut data = vec![0u8; r.len() as usize];
                // A whole region of our own map: cannot fail.
                let _ = mem.read_slice(&mut data, r.start_addr());
                (r.start_addr().0, data)
            })
            .collect();
        RamSnapshot { regions }
    }

    /// 4 KiB guest pages whose contents differ from `snap` (regions absent on either side are
    /// ignored), sorted.
    pub fn changed_pages(&self, snap: &RamSnapshot) -> Vec<u64> {
        let now = self.snapshot();
        let mut pages = Vec::new();
        for (gpa, old) in &snap.regions {
            let Some((_, new)) = now
                .regions
                .iter()
                .find(|(g, n)| g == gpa && n.len() == old.len())
            else {
                continue;
            };
            for (i, (a, b)) in old
                .chunks(LOG_PAGE_SIZE as usize)
                .zip(new.chunks(LOG_PAGE_SIZE as usize))
                .enumerate()
            {
                if a != b {
                    pages.push((gpa >> LOG_PAGE_SHIFT) + i as u64);
                }
            }
        }
        pages
    }
}

/// Contents of guest RAM at one moment ([`GuestRam::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamSnapshot {
    /// `(gpa, bytes)` per region.
    pub regions: Vec<(u64, Vec<u8>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_writes_mark_their_pages() {
        let ram = GuestRam::new(&[
            RegionSpec::new(0, 1 << 20),
            RegionSpec::new(4 << 20, 1 << 20),
        ])
        .unwrap();
        // Untracked writes mark nothing.
        ram.write(0x1000, &[1; 16]).unwrap();
        let log = Arc::new(
            LogRegion::anonymous(crate::log::log_size_for(8 << 20).unwrap() as usize).unwrap(),
        );
        ram.track_writes(Some(log.clone()));
        assert_eq!(log.count_set(), 0);
        // A write straddling a page boundary marks both pages.
        ram.write(0x2ff8, &[2; 16]).unwrap();
        ram.fill((4 << 20) + 0x5000, 1, 3).unwrap();
        ram.write_obj(7u32, 0x9000).unwrap();
        ram.store(1u16, 0xa002, Ordering::Release).unwrap();
        let set: Vec<u64> = (0..log.pages()).filter(|&p| log.test_page(p)).collect();
        assert_eq!(set, [2, 3, 9, 0xa, (4 << 20 >> LOG_PAGE_SHIFT) + 5]);
        // Failed writes and reads mark nothing; detaching stops tracking.
        log.clear_all();
        assert!(ram.write(2 << 20, &[0; 8]).is_err());
        let _ = ram.read_vec(0x2000, 64).unwrap();
        ram.track_writes(None);
        ram.write(0x3000, &[1]).unwrap();
        assert_eq!(log.count_set(), 0);
    }
}
