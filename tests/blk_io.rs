//! The vhost-user-blk daemon's I/O behaviour over a real unix socket: the in-process frontend
//! from `vhost_dirtylog::driver` drives the real `vhost-dirtylog-blk` binary.

mod blk_support;

use std::os::unix::fs::FileExt;

use blk_support::*;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_dirtylog::driver::blk::{
    BlkConfigInfo, BlkOp, BlkStatus, DiscardSegment, HEADER_SIZE, STATUS_PENDING,
};
use vhost_dirtylog::driver::{Buf, RegionSpec};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

#[test]
fn blk_read_write_flush_roundtrip() {
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::new(d.connect(), 1);
    let q = &mut vm.queues[0];

    // Read sectors 8..16 across two buffers: data matches the image.
    let c = q
        .read(8, &[(DATA_BASE, 2048), (DATA_BASE + 0x10000, 2048)], T)
        .unwrap();
    assert_eq!(c.blk_status(), BlkStatus::Ok);
    assert_eq!(c.used_len, 4096 + 1);
    assert_eq!(
        vm.ram.read_vec(DATA_BASE, 2048).unwrap(),
        image_bytes(8 * 512, 2048)
    );
    assert_eq!(
        vm.ram.read_vec(DATA_BASE + 0x10000, 2048).unwrap(),
        image_bytes(8 * 512 + 2048, 2048)
    );

    // Write, flush, read back through the device and through the file.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    vm.ram.write(DATA_BASE + 0x20000, &data).unwrap();
    let c = q.write(100, &[(DATA_BASE + 0x20000, 8192)], T).unwrap();
    assert!(c.is_ok());
    assert_eq!(c.used_len, 1);
    assert!(q.flush(T).unwrap().is_ok());
    vm.ram.fill(DATA_BASE + 0x30000, 8192, 0).unwrap();
    assert!(q
        .read(100, &[(DATA_BASE + 0x30000, 8192)], T)
        .unwrap()
        .is_ok());
    assert_eq!(vm.ram.read_vec(DATA_BASE + 0x30000, 8192).unwrap(), data);
    let mut on_disk = vec![0u8; 8192];
    std::fs::File::open(d.image())
        .unwrap()
        .read_exact_at(&mut on_disk, 100 * 512)
        .unwrap();
    assert_eq!(on_disk, data);
}

#[test]
fn blk_get_id_and_config_space() {
    let d = spawn(
        IMAGE_SIZE,
        &[
            "--serial",
            "disk-serial-42",
            "--queue-size",
            "128",
            "--num-queues",
            "1",
        ],
    );
    let mut vm = Vm::new(d.connect(), 1);

    vm.ram.fill(DATA_BASE, 64, 0xee).unwrap();
    let c = vm.queues[0].get_id(DATA_BASE, T).unwrap();
    assert!(c.is_ok());
    assert_eq!(c.used_len, 21);
    let mut want = b"disk-serial-42".to_vec();
    want.resize(20, 0);
    assert_eq!(vm.ram.read_vec(DATA_BASE, 20).unwrap(), want);
    assert_eq!(
        vm.ram.read_vec(DATA_BASE + 20, 1).unwrap(),
        [0xee],
        "wrote past 20 bytes"
    );

    let f = vm.conn.offered_features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_RING_F_EVENT_IDX,
        32, // VIRTIO_F_VERSION_1
        30, // VHOST_USER_F_PROTOCOL_FEATURES
    ] {
        assert!(f & (1 << bit) != 0, "feature bit {bit} not offered");
    }
    assert!(f & LOG_ALL != 0);
    assert!(f & (1 << VIRTIO_BLK_F_RO) == 0);
    assert!(vm
        .conn
        .protocol_features()
        .contains(vhost::vhost_user::VhostUserProtocolFeatures::LOG_SHMFD));

    let cfg = BlkConfigInfo::parse(&vm.conn.get_config(0, 60).unwrap());
    assert_eq!(cfg.capacity, IMAGE_SIZE / 512);
    assert_eq!(cfg.seg_max, 126);
    assert_eq!(cfg.blk_size, 512);
    assert_eq!(cfg.num_queues, 1);
    assert_eq!(cfg.wce, 1);
    assert_eq!(cfg.max_discard_seg, 32);
    assert_eq!(cfg.max_write_zeroes_seg, 32);
    assert!(cfg.max_discard_sectors > 0 && cfg.max_write_zeroes_sectors > 0);
    assert_eq!(cfg.write_zeroes_may_unmap, 1);
    // A partial read at an offset: num_queues alone (byte 34, 2 bytes).
    assert_eq!(vm.conn.get_config(34, 2).unwrap(), 1u16.to_le_bytes());

    // CONFIG_WCE: switch to writethrough; writes still work.
    vm.conn.set_config(32, &[0]).unwrap();
    assert_eq!(
        BlkConfigInfo::parse(&vm.conn.get_config(0, 60).unwrap()).wce,
        0
    );
    vm.ram.fill(DATA_BASE, 512, 9).unwrap();
    assert!(vm.queues[0]
        .write(0, &[(DATA_BASE, 512)], T)
        .unwrap()
        .is_ok());
    // Any other config byte is read-only.
    assert!(vm.conn.set_config(0, &[1]).is_err());
}

