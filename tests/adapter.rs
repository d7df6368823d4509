//! The adapter under the stock vhost-user-backend daemon, over a real unix socket: feature
//! advertisement, LOG_ALL switching, SET_LOG_BASE through the stock handler (and its
//! replacement), regions added after the log, and hostile logs.

use std::os::fd::AsFd;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_dirtylog::backend::DirtyLogBackend;
use vhost_dirtylog::driver::{Connection, GuestRam, RegionSpec};
use vhost_dirtylog::log::{log_size_for, GuestDirtyBitmap, LogRegion};
use vhost_dirtylog::test_utils::{memfd, set_pages, InProcessDaemon, NullDevice};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// The adapter over a null device, served in-process, and the frontend connected to it.
struct Session {
    daemon: InProcessDaemon<GuestDirtyBitmap>,
    conn: Connection,
    /// Guest RAM handed to the backend (kept alive, as a VMM keeps it).
    ram: Option<GuestRam>,
}

/// Negotiates every offered feature but LOG_ALL, and LOG_SHMFD, REPLY_ACK and
/// CONFIGURE_MEM_SLOTS where offered.
fn connect(daemon: &InProcessDaemon<GuestDirtyBitmap>) -> Connection {
    let mut conn = daemon.connect();
    conn.negotiate(
        !LOG_ALL,
        VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    )
    .unwrap();
    conn
}

fn session() -> (Session, DirtyLogBackend<NullDevice>) {
    let dev = NullDevice::new(
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    );
    let backend = DirtyLogBackend::new(dev);
    let daemon = InProcessDaemon::start(backend.clone());
    let conn = connect(&daemon);
    assert!(conn.offered_features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    assert!(
        conn.protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "backend must offer LOG_SHMFD"
    );
    let s = Session {
        daemon,
        conn,
        ram: None,
    };
    (s, backend)
}

impl Session {
    /// SET_MEM_TABLE with memfd regions at the given (gpa, size) pairs.
    fn set_mem_table(&mut self, layout: &[(u64, u64)]) {
        let specs: Vec<RegionSpec> = layout.iter().map(|&(g, s)| RegionSpec::new(g, s)).collect();
        let ram = GuestRam::new(&specs).unwrap();
        self.conn.set_mem_table(&ram).unwrap();
        self.ram = Some(ram);
    }

    /// ADD_MEM_REG of a new region.
    fn add_region(&mut self, gpa: u64, size: u64) {
        let ram = self.ram.as_ref().unwrap();
        ram.add_region(RegionSpec::new(gpa, size)).unwrap();
        self.conn.add_mem_region(ram, gpa).unwrap();
    }

    /// Closes the connection and waits for the daemon thread to end; returns its result.
    fn finish(self) -> Result<(), String> {
        drop(self.conn);
        self.daemon.join()
    }
}

fn write(s: &Session, gpa: u64, len: usize) {
    s.daemon
        .mem
        .memory()
        .write_slice(&vec![0xA5; len], GuestAddress(gpa))
        .unwrap();
}

fn logged(log: &LogRegion) -> Vec<u64> {
    set_pages(log).collect()
}

#[test]
fn adapter_advertises_migration_features() {
    let (s, _) = session();
    assert!(s.conn.offered_features() & LOG_ALL != 0);
    let plain = InProcessDaemon::start(NullDevice::<GuestDirtyBitmap>::new(
        VhostUserProtocolFeatures::REPLY_ACK,
    ));
    assert_eq!(connect(&plain).offered_features() & LOG_ALL, 0);
}

#[test]
fn writes_are_logged_by_guest_physical_address_only_with_log_all() {
    let (mut s, backend) = session();
    // Two regions with a hole between them.
    s.set_mem_table(&[(0, MIB), (4 * MIB, MIB)]);
    let size = log_size_for(5 * MIB).unwrap();
    let logfd = memfd("log", size).unwrap();
    s.conn.set_log_fd(logfd.as_fd(), 0, size).unwrap();
    let vmm = LogRegion::from_fd(logfd.as_fd(), 0, size).unwrap();

    write(&s, 4 * MIB + 5000, 10);
    assert!(logged(&vmm).is_empty(), "logged with LOG_ALL off");
    assert!(!backend.log().is_logging());

    s.conn.set_log_all(true).unwrap();
    assert!(backend.log().is_logging());
    write(&s, 4 * MIB + 5000, 10);
    write(&s, 3 * PAGE - 2, 4);
    assert_eq!(logged(&vmm), vec![2, 3, 4 * MIB / PAGE + 1]);

    s.conn.set_log_all(false).unwrap();
    write(&s, 7 * PAGE, 1);
    assert!(!vmm.test_page(7));
    assert_eq!(backend.log().stats(), Default::default());
}

#[test]
fn region_added_after_set_log_base_is_logged() {
    let (mut s, _) = session();
    s.set_mem_table(&[(0, MIB)]);
    let size = log_size_for(16 * MIB).unwrap();
    let logfd = memfd("log", size).unwrap();
    s.conn.set_log_fd(logfd.as_fd(), 0, size).unwrap();
    s.conn.set_log_all(true).unwrap();
    s.add_region(8 * MIB, 2 * MIB);
    let vmm = LogRegion::from_fd(logfd.as_fd(), 0, size).unwrap();
    write(&s, 9 * MIB + 3 * PAGE, 1);
    assert_eq!(logged(&vmm), vec![9 * MIB / PAGE + 3]);
}

#[test]
fn second_set_log_base_replaces_the_log() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, 2 * MIB)]);
    let size = log_size_for(2 * MIB).unwrap();
    let first = memfd("log1", size).unwrap();
    s.conn.set_log_fd(first.as_fd(), 0, size).unwrap();
    s.conn.set_log_all(true).unwrap();
    write(&s, 0, 1);
    // A bigger log, at an offset inside its fd.
    let second = memfd("log2", 3 * size + 4096).unwrap();
    s.conn.set_log_fd(second.as_fd(), 4096, 3 * size).unwrap();
    write(&s, 5 * PAGE, 1);
    let a = LogRegion::from_fd(first.as_fd(), 0, size).unwrap();
    let b = LogRegion::from_fd(second.as_fd(), 4096, 3 * size).unwrap();
    assert_eq!(logged(&a), vec![0]);
    assert_eq!(logged(&b), vec![5]);
    let cur = backend.log().region().unwrap();
    assert_eq!(
        cur.capacity_bytes() as u64,
        3 * size,
        "the stock mapping's length must be recovered exactly"
    );
    assert_eq!(
        cur.len_bytes() as u64,
        size,
        "only what guest memory needs is put to use"
    );
}

