//! The main demo: a simulated live migration of a VM whose disk is served by our
//! vhost-user-blk daemon, checked byte for byte. No files to bring, no QEMU, no root.
//!
//! It starts `vhost-dirtylog-blk`'s server in this process on a temporary socket with a
//! generated 64 MiB image, then runs `vhost-dirtylog-check`'s migration simulation against it:
//! the checker plays the VM (two disk queues, many random reads in flight into guest memory
//! spread over three regions) and the VMM (dirty log, pre-copy rounds, a destination copy of
//! guest memory), injects every fault it knows (log resize, memory hot-add/remove, LOG_ALL
//! toggled, frontend reconnect), stops the rings and compares destination and source.
//!
//! Run: `cargo run --release --example migrate`

use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_dirtylog::blk::daemon::{BlkOptions, BlkServer};
use vhost_dirtylog::blk::BlkConfig;
use vhost_dirtylog::check::{self, group, CheckOptions, Fault};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The backend: our daemon, in this process, on a generated (sparse) image.
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    let sock = dir.path().join("vblk.sock");
    let server = BlkServer::new(&BlkOptions {
        image,
        read_only: false,
        direct: false,
        config: BlkConfig {
            num_queues: 2,
            ..BlkConfig::default()
        },
    })?;
    let listener = Listener::new(&sock, true)?;
    std::thread::spawn(move || server.serve(listener));

    println!("vhost-dirtylog migration demo");
    println!(
        "  backend: vhost-dirtylog-blk (in this process), 64 MiB disk, socket {}",
        sock.display()
    );
    println!("  the checker now plays the VM and the VMM: it fills the disk with a pattern, keeps");
    println!("  64 random reads in flight into guest memory, and live-migrates the guest for 4 s,");
    println!(
        "  resizing the log, hot-plugging memory, toggling logging and reconnecting on the way."
    );

    // 2. The migration simulation.
    let opts = CheckOptions {
        faults: Fault::ALL.to_vec(),
        duration: Duration::from_secs(4),
        progress: true,
        ..CheckOptions::new(&sock)
    };
    let r = check::run(&opts)?;

    // 3. What happened, for people.
    let ram_mib: u64 = r.layout.iter().map(|l| l.1).sum::<u64>() >> 20;
    println!();
    println!(
        "  guest     {ram_mib} MiB of RAM in {} regions, {} disk queues x {} reads in flight",
        r.layout.len(),
        r.queues,
        r.depth
    );
    println!(
        "  disk I/O  {} requests, {} MiB read: {} IOPS, {:.0} MiB/s",
        group(r.requests),
        r.bytes >> 20,
        group(r.iops as u64),
        r.mib_s
    );
    println!(
        "  backend   wrote {} different guest pages ({} page writes) while the migration ran",
        group(r.device_pages_written),
        group(r.device_page_writes)
    );
    println!(
        "  migration {} pre-copy rounds: the dirty log reported {} pages, {} pages copied",
        r.vmm.rounds,
        group(r.vmm.pages_marked),
        group(r.vmm.pages_copied)
    );
    for f in &r.fault_log {
        println!("  fault     {}: {}", f.fault, f.detail);
    }
    println!(
        "  result    destination vs source, {} pages compared byte for byte: {} lost pages",
        group(r.ram_pages),
        r.lost_pages
    );
    println!();
    if r.exit_code == check::EXIT_OK {
        println!(
            "Proven: every guest page the vhost-user-blk backend wrote during the migration was \
             reported in its dirty log and reached the destination, through log resize, memory \
             hotplug, LOG_ALL toggling and a reconnect."
        );
    } else {
        println!("{}", r.summary());
        std::process::exit(r.exit_code);
    }
    println!(
        "(vhost-dirtylog-check SOCKET runs the same check against any vhost-user-blk backend.)"
    );
    Ok(())
}