#[test]
fn blk_discard_and_write_zeroes() {
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::new(d.connect(), 1);
    let q = &mut vm.queues[0];
    let file = std::fs::File::open(d.image()).unwrap();
    let read = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, off).unwrap();
        b
    };

    // Write zeroes over sectors 16..24 and, with UNMAP, 40..48.
    let c = q
        .write_zeroes(
            &[
                DiscardSegment::new(16, 8),
                DiscardSegment {
                    sector: 40,
                    num_sectors: 8,
                    flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                },
            ],
            T,
        )
        .unwrap();
    assert!(c.is_ok());
    assert_eq!(read(16 * 512, 4096), vec![0u8; 4096]);
    assert_eq!(read(40 * 512, 4096), vec![0u8; 4096]);
    assert_eq!(
        read(24 * 512, 512),
        image_bytes(24 * 512, 512),
        "neighbour clobbered"
    );
    assert_eq!(
        read(15 * 512, 512),
        image_bytes(15 * 512, 512),
        "neighbour clobbered"
    );

    // Discard a 4 KiB-aligned range: succeeds; reads back as zero on file systems that punch.
    let c = q.discard(&[DiscardSegment::new(64, 8)], T).unwrap();
    assert!(c.is_ok());
    assert_eq!(read(72 * 512, 512), image_bytes(72 * 512, 512));

    // Invalid: range past the end, unmap flag on discard, unknown flag on write-zeroes.
    let cap = IMAGE_SIZE / 512;
    let c = q.discard(&[DiscardSegment::new(cap - 4, 8)], T).unwrap();
    assert_eq!(c.blk_status(), BlkStatus::IoErr);
    let c = q
        .discard(
            &[DiscardSegment {
                sector: 0,
                num_sectors: 8,
                flags: 1,
            }],
            T,
        )
        .unwrap();
    assert_eq!(c.blk_status(), BlkStatus::Unsupp);
    let c = q
        .write_zeroes(
            &[DiscardSegment {
                sector: 0,
                num_sectors: 8,
                flags: 2,
            }],
            T,
        )
        .unwrap();
    assert_eq!(c.blk_status(), BlkStatus::Unsupp);
    // Too many segments (device max 32).
    let segs: Vec<_> = (0..33).map(|i| DiscardSegment::new(i * 8, 8)).collect();
    assert_eq!(q.discard(&segs, T).unwrap().blk_status(), BlkStatus::IoErr);
    assert_eq!(
        read(0, 512),
        image_bytes(0, 512),
        "invalid request changed the disk"
    );
}

#[test]
fn blk_read_only() {
    let d = spawn(IMAGE_SIZE, &["--read-only"]);
    let mut vm = Vm::new(d.connect(), 1);
    let f = vm.conn.offered_features();
    assert!(f & (1 << VIRTIO_BLK_F_RO) != 0, "RO not offered");
    assert!(f & (1 << VIRTIO_BLK_F_DISCARD) == 0);
    assert!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES) == 0);
    let q = &mut vm.queues[0];

    assert!(q.read(0, &[(DATA_BASE, 4096)], T).unwrap().is_ok());
    assert_eq!(
        vm.ram.read_vec(DATA_BASE, 4096).unwrap(),
        image_bytes(0, 4096)
    );

    vm.ram.fill(DATA_BASE, 4096, 0x5a).unwrap();
    let c = q.write(0, &[(DATA_BASE, 4096)], T).unwrap();
    assert_eq!(c.blk_status(), BlkStatus::IoErr);
    let c = q.discard(&[DiscardSegment::new(0, 8)], T).unwrap();
    assert_eq!(c.blk_status(), BlkStatus::Unsupp);
    let c = q.write_zeroes(&[DiscardSegment::new(0, 8)], T).unwrap();
    assert_eq!(c.blk_status(), BlkStatus::Unsupp);
    assert!(q.flush(T).unwrap().is_ok());

    let mut on_disk = vec![0u8; 4096];
    std::fs::File::open(d.image())
        .unwrap()
        .read_exact_at(&mut on_disk, 0)
        .unwrap();
    assert_eq!(on_disk, image_bytes(0, 4096), "read-only disk was modified");
}