/// Issue 13, input 2: an oversized log is not allocated in full. Memory [0, 1 MiB) needs 32
/// bytes of log; a sparse 4 GiB log is accepted at once and only what memory needs (plus the
/// last page, to prove the fd long enough) is allocated. Before: all 4 GiB were populated
/// (9.8 s, during which the handler answered nothing).
#[test]
fn oversized_log_is_mapped_lazily_and_absurd_log_is_refused() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, MIB)]);
    let big = 4u64 << 30;
    let logfd = memfd("big", big).unwrap();
    let t = std::time::Instant::now();
    s.conn.set_log_fd(logfd.as_fd(), 0, big).unwrap();
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(1),
        "SET_LOG_BASE took {took:?}"
    );
    let allocated = allocated_bytes(&logfd);
    assert!(
        allocated <= 64 * 1024,
        "{allocated} bytes of the log allocated"
    );
    let cur = backend.log().region().unwrap();
    assert_eq!((cur.capacity_bytes() as u64, cur.len_bytes()), (big, 32));
    // It logs like any other log, and grows with memory (ADD_MEM_REG far up).
    s.conn.set_log_all(true).unwrap();
    s.add_region(512 * MIB, MIB);
    write(&s, 512 * MIB + PAGE, 1);
    let vmm = LogRegion::from_fd(logfd.as_fd(), 0, big).unwrap();
    assert!(vmm.test_page(512 * MIB / PAGE + 1));
    assert!(allocated_bytes(&logfd) <= 128 * 1024);
    let _ = s.finish();

    // A log bigger than any guest-physical address space is refused with a clear error.
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, MIB)]);
    let absurd = vhost_dirtylog::log::MAX_LOG_BYTES + 4096;
    let logfd = memfd("absurd", absurd).unwrap();
    assert!(s.conn.set_log_fd(logfd.as_fd(), 0, absurd).is_err());
    assert!(backend.log().region().is_none());
    let _ = s.finish();
}

