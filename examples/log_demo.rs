//! The log core in one screen: a VMM allocates a shared log, a "device" writes guest memory
//! through vm-memory with the dirty bitmap, and the VMM syncs the log into its migration bitmap.
//!
//! Run: `cargo run --release --example log_demo`

use std::sync::Arc;

use vhost_dirtylog::log::{DirtyLog, GuestDirtyBitmap, LogRegion, LOG_PAGE_SIZE};
use vhost_dirtylog::vmm::{MigrationBitmap, SharedLog};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const MIB: u64 = 1 << 20;
    // Guest memory: 16 MiB at 0 and 16 MiB at 4 GiB (a hole in between, as on a real PC).
    let layout = [
        (GuestAddress(0), 16 * MIB as usize),
        (GuestAddress(4 << 30), 16 * MIB as usize),
    ];
    let mem: GuestMemoryMmap<GuestDirtyBitmap> = GuestMemoryMmap::from_ranges(&layout)?;
    let gpa_end = (4 << 30) + 16 * MIB;

    // VMM side: a memfd log covering all guest memory (what SET_LOG_BASE would hand over).
    let shared = SharedLog::new(gpa_end)?;
    let r = shared.dirty_log_region();
    println!(
        "VMM: shared log of {} bytes for {} guest pages (fd {}, offset {})",
        r.mmap_size,
        shared.guest_pages(),
        r.mmap_handle,
        r.mmap_offset
    );

    // Backend side: map the same fd, attach it, bind the regions, turn LOG_ALL on.
    let backend_view = LogRegion::from_fd(shared.fd(), r.mmap_offset, r.mmap_size)?;
    let log = DirtyLog::new();
    log.replace_region(Some(Arc::new(backend_view)));
    GuestDirtyBitmap::bind_memory(&mem, &log);

    mem.write_slice(b"before LOG_ALL", GuestAddress(0x1000))?;
    log.set_logging(true);

    // The "device" writes: a small header, a 64 KiB read straddling pages, and a write in the
    // high region. vm-memory marks them; nothing else is needed in device code.
    mem.write_obj(0xdead_beef_u64, GuestAddress(0x2ff8))?;
    mem.write_slice(&vec![0xab; 64 << 10], GuestAddress(0x10_0800))?;
    mem.write_slice(b"high memory", GuestAddress((4 << 30) + 5 * LOG_PAGE_SIZE))?;
    // A write that bypasses vm-memory (e.g. O_DIRECT preadv into host memory) marks explicitly.
    log.mark(0x80_0000, 3 * LOG_PAGE_SIZE);

    // VMM side: one pre-copy round.
    let bitmap = MigrationBitmap::new(gpa_end / LOG_PAGE_SIZE)?;
    let newly = bitmap.sync_from_log(&shared, 0);
    println!("VMM: sync found {newly} newly dirty pages:");
    for p in bitmap.iter() {
        println!("  page {p:>8}  GPA {:#012x}", p * LOG_PAGE_SIZE);
    }
    println!(
        "VMM: log now holds {} set bits (consumed by the sync); backend stats: {:?}",
        shared.region().count_set(),
        log.stats()
    );
    Ok(())
}