#[test]
fn blk_multiqueue_concurrent() {
    let d = spawn(IMAGE_SIZE, &["--num-queues", "3"]);
    let vm = Vm::new(d.connect(), 3);
    assert_eq!(vm.conn.queue_num(), 3);
    let ram = vm.ram.clone();
    let mut queues = vm.queues;

    // Each queue writes its own sectors with many requests in flight, then reads them back.
    std::thread::scope(|s| {
        for (qi, q) in queues.iter_mut().enumerate() {
            let ram = ram.clone();
            s.spawn(move || {
                let base_sector = 1024 * (qi as u64 + 1);
                let buf = DATA_BASE + qi as u64 * 0x100000;
                for round in 0..4u64 {
                    for i in 0..16u64 {
                        let gpa = buf + i * 4096;
                        ram.fill(gpa, 4096, (qi as u64 * 64 + round * 16 + i) as u8)
                            .unwrap();
                        q.submit(
                            BlkOp::Write {
                                sector: base_sector + i * 8,
                                data: &[(gpa, 4096)],
                            },
                            i,
                        )
                        .unwrap();
                    }
                    q.kick().unwrap();
                    let done = q.wait_all(T).unwrap();
                    assert_eq!(done.len(), 16);
                    assert!(done.iter().all(|c| c.is_ok()), "queue {qi}: {done:?}");

                    ram.fill(buf, 16 * 4096, 0).unwrap();
                    for i in 0..16u64 {
                        q.submit(
                            BlkOp::Read {
                                sector: base_sector + i * 8,
                                data: &[(buf + i * 4096, 4096)],
                            },
                            100 + i,
                        )
                        .unwrap();
                    }
                    q.kick().unwrap();
                    let done = q.wait_all(T).unwrap();
                    assert!(done.iter().all(|c| c.is_ok()));
                    for i in 0..16u64 {
                        let want = (qi as u64 * 64 + round * 16 + i) as u8;
                        assert_eq!(
                            ram.read_vec(buf + i * 4096, 4096).unwrap(),
                            vec![want; 4096],
                            "queue {qi} round {round} request {i}"
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn blk_without_event_idx() {
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::with(
        d.connect(),
        &[RegionSpec::new(0, RAM_SIZE)],
        1,
        64,
        !(LOG_ALL | (1 << VIRTIO_RING_F_EVENT_IDX)),
    );
    assert!(!vm.conn.event_idx());
    let q = &mut vm.queues[0];
    for round in 0..3u64 {
        for i in 0..8u64 {
            q.submit(
                BlkOp::Read {
                    sector: i * 8,
                    data: &[(DATA_BASE + i * 4096, 4096)],
                },
                i,
            )
            .unwrap();
        }
        q.kick().unwrap();
        let done = q.wait_all(T).unwrap();
        assert_eq!(done.len(), 8, "round {round}");
        assert!(done.iter().all(|c| c.is_ok()));
    }
    assert_eq!(
        vm.ram.read_vec(DATA_BASE, 4096).unwrap(),
        image_bytes(0, 4096)
    );
}

#[test]
fn blk_malformed_chains_fail_cleanly() {
    let mut d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::new(d.connect(), 1);
    let ram = vm.ram.clone();
    let q = &mut vm.queues[0];
    let hdr = 0x300000u64;
    let data = DATA_BASE;
    let status = 0x301000u64;
    let cap = IMAGE_SIZE / 512;
    let put_hdr = |t: u32, sector: u64| {
        ram.write(hdr, &vhost_dirtylog::driver::blk::header_bytes(t, sector))
            .unwrap()
    };
    let run = |q: &mut vhost_dirtylog::driver::BlkQueue, bufs: &[Buf], st: Option<u64>| {
        q.submit_raw(bufs, st, 0).unwrap();
        q.kick().unwrap();
        q.wait(T).unwrap()
    };

    // Header shorter than 16 bytes.
    put_hdr(VIRTIO_BLK_T_IN, 0);
    let c = run(
        q,
        &[
            Buf::readable(hdr, 8),
            Buf::writable(data, 512),
            Buf::writable(status, 1),
        ],
        Some(status),
    );
    assert_eq!(c.blk_status(), BlkStatus::IoErr);
    assert_eq!(c.used_len, 1);

    // Header split across two descriptors is fine.
    let c = run(
        q,
        &[
            Buf::readable(hdr, 5),
            Buf::readable(hdr + 5, 11),
            Buf::writable(data, 512),
            Buf::writable(status, 1),
        ],
        Some(status),
    );
    assert_eq!(c.blk_status(), BlkStatus::Ok);

    // No status descriptor: completed with used len 0, nothing written.
    ram.fill(data, 512, 0xcc).unwrap();
    let c = run(
        q,
        &[Buf::readable(hdr, HEADER_SIZE), Buf::readable(data, 512)],
        None,
    );
    assert_eq!(c.used_len, 0);
    assert_eq!(ram.read_vec(data, 512).unwrap(), vec![0xcc; 512]);

    // Sector out of range, and one that overflows sector * 512 + len.
    for sector in [cap - 1, cap, u64::MAX / 512, u64::MAX] {
        put_hdr(VIRTIO_BLK_T_IN, sector);
        let c = run(
            q,
            &[
                Buf::readable(hdr, HEADER_SIZE),
                Buf::writable(data, 1024),
                Buf::writable(status, 1),
            ],
            Some(status),
        );
        assert_eq!(c.blk_status(), BlkStatus::IoErr, "sector {sector:#x}");
    }

    // Data length not a multiple of 512.
    put_hdr(VIRTIO_BLK_T_IN, 0);
    let c = run(
        q,
        &[
            Buf::readable(hdr, HEADER_SIZE),
            Buf::writable(data, 100),
            Buf::writable(status, 1),
        ],
        Some(status),
    );
    assert_eq!(c.blk_status(), BlkStatus::IoErr);

    // Data buffer outside guest memory.
    let c = run(
        q,
        &[
            Buf::readable(hdr, HEADER_SIZE),
            Buf::writable(RAM_SIZE + 0x1000, 512),
            Buf::writable(status, 1),
        ],
        Some(status),
    );
    assert_eq!(c.blk_status(), BlkStatus::IoErr);

    // Unknown request type.
    put_hdr(0x77, 0);
    let c = run(
        q,
        &[Buf::readable(hdr, HEADER_SIZE), Buf::writable(status, 1)],
        Some(status),
    );
    assert_eq!(c.blk_status(), BlkStatus::Unsupp);

    // GET_ID into a buffer shorter than 20 bytes.
    put_hdr(VIRTIO_BLK_T_GET_ID, 0);
    ram.fill(data, 32, 0xcc).unwrap();
    let c = run(
        q,
        &[
            Buf::readable(hdr, HEADER_SIZE),
            Buf::writable(data, 10),
            Buf::writable(status, 1),
        ],
        Some(status),
    );
    assert_eq!(c.blk_status(), BlkStatus::IoErr);
    assert_eq!(ram.read_vec(data, 32).unwrap(), vec![0xcc; 32]);

    // A readable descriptor after the writable status.
    put_hdr(VIRTIO_BLK_T_IN, 0);
    let c = run(
        q,
        &[
            Buf::readable(hdr, HEADER_SIZE),
            Buf::writable(status, 1),
            Buf::readable(data, 512),
        ],
        Some(status),
    );
    assert_eq!(c.used_len, 0);
    assert_eq!(ram.read_vec(status, 1).unwrap(), [STATUS_PENDING]);

    // Write whose data is device-writable (wrong direction).
    put_hdr(VIRTIO_BLK_T_OUT, 0);
    let c = run(
        q,
        &[
            Buf::readable(hdr, HEADER_SIZE),
            Buf::writable(data, 512),
            Buf::writable(status, 1),
        ],
        Some(status),
    );
    assert_eq!(c.blk_status(), BlkStatus::IoErr);

    // The daemon is still alive and serving.
    d.assert_alive();
    assert!(q.read(0, &[(DATA_BASE, 512)], T).unwrap().is_ok());
    assert_eq!(ram.read_vec(DATA_BASE, 512).unwrap(), image_bytes(0, 512));
}

#[test]
fn blk_many_in_flight_and_ring_wrap() {
    let d = spawn(IMAGE_SIZE, &[]);
    let mut vm = Vm::with(
        d.connect(),
        &[RegionSpec::new(0, RAM_SIZE)],
        1,
        16,
        !LOG_ALL,
    );
    let q = &mut vm.queues[0];
    // 16-entry ring, 3-descriptor chains: 5 in flight at a time, 40 rounds wrap the indices.
    let mut expected = std::collections::HashMap::new();
    for round in 0..40u64 {
        for i in 0..5u64 {
            let sector = (round * 5 + i) % (IMAGE_SIZE / 512 - 1);
            let gpa = DATA_BASE + i * 4096;
            q.submit(
                BlkOp::Read {
                    sector,
                    data: &[(gpa, 512)],
                },
                sector,
            )
            .unwrap();
            expected.insert(sector, gpa);
        }
        q.kick().unwrap();
        for c in q.wait_all(T).unwrap() {
            assert!(c.is_ok());
            let gpa = expected.remove(&c.token).unwrap();
            assert_eq!(
                vm.ram.read_vec(gpa, 512).unwrap(),
                image_bytes(c.token * 512, 512)
            );
        }
    }
    assert_eq!(q.queue().avail_idx(), 200);
}