/// Bytes of a file actually allocated (`st_blocks`).
fn allocated_bytes(f: &std::fs::File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().unwrap().blocks() * 512
}

/// Issue 13, input 3: memory added past the end of the log while logging is not lost.
/// [0, 1 MiB) with a 32-byte log; LOG_ALL on; ADD_MEM_REG [8 MiB, 10 MiB) (or a whole new
/// SET_MEM_TABLE); a device write at GPA 0x903000 (page 2307); then a bigger SET_LOG_BASE: page
/// 2307 must be set in the new log. Before: set in neither log, only counted.
#[test]
fn write_past_the_log_is_carried_into_the_next_log() {
    for whole_table in [false, true] {
        let (mut s, backend) = session();
        s.set_mem_table(&[(0, MIB)]);
        let small = memfd("small", 32).unwrap();
        s.conn.set_log_fd(small.as_fd(), 0, 32).unwrap();
        s.conn.set_log_all(true).unwrap();
        if whole_table {
            s.set_mem_table(&[(0, MIB), (8 * MIB, 2 * MIB)]);
        } else {
            s.add_region(8 * MIB, 2 * MIB);
        }
        write(&s, 0x903000, 1);
        assert_eq!(backend.log().stats().carried_ranges, 1);
        let size = log_size_for(10 * MIB).unwrap();
        assert_eq!(size, 320);
        let bigger = memfd("bigger", 512).unwrap();
        s.conn.set_log_fd(bigger.as_fd(), 0, 512).unwrap();
        let vmm = LogRegion::from_fd(bigger.as_fd(), 0, 512).unwrap();
        assert_eq!(logged(&vmm), vec![2307], "whole table: {whole_table}");
        assert_eq!(backend.log().stats().carried_ranges, 0);
        let _ = s.finish();
    }
}

#[test]
fn log_shorter_than_its_fd_is_rejected_without_sigbus() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, MIB)]);
    // mmap_size says 64 KiB, the fd holds 4 KiB: touching the rest would raise SIGBUS.
    let logfd = memfd("short", 4096).unwrap();
    assert!(s.conn.set_log_fd(logfd.as_fd(), 0, 64 * 1024).is_err());
    assert!(backend.log().region().is_none());
    assert!(
        s.conn.set_log_all(true).is_err(),
        "connection should be closed"
    );
    // The handler dropped the connection for that message; the process is alive and the
    // device's writes are not routed into the bad mapping.
    write(&s, 0, 8);
    let _ = s.finish();
}

#[test]
fn log_too_small_for_guest_memory_is_rejected() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, MIB), (64 * MIB, MIB)]);
    let size = log_size_for(2 * MIB).unwrap();
    let logfd = memfd("small", size).unwrap();
    assert!(s.conn.set_log_fd(logfd.as_fd(), 0, size).is_err());
    assert!(backend.log().region().is_none());
    let _ = s.finish();
}

/// Fuzz finding F6 (backend_messages, after logs became lazily used): a write with LOG_ALL on
/// and no log makes the next log all-dirty, also when the stock handler attaches it one
/// growing view per region. Memory [0, 1 MiB) + [8 MiB, 8 MiB + 64 KiB), a write at GPA
/// 0x803000 (page 2051) before any log: page 2051 must be set in the log.
#[test]
fn write_before_the_first_log_dirties_every_region_of_the_next_log() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, MIB), (8 * MIB, 64 * 1024)]);
    s.conn.set_log_all(true).unwrap();
    write(&s, 0x803000, 1);
    assert_eq!(backend.log().stats().marks_without_log, 1);
    let size = log_size_for(8 * MIB + 64 * 1024).unwrap();
    let logfd = memfd("log", size).unwrap();
    s.conn.set_log_fd(logfd.as_fd(), 0, size).unwrap();
    let vmm = LogRegion::from_fd(logfd.as_fd(), 0, size).unwrap();
    assert!(vmm.test_page(0x803000 / PAGE), "the unlogged write's page");
    assert_eq!(vmm.count_set(), vmm.pages(), "the whole log is dirty");
    let _ = s.finish();
}
