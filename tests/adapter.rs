//! The adapter under the stock vhost-user-backend daemon, over a real unix socket: feature
//! advertisement, LOG_ALL switching, SET_LOG_BASE through the stock handler (and its
//! replacement), regions added after the log, and hostile logs.

mod support;

use std::os::fd::AsFd;

use support::{memfd, NullDevice, Session};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_dirtylog::backend::{DirtyLogBackend, VHOST_F_LOG_ALL};
use vhost_dirtylog::log::{log_size_for, GuestDirtyBitmap, LogRegion};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

fn session() -> (
    Session<GuestDirtyBitmap>,
    DirtyLogBackend<NullDevice<GuestDirtyBitmap>>,
) {
    let dev = NullDevice::new(
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    );
    let backend = DirtyLogBackend::new(dev);
    let mut s = support::start(backend.clone());
    s.negotiate();
    (s, backend)
}

fn write(s: &Session<GuestDirtyBitmap>, gpa: u64, len: usize) {
    s.mem
        .memory()
        .write_slice(&vec![0xA5; len], GuestAddress(gpa))
        .unwrap();
}

fn set_pages(log: &LogRegion) -> Vec<u64> {
    (0..log.pages()).filter(|&p| log.test_page(p)).collect()
}

#[test]
fn adapter_advertises_migration_features() {
    let (s, _) = session();
    assert!(s.features() & VHOST_F_LOG_ALL != 0);
    let plain = support::start(NullDevice::<GuestDirtyBitmap>::new(
        VhostUserProtocolFeatures::REPLY_ACK,
    ));
    assert_eq!(plain.features() & VHOST_F_LOG_ALL, 0);
}

#[test]
fn writes_are_logged_by_guest_physical_address_only_with_log_all() {
    let (mut s, backend) = session();
    // Two regions with a hole between them.
    s.set_mem_table(&[(0, MIB), (4 * MIB, MIB)]).unwrap();
    let size = log_size_for(5 * MIB).unwrap();
    let logfd = memfd("log", size);
    s.set_log_base(&logfd, 0, size).unwrap();
    let vmm = LogRegion::from_fd(logfd.as_fd(), 0, size).unwrap();

    write(&s, 4 * MIB + 5000, 10);
    assert!(set_pages(&vmm).is_empty(), "logged with LOG_ALL off");
    assert!(!backend.log().is_logging());

    s.set_log_all(true).unwrap();
    assert!(backend.log().is_logging());
    write(&s, 4 * MIB + 5000, 10);
    write(&s, 3 * PAGE - 2, 4);
    assert_eq!(set_pages(&vmm), vec![2, 3, 4 * MIB / PAGE + 1]);

    s.set_log_all(false).unwrap();
    write(&s, 7 * PAGE, 1);
    assert!(!vmm.test_page(7));
    assert_eq!(backend.log().stats(), Default::default());
}

#[test]
fn region_added_after_set_log_base_is_logged() {
    let (mut s, _) = session();
    s.set_mem_table(&[(0, MIB)]).unwrap();
    let size = log_size_for(16 * MIB).unwrap();
    let logfd = memfd("log", size);
    s.set_log_base(&logfd, 0, size).unwrap();
    s.set_log_all(true).unwrap();
    s.add_region(8 * MIB, 2 * MIB).unwrap();
    let vmm = LogRegion::from_fd(logfd.as_fd(), 0, size).unwrap();
    write(&s, 9 * MIB + 3 * PAGE, 1);
    assert_eq!(set_pages(&vmm), vec![9 * MIB / PAGE + 3]);
}

#[test]
fn second_set_log_base_replaces_the_log() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, 2 * MIB)]).unwrap();
    let size = log_size_for(2 * MIB).unwrap();
    let first = memfd("log1", size);
    s.set_log_base(&first, 0, size).unwrap();
    s.set_log_all(true).unwrap();
    write(&s, 0, 1);
    // A bigger log, at an offset inside its fd.
    let second = memfd("log2", 3 * size + 4096);
    s.set_log_base(&second, 4096, 3 * size).unwrap();
    write(&s, 5 * PAGE, 1);
    let a = LogRegion::from_fd(first.as_fd(), 0, size).unwrap();
    let b = LogRegion::from_fd(second.as_fd(), 4096, 3 * size).unwrap();
    assert_eq!(set_pages(&a), vec![0]);
    assert_eq!(set_pages(&b), vec![5]);
    assert_eq!(
        backend.log().region().unwrap().len_bytes() as u64,
        3 * size,
        "the stock mapping's length must be recovered exactly"
    );
}

#[test]
fn log_shorter_than_its_fd_is_rejected_without_sigbus() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, MIB)]).unwrap();
    // mmap_size says 64 KiB, the fd holds 4 KiB: touching the rest would raise SIGBUS.
    let logfd = memfd("short", 4096);
    assert!(s.set_log_base(&logfd, 0, 64 * 1024).is_err());
    assert!(backend.log().region().is_none());
    assert!(s.set_log_all(true).is_err(), "connection should be closed");
    // The handler dropped the connection for that message; the process is alive and the
    // device's writes are not routed into the bad mapping.
    write(&s, 0, 8);
    let _ = s.finish();
}

#[test]
fn log_too_small_for_guest_memory_is_rejected() {
    let (mut s, backend) = session();
    s.set_mem_table(&[(0, MIB), (64 * MIB, MIB)]).unwrap();
    let size = log_size_for(2 * MIB).unwrap();
    let logfd = memfd("small", size);
    assert!(s.set_log_base(&logfd, 0, size).is_err());
    assert!(backend.log().region().is_none());
    let _ = s.finish();
}
