//! `vhost-dirtylog-check`: drive **any** vhost-user-blk or vhost-user-net backend through a
//! simulated live migration and report every guest page it wrote without marking it in the
//! dirty log.
//!
//! A live migration is only as good as the dirty log: a page the backend writes and does not
//! mark is never re-sent, and the guest resumes on the destination with stale memory — no
//! error, just corruption. Unit tests of a log implementation cannot show that a *backend*
//! gets it right end to end (every data path, the used ring, status bytes, log replacement,
//! memory-table changes, `LOG_ALL` toggling, `GET_VRING_BASE`), and a QEMU + KVM migration is
//! heavy and hides the cause. This module plays both the VMM and the guest against a backend's
//! socket and compares, byte for byte, the memory a destination would have received with the
//! memory the source ended up with.
//!
//! ## What a run does
//! 1. **Guest memory and rings.** memfd RAM in several regions with holes
//!    ([`CheckOptions::layout`]), handed over with `SET_MEM_TABLE`; `N` virtqueues started,
//!    each used ring placed so that its `avail_event` field starts a page of its own
//!    ([`CheckOptions::isolate_avail_event`]): a backend that forgets to log that one field is
//!    caught instead of hiding behind the logged used-index update on the same page.
//!    Features are negotiated as a VMM would; a backend that offers no `VHOST_F_LOG_ALL` or no
//!    `VHOST_USER_PROTOCOL_F_LOG_SHMFD` cannot be migrated at all, which is reported as such
//!    ([`CheckError::Unsupported`], exit status 3).
//! 2. **A known disk.** The disk (the first [`CheckOptions::disk_span`] bytes) is filled through
//!    the backend with a pattern where every 8-byte word encodes its disk offset and a block
//!    generation (the same pattern [`write_image`] writes), so data in the wrong place or a
//!    stale page is recognisable.
//! 3. **A guest workload.** One thread per queue keeps many requests in flight: random disk
//!    offsets, random sizes (4 KiB..128 KiB), split over several descriptors placed in random
//!    buffers across all regions, so each request lands different data in different pages.
//!    Every completed read is checked against the pattern (a *device* bug, reported apart
//!    from logging bugs).
//! 4. **Pre-copy.** The checker hands over a [`SharedLog`](crate::vmm::SharedLog), turns
//!    `LOG_ALL` on (and re-sends the ring addresses, as QEMU does), copies all RAM into a
//!    destination buffer (round 0), then every round merges the backend's log into a
//!    [`MigrationBitmap`](crate::vmm::MigrationBitmap) and copies the dirty pages, each taken
//!    from the bitmap *before* it is copied (DESIGN.md invariant 2). `--deferred` uses
//!    `fetch_log` and per-chunk clears instead of `sync_from_log`.
//!    With `--sync flip` ([`SyncMode::Flip`]) each round instead hands the backend a fresh log
//!    with `SET_LOG_BASE` and merges the retired one with plain loads once the reply is in
//!    ([`LogFlip`](crate::vmm::LogFlip)); the round trip and the merge are timed apart.
//! 5. **Faults** ([`Fault`]) injected mid-run: a bigger log replacing the current one (with
//!    flip sync: both logs grown), memory hot-add / hot-remove / a full `SET_MEM_TABLE`,
//!    `LOG_ALL` off and on, a frontend reconnect that resumes the rings from
//!    `GET_VRING_BASE`, and a `SET_VRING_ADDR` storm on the running rings until the end.
//! 6. **Stop and compare.** Every ring is stopped with `GET_VRING_BASE` (QEMU's way) — or, with
//!    `--vmm-style ch` ([`VmmStyle::Ch`], cloud-hypervisor's way), disabled with
//!    `SET_VRING_ENABLE(0)` and followed by one more log flip whose new log is never read —,
//!    the logs are merged a last time and the dirty pages copied; after a settle time the
//!    destination is compared with the source. Every differing page is a **lost page**.
//!
//! ## Unacknowledged messages
//! Without `REPLY_ACK` (`--no-reply-ack`, or a backend that does not offer it) only the few
//! messages with replies are waited for. After every message that changes logging or memory
//! (`SET_FEATURES`, `SET_VRING_ADDR`, `SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`,
//! `SET_VRING_ENABLE`) the checker sends a `GET_FEATURES` round trip before it relies on them,
//! as QEMU has done since 2021; otherwise it would copy RAM before the backend turned logging
//! on and blame it for the writes in between (issue 13 item 4).
//!
//! ## Hangs
//! A queue with requests in flight and no completion for [`CheckOptions::stall_timeout`]
//! (default 2 s) fails the run with [`CheckError::Protocol`] naming the queue and the count, and
//! so do requests still in flight when the backend answered the final stop (the report's
//! [`StopStats`]; exit status [`EXIT_PROTOCOL`] unless pages were lost).
//!
//! ## Net backends (`--device net`, [`Device::Net`])
//! The VMM side above is the same; only the guest workload differs (the seam is the
//! per-ring `QueueWork` of `worker.rs`, driven by one shared loop, and the device part of
//! the rig's handshake):
//! - **Rings.** `--queues N` queue pairs: queue `2k` is pair `k`'s RX queue, `2k + 1` its TX
//!   queue (virtio spec 5.1.2). The driver acks what it handles (`VERSION_1`, `MRG_RXBUF`,
//!   `EVENT_IDX`, `INDIRECT_DESC`, `MAC`, `STATUS`, `MQ`, `MTU`; no offloads). Several pairs
//!   need `VIRTIO_NET_F_MQ` and as many queues from `GET_QUEUE_NUM`.
//! - **RX.** Every RX descriptor is posted as one device-writable buffer of
//!   [`NetOptions::rx_buf`] bytes (mergeable RX buffers, 5.1.6.3.1) at a random place in a
//!   random free data slot of any region (the hot-added one too), filled with a **unique
//!   poison pattern** first, so a buffer page the backend wrote and did not mark differs on
//!   the destination whatever the frame bytes. Frames longer than one buffer span several
//!   (`num_buffers`); every frame is reassembled, its lengths checked and, when the checker
//!   made it, its contents and sequence number.
//! - **TX.** The guest sends its own frames through each TX queue; they come out of the
//!   backend's port and are counted there.
//! - **Traffic** ([`Traffic`], `--traffic`): `socket:PATH` injects frames into the backend's
//!   unix datagram socket port (`vhost-dirtylog-net --socket-port PATH`; pair `k > 0` at
//!   `PATH.k`), at [`NetOptions::rate`] frames per second per pair with sizes in the
//!   `--frame-size` range; `tap:NAME[@NETNS]` sends them through an `AF_PACKET` socket bound
//!   to the backend's TAP interface inside its network namespace (one wire for all pairs: the
//!   kernel picks the TAP queue, so each RX queue accepts frames of any pair, and the kernel's
//!   own frames on the TAP are counted as foreign); `none` leaves the traffic to the backend
//!   (e.g. `dpdk-testpmd --forward-mode=txonly`). Injection never pauses: frames keep arriving through the final
//!   `GET_VRING_BASE` / `SET_VRING_ENABLE(0)` and the settle time, so a backend that still
//!   writes a stopped RX ring is caught (pages marked too late, used entries after the stop).
//! - **Lost pages by kind**: `rx-buffer`, `rx-used-ring` (the used ring with its
//!   `avail_event`, placed on a page of its own), `tx-used-ring`, `other`
//!   ([`Report::lost_rx_buffer`] and the fields after it), and the frame figures in
//!   [`Report::net`]. `--bench` measures frames per second into the RX rings with logging
//!   off and on ([`bench_net`]).
//!
//! ## Why the guest's own writes do not count against the backend
//! The in-process guest driver writes guest memory too (descriptors, ring indices, request
//! headers, data to be written). In a real VM the hypervisor's dirty log tracks those, not the
//! vhost-user log. The checker emulates that log ([`GuestRam::track_writes`]) and merges it
//! each round like a VMM merges KVM's, so a lost page can only be a write the backend made
//! without marking it (or made after it was stopped).
//!
//! [`GuestRam::track_writes`]: crate::driver::GuestRam::track_writes
//!
//! ## Exit status
//! [`EXIT_OK`] (0), [`EXIT_LOST`] (1, lost pages), [`EXIT_PROTOCOL`] (2, the backend broke the
//! protocol, a queue hung, requests were in flight at the stop reply, or the run could not
//! complete), [`EXIT_UNSUPPORTED`] (3, no dirty logging),
//! [`EXIT_DATA`] (4, no lost page but reads returned wrong data), [`EXIT_USAGE`] (64).
//!
//! ```no_run
//! use vhost_dirtylog::check::{self, CheckOptions, Fault};
//!
//! let opts = CheckOptions {
//!     faults: vec![Fault::LogResize, Fault::Reconnect],
//!     ..CheckOptions::new("/tmp/blk.sock")
//! };
//! let report = check::run(&opts)?;
//! println!("{}", report.summary());
//! assert_eq!(report.lost_pages, 0);
//! # Ok::<(), check::CheckError>(())
//! ```
//!
//! ## Layout of this module
//! One job per file, each testable on its own. Imports form a DAG: in this table, in
//! topological order, every file uses only files named on lines below its own (and `mod.rs`
//! only declares the files and re-exports the public items).
//!
//! ```text
//! session  (run: the VMM thread)   -> fault pool worker traffic rig report dest plan options error
//! bench    (bench: logging cost)   -> pool rig plan options error
//! fault    (schedule, injection)   -> pool worker rig report dest plan options error
//! pool     (the worker threads)    -> netq worker traffic rig plan pattern options error
//! netq     (net RX / TX ring work) -> worker traffic rig pattern options error
//! worker   (shared loop; blk work) -> rig pattern options error
//! traffic  (net frames, injector)  -> pattern options error
//! rig      (handshake, RAM, rings) -> report plan pattern options error
//! report   (Report, verdict)       -> dest options error
//! dest     (bitmap, copy, compare) -> error
//! plan     (memory placement)      -> error
//! options  (CheckOptions, names)   -> layout error
//! pattern  (disk pattern, PRNG)    -> (nothing in check)
//! layout   (RAM layouts, sizes)    -> (nothing in check)
//! error    (CheckError, EXIT_*)    -> (nothing in check)
//! ```
//!
//! The spine of a run, drawn:
//!
//! ```text
//! session --> fault --> pool --> worker --> rig --> report --> dest
//!                        ^  \        ^       |  \
//!   bench ---------------'   '-> netq '       |   '--> plan, pattern
//!                                 \           '--> options --> layout
//!                                  '--> traffic
//! ```

mod bench;
mod dest;
mod error;
mod fault;
mod layout;
mod netq;
mod options;
mod pattern;
mod plan;
mod pool;
mod report;
mod rig;
mod session;
mod traffic;
mod worker;

pub use bench::{
    bench, bench_net, BenchOptions, BenchPhase, BenchReport, NetBenchReport, NetBenchSize,
    RmwCounter,
};
pub use dest::VmmStats;
pub use error::{
    CheckError, EXIT_DATA, EXIT_LOST, EXIT_OK, EXIT_PROTOCOL, EXIT_UNSUPPORTED, EXIT_USAGE,
};
pub use layout::{default_layout, parse_layout, parse_size};
pub use options::{
    parse_frame_range, CheckOptions, Device, Fault, NetOptions, SyncMode, Traffic, VmmStyle,
    Workload,
};
pub use pattern::write_image;
pub use report::{group, BackendInfo, FaultRecord, LostPage, NetStats, Report, StopStats};
pub use session::run;
