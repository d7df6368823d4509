//! The result of a run: one serializable [`Report`] (the `--json` object), the tally of lost
//! pages, the verdict and exit status, and the human summary.
//!
//! Only data and formatting: the session fills the counters in, so everything here is tested
//! on hand-made reports.

use std::fmt::Write;

use super::dest::VmmStats;
use super::error::{EXIT_DATA, EXIT_LOST, EXIT_OK, EXIT_PROTOCOL};
use super::options::{Device, Fault, SyncMode, VmmStyle, Workload};
use crate::log::LOG_PAGE_SHIFT;

/// Lost pages listed one by one in a report ([`Report::lost_samples`]).
const LOST_SAMPLES: usize = 16;

/// What the backend offered and how it was driven.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackendInfo {
    /// The socket.
    pub socket: String,
    /// Virtio features offered (hex).
    pub features: String,
    /// Protocol features offered (hex).
    pub protocol_features: String,
    /// Queues the backend supports.
    pub queue_num: u64,
    /// Disk capacity in bytes (0 if the backend has no config space).
    pub capacity: u64,
    /// Disk bytes the run used.
    pub span: u64,
    /// The device is read-only.
    pub read_only: bool,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// `VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS` negotiated (hot-add with `ADD_MEM_REG`).
    pub mem_slots: bool,
    /// `VHOST_USER_PROTOCOL_F_REPLY_ACK` negotiated (every message waits for its ack).
    pub reply_ack: bool,
    /// net: `VIRTIO_NET_F_MRG_RXBUF` negotiated (frames may span several RX buffers).
    pub mergeable_rx: bool,
    /// net: the MAC address in the config space, if the backend has one.
    pub mac: Option<String>,
}

/// The net workload's figures ([`Report::net`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NetStats {
    /// Queue pairs driven.
    pub pairs: u16,
    /// Where the frames came from (`none`, `socket:PATH`).
    pub traffic: String,
    /// Bytes per RX buffer.
    pub rx_buf: u32,
    /// Frames received in the RX queues during the migration.
    pub rx_frames: u64,
    /// Frame bytes received (without virtio-net headers).
    pub rx_bytes: u64,
    /// RX buffers those frames used.
    pub rx_buffers: u64,
    /// Frames spread over more than one RX buffer (mergeable RX buffers in use).
    pub rx_merged: u64,
    /// Gaps in the received sequence numbers (frames dropped between the injector and the
    /// guest, e.g. by a full port: not an error).
    pub rx_seq_gaps: u64,
    /// Frames not made by this run (an earlier run's still queued in a socket port; a TAP's
    /// own traffic such as IPv6 router solicitations): counted, not checked.
    pub rx_foreign: u64,
    /// RX frames per second.
    pub rx_fps: f64,
    /// Frames the checker's guest sent through the TX queues (completed).
    pub tx_frames: u64,
    /// Frames the backend's port accepted from the injector (whole run).
    pub injected: u64,
    /// Injections refused by a full port (retried).
    pub port_full: u64,
    /// The guest's TX frames that came out of the backend's port intact (whole run).
    pub tx_at_port: u64,
    /// Frames out of the port that were not intact TX frames.
    pub tx_bad_at_port: u64,
}

/// One injected fault.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultRecord {
    /// Which fault.
    pub fault: Fault,
    /// Seconds after the migration started.
    pub at_s: f64,
    /// The round after which it was injected.
    pub round: u64,
    /// What happened.
    pub detail: String,
}

/// One lost page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LostPage {
    /// Guest-physical address (hex).
    pub gpa: String,
    /// What the page holds. blk: `data` (a request buffer), `status` (request headers and
    /// status bytes), `used-ring`; net: `rx-buffer`, `rx-used-ring` (`avail_event`
    /// included), `tx-used-ring`, `tx-buffer`; `other`.
    pub kind: &'static str,
    /// The backend's log had the page marked *after* the final sync: the write and mark came
    /// after the ring was stopped, too late for the migration.
    pub marked_late: bool,
}

/// How the backend behaved around the final stop (`GET_VRING_BASE`, or
/// `SET_VRING_ENABLE(0)` in [`VmmStyle::Ch`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StopStats {
    /// The message that stopped the rings.
    pub message: String,
    /// Requests the backend had taken but not completed when it replied (all queues). Any
    /// fails the run: the backend may complete them, writing guest memory, after the VMM's
    /// last sync ([`EXIT_PROTOCOL`] unless pages were lost).
    pub inflight_at_stop: u64,
    /// [`inflight_at_stop`](Self::inflight_at_stop) per queue (index = queue).
    pub inflight_by_queue: Vec<u64>,
    /// Requests completed after the reply (all queues).
    pub completed_after_stop: u64,
    /// Requests the backend took from the ring after the reply (never allowed).
    pub processed_after_stop: u64,
    /// The backend failed during the final stop (the first error), if it did.
    pub error: Option<String>,
}

/// The result of a check run (the `--json` output).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The device type driven.
    pub device: Device,
    /// The backend.
    pub backend: BackendInfo,
    /// Guest RAM at the start, as `(gpa, size)`.
    pub layout: Vec<(u64, u64)>,
    /// Queues driven.
    pub queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// The workload.
    pub workload: Workload,
    /// Whose way of migrating was played.
    pub vmm_style: VmmStyle,
    /// How the log was read each round.
    pub sync: SyncMode,
    /// Faults injected.
    pub faults: Vec<Fault>,
    /// Deferred clearing used.
    pub deferred: bool,
    /// The seed.
    pub seed: u64,
    /// Seconds from the start of the migration to the final stop.
    pub elapsed_s: f64,
    /// Requests completed during the migration.
    pub requests: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Data bytes transferred.
    pub bytes: u64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Requests completed with an error status.
    pub io_errors: u64,
    /// Reads whose buffers did not hold the expected disk data.
    pub data_errors: u64,
    /// Distinct guest pages the device wrote while logging was on (data, status, used ring).
    pub device_pages_written: u64,
    /// Page writes by the device while logging was on (a page written twice counts twice).
    pub device_page_writes: u64,
    /// Guest RAM pages compared at the end.
    pub ram_pages: u64,
    /// The VMM side: rounds, pages marked and copied, time spent.
    pub vmm: VmmStats,
    /// Size of the final log in bytes.
    pub log_bytes: u64,
    /// Pages whose destination copy differs from the source.
    pub lost_pages: u64,
    /// Lost pages the log never reported.
    pub lost_unmarked: u64,
    /// Lost pages marked only after the final sync (written after `GET_VRING_BASE`).
    pub lost_late: u64,
    /// Lost pages that are request data buffers.
    pub lost_data: u64,
    /// Lost pages holding request headers / status bytes.
    pub lost_status: u64,
    /// Lost pages of used rings (blk).
    pub lost_used_ring: u64,
    /// net: lost pages of RX buffers.
    pub lost_rx_buffer: u64,
    /// net: lost pages of RX used rings (`avail_event` included).
    pub lost_rx_used_ring: u64,
    /// net: lost pages of TX used rings.
    pub lost_tx_used_ring: u64,
    /// Lost pages of no kind above.
    pub lost_other: u64,
    /// net: the frames.
    pub net: Option<NetStats>,
    /// The first lost pages.
    pub lost_samples: Vec<LostPage>,
    /// Behaviour around the final stop.
    pub stop: StopStats,
    /// Faults, when and what.
    pub fault_log: Vec<FaultRecord>,
    /// Examples of device problems (wrong data, I/O errors).
    pub samples: Vec<String>,
    /// One-line verdict.
    pub verdict: String,
    /// The process exit status this report maps to.
    pub exit_code: i32,
}

/// `n` with thousands separators (`1234567` -> `"1,234,567"`), as the reports print counts.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn size(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

impl Report {
    /// Counts the lost pages `lost` (4 KiB page numbers): by kind and by whether the backend's
    /// log had them marked only after the final sync, as `classify(page)` returns
    /// `(kind, marked_late)`; keeps the first ones as samples.
    pub(super) fn tally_lost(
        &mut self,
        lost: &[u64],
        classify: impl Fn(u64) -> (&'static str, bool),
    ) {
        self.lost_pages = lost.len() as u64;
        for &p in lost {
            let (kind, late) = classify(p);
            if late {
                self.lost_late += 1;
            } else {
                self.lost_unmarked += 1;
            }
            match kind {
                "data" => self.lost_data += 1,
                "status" => self.lost_status += 1,
                "used-ring" => self.lost_used_ring += 1,
                "rx-buffer" => self.lost_rx_buffer += 1,
                "rx-used-ring" => self.lost_rx_used_ring += 1,
                "tx-used-ring" => self.lost_tx_used_ring += 1,
                _ => self.lost_other += 1,
            }
            if self.lost_samples.len() < LOST_SAMPLES {
                self.lost_samples.push(LostPage {
                    gpa: format!("{:#x}", p << LOG_PAGE_SHIFT),
                    kind,
                    marked_late: late,
                });
            }
        }
    }

    /// Fills in the verdict and exit status from the counters.
    pub(super) fn conclude(&mut self) {
        let (v, code) = if self.lost_pages > 0 {
            (
                format!(
                    "FAIL: {} lost page(s): the backend wrote guest memory that the dirty log never reported{}",
                    self.lost_pages,
                    if self.lost_late > 0 {
                        format!(" ({} written after GET_VRING_BASE)", self.lost_late)
                    } else {
                        String::new()
                    }
                ),
                EXIT_LOST,
            )
        } else if self.stop.inflight_at_stop > 0 {
            let queues: Vec<String> = self
                .stop
                .inflight_by_queue
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(q, n)| format!("queue {q}: {n}"))
                .collect();
            (
                format!(
                    "FAIL: 0 lost pages, but {} request(s) were still in flight when the backend answered {} ({}): it may write guest memory after the VMM's last sync",
                    self.stop.inflight_at_stop,
                    self.stop.message,
                    queues.join(", ")
                ),
                EXIT_PROTOCOL,
            )
        } else if let Some(e) = &self.stop.error {
            (
                format!(
                    "FAIL: 0 lost pages, but the backend failed when its rings were stopped: {e}"
                ),
                EXIT_PROTOCOL,
            )
        } else if (self.data_errors > 0 || self.io_errors > 0) && self.device == Device::Net {
            (
                format!(
                    "FAIL: 0 lost pages, but {} frame(s) arrived damaged, duplicated or out of order",
                    self.data_errors
                ),
                EXIT_DATA,
            )
        } else if self.data_errors > 0 || self.io_errors > 0 {
            (
                format!(
                    "FAIL: 0 lost pages, but the device returned wrong data in {} read(s) and failed {} request(s)",
                    self.data_errors, self.io_errors
                ),
                EXIT_DATA,
            )
        } else {
            (
                "PASS: 0 lost pages: every page the backend wrote reached the destination".into(),
                EXIT_OK,
            )
        };
        self.verdict = v;
        self.exit_code = code;
    }

    /// A multi-line summary for people.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let b = &self.backend;
        let ram: u64 = self.layout.iter().map(|r| r.1).sum();
        let _ = writeln!(s, "vhost-dirtylog-check: {}", b.socket);
        if let Some(n) = &self.net {
            let _ = writeln!(
                s,
                "  backend    net, features {}, protocol {}, {} queue(s){}{}",
                b.features,
                b.protocol_features,
                b.queue_num,
                if b.mergeable_rx {
                    ", mergeable RX buffers"
                } else {
                    ", no mergeable RX buffers"
                },
                b.mac
                    .as_ref()
                    .map_or(String::new(), |m| format!(", MAC {m}"))
            );
            let _ = writeln!(
                s,
                "  guest      {} in {} region(s), {} queue pair(s) of {} entries, RX buffers of {} bytes, traffic {}",
                size(ram),
                self.layout.len(),
                n.pairs,
                self.queue_size,
                n.rx_buf,
                n.traffic
            );
            let _ = writeln!(
                s,
                "  frames     RX {} ({} MiB, {} buffers, {} spread over several, {} sequence gaps{}) in {:.2} s: {} frames/s; TX {} sent by the guest",
                group(n.rx_frames),
                n.rx_bytes >> 20,
                group(n.rx_buffers),
                group(n.rx_merged),
                group(n.rx_seq_gaps),
                if n.rx_foreign > 0 {
                    format!(", {} foreign", group(n.rx_foreign))
                } else {
                    String::new()
                },
                self.elapsed_s,
                group(n.rx_fps as u64),
                group(n.tx_frames)
            );
            if n.rx_frames == 0 {
                let _ = writeln!(
                    s,
                    "  note       no frame arrived in the RX queues: the RX path was not exercised (--traffic)"
                );
            }
            if n.traffic != "none" {
                let _ = writeln!(
                    s,
                    "  port       {} frames injected ({} refused by a full port), {} of the guest's TX frames came out intact{}",
                    group(n.injected),
                    group(n.port_full),
                    group(n.tx_at_port),
                    if n.tx_bad_at_port > 0 {
                        format!(", {} damaged", n.tx_bad_at_port)
                    } else {
                        String::new()
                    }
                );
            }
        } else {
            let _ = writeln!(
                s,
                "  backend    features {}, protocol {}, {} queue(s), disk {}{}",
                b.features,
                b.protocol_features,
                b.queue_num,
                if b.capacity > 0 {
                    size(b.capacity)
                } else {
                    "size unknown".into()
                },
                if b.read_only { ", read-only" } else { "" }
            );
            let _ = writeln!(
            s,
            "  guest      {} in {} region(s), {} queue(s) x {} requests in flight, {} workload over {} of disk",
            size(ram),
            self.layout.len(),
            self.queues,
            self.depth,
            self.workload.name(),
            size(b.span)
        );
            let _ = writeln!(
            s,
            "  workload   {} requests ({} reads, {} writes), {} MiB in {:.2} s: {} IOPS, {:.1} MiB/s",
            group(self.requests),
            group(self.reads),
            group(self.writes),
            self.bytes >> 20,
            self.elapsed_s,
            group(self.iops as u64),
            self.mib_s
        );
        }
        let _ = writeln!(
            s,
            "  device     wrote {} distinct guest pages ({} page writes) while logging was on",
            group(self.device_pages_written),
            group(self.device_page_writes)
        );
        let v = &self.vmm;
        let _ = writeln!(
            s,
            "  migration  {} style, {} sync, {} rounds{}: {} pages marked by the backend's log, {} by the guest, {} copied; log {}",
            self.vmm_style,
            self.sync,
            v.rounds,
            if self.deferred { " (deferred clear)" } else { "" },
            group(v.pages_marked),
            group(v.guest_pages_marked),
            group(v.pages_copied),
            size(self.log_bytes)
        );
        if v.flips > 0 {
            let _ = writeln!(
                s,
                "  log flips  {} SET_LOG_BASE round trips: {:.2} ms in all ({} us mean, {} us max); merging the retired logs: {:.2} ms",
                v.flips,
                v.flip_send_us as f64 / 1e3,
                v.flip_send_us / v.flips,
                v.flip_send_max_us,
                v.flip_merge_us as f64 / 1e3
            );
        }
        for f in &self.fault_log {
            let _ = writeln!(
                s,
                "  fault      {} at {:.2} s (after round {}): {}",
                f.fault, f.at_s, f.round, f.detail
            );
        }
        let st = &self.stop;
        let _ = writeln!(
            s,
            "  stop       {}: {} request(s) still in flight at the reply{}, {} completed after it, {} taken after it",
            if st.message.is_empty() {
                "GET_VRING_BASE"
            } else {
                &st.message
            },
            st.inflight_at_stop,
            if st.inflight_at_stop > 0 {
                format!(" (per queue {:?})", st.inflight_by_queue)
            } else {
                String::new()
            },
            st.completed_after_stop,
            st.processed_after_stop
        );
        if let Some(e) = &st.error {
            let _ = writeln!(s, "             the backend failed during the stop: {e}");
        }
        if self.net.is_some() {
            let _ = writeln!(
                s,
                "  data       {}",
                if self.data_errors == 0 {
                    "every received frame was intact and in order".to_string()
                } else {
                    format!(
                        "{} frame(s) damaged, duplicated or out of order",
                        self.data_errors
                    )
                }
            );
        } else if self.data_errors == 0 && self.io_errors == 0 {
            let _ = writeln!(
                s,
                "  data       every completed read held the expected disk data"
            );
        } else {
            let _ = writeln!(
                s,
                "  data       {} read(s) with wrong data, {} request(s) failed",
                self.data_errors, self.io_errors
            );
        }
        for x in &self.samples {
            let _ = writeln!(s, "             {x}");
        }
        if self.net.is_some() {
            let _ = writeln!(
                s,
                "  compared   {} guest pages byte for byte: {} lost ({} never marked, {} marked too late; {} RX buffer, {} RX used ring, {} TX used ring, {} other)",
                group(self.ram_pages),
                self.lost_pages,
                self.lost_unmarked,
                self.lost_late,
                self.lost_rx_buffer,
                self.lost_rx_used_ring,
                self.lost_tx_used_ring,
                self.lost_other
            );
        } else {
            let _ = writeln!(
            s,
            "  compared   {} guest pages byte for byte: {} lost ({} never marked, {} marked too late; {} data, {} status, {} used ring)",
            group(self.ram_pages),
            self.lost_pages,
            self.lost_unmarked,
            self.lost_late,
            self.lost_data,
            self.lost_status,
            self.lost_used_ring
        );
        }
        for l in &self.lost_samples {
            let _ = writeln!(
                s,
                "             lost page GPA {} ({}{})",
                l.gpa,
                l.kind,
                if l.marked_late {
                    ", marked after the final sync"
                } else {
                    ", never marked"
                }
            );
        }
        let _ = write!(s, "  result     {}", self.verdict);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(group(0), "0");
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(group(100), "100");
        assert_eq!(size(64 << 20), "64 MiB");
        assert_eq!(size(2 << 30), "2 GiB");
        assert_eq!(size(4096), "4 KiB");
    }

    fn blank() -> Report {
        Report {
            device: Device::Blk,
            backend: BackendInfo::default(),
            layout: vec![(0, 64 << 20)],
            queues: 1,
            queue_size: 256,
            depth: 32,
            workload: Workload::Read,
            vmm_style: VmmStyle::Qemu,
            sync: SyncMode::Swap,
            faults: vec![Fault::Reconnect],
            deferred: false,
            seed: 1,
            elapsed_s: 1.0,
            requests: 1234,
            reads: 1234,
            writes: 0,
            bytes: 1 << 20,
            iops: 1234.0,
            mib_s: 1.0,
            io_errors: 0,
            data_errors: 0,
            device_pages_written: 10,
            device_page_writes: 20,
            ram_pages: 16384,
            vmm: VmmStats::default(),
            log_bytes: 4096,
            lost_pages: 0,
            lost_unmarked: 0,
            lost_late: 0,
            lost_data: 0,
            lost_status: 0,
            lost_used_ring: 0,
            lost_rx_buffer: 0,
            lost_rx_used_ring: 0,
            lost_tx_used_ring: 0,
            lost_other: 0,
            net: None,
            lost_samples: Vec::new(),
            stop: StopStats::default(),
            fault_log: Vec::new(),
            samples: Vec::new(),
            verdict: String::new(),
            exit_code: 0,
        }
    }

    #[test]
    fn verdicts() {
        let mut r = blank();
        r.conclude();
        assert_eq!(r.exit_code, EXIT_OK);
        assert!(r.verdict.starts_with("PASS"));
        assert!(r.summary().ends_with(&r.verdict));
        let mut r = blank();
        r.data_errors = 1;
        r.conclude();
        assert_eq!(r.exit_code, EXIT_DATA);
        let mut r = blank();
        r.data_errors = 1;
        r.stop.error = Some("gone".into());
        r.conclude();
        assert_eq!(r.exit_code, EXIT_PROTOCOL);
        assert!(r.verdict.contains("gone"));
        // Requests in flight at the stop reply fail the run, naming the queues.
        let mut r = blank();
        r.stop.message = "SET_VRING_ENABLE(0)".into();
        r.stop.inflight_at_stop = 32;
        r.stop.inflight_by_queue = vec![0, 32];
        r.conclude();
        assert_eq!(r.exit_code, EXIT_PROTOCOL);
        assert!(
            r.verdict
                .contains("32 request(s) were still in flight when the backend answered SET_VRING_ENABLE(0) (queue 1: 32)"),
            "{}",
            r.verdict
        );
        assert!(r.summary().contains("(per queue [0, 32])"));
        // Lost pages still take precedence (exit 1).
        r.tally_lost(&[5], |_| ("data", false));
        r.conclude();
        assert_eq!(r.exit_code, EXIT_LOST);
    }

    #[test]
    fn net_reports_name_net_kinds() {
        let mut r = blank();
        r.device = Device::Net;
        r.net = Some(NetStats {
            pairs: 2,
            traffic: "none".into(),
            ..NetStats::default()
        });
        let kinds = [
            "rx-buffer",
            "rx-used-ring",
            "tx-used-ring",
            "tx-buffer",
            "rx-buffer",
        ];
        r.tally_lost(&[1, 2, 3, 4, 5], |p| (kinds[p as usize - 1], false));
        assert_eq!(
            (
                r.lost_rx_buffer,
                r.lost_rx_used_ring,
                r.lost_tx_used_ring,
                r.lost_other
            ),
            (2, 1, 1, 1)
        );
        let s = r.summary();
        assert!(
            s.contains("5 lost (5 never marked, 0 marked too late; 2 RX buffer, 1 RX used ring, 1 TX used ring, 1 other)"),
            "{s}"
        );
        assert!(s.contains("the RX path was not exercised"), "{s}");
        let mut r = blank();
        r.device = Device::Net;
        r.net = Some(NetStats::default());
        r.data_errors = 3;
        r.conclude();
        assert_eq!(r.exit_code, EXIT_DATA);
        assert!(
            r.verdict.contains("3 frame(s) arrived damaged"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn lost_pages_are_grouped_by_kind_and_timing() {
        let mut r = blank();
        // Pages 0..40: every 4th used ring, every 5th marked late, odd ones data.
        let lost: Vec<u64> = (0..40).collect();
        r.tally_lost(&lost, |p| {
            let kind = if p % 4 == 0 {
                "used-ring"
            } else if p % 2 == 1 {
                "data"
            } else if p == 2 {
                "status"
            } else {
                "other"
            };
            (kind, p % 5 == 0)
        });
        assert_eq!(r.lost_pages, 40);
        assert_eq!((r.lost_late, r.lost_unmarked), (8, 32));
        assert_eq!((r.lost_used_ring, r.lost_data, r.lost_status), (10, 20, 1));
        assert_eq!(r.lost_samples.len(), LOST_SAMPLES);
        assert_eq!(r.lost_samples[3].gpa, "0x3000");
        assert_eq!(r.lost_samples[5].kind, "data");
        assert!(r.lost_samples[5].marked_late);
        r.conclude();
        assert_eq!(r.exit_code, EXIT_LOST);
        assert!(r.verdict.contains("40 lost page(s)"), "{}", r.verdict);
        assert!(r.verdict.contains("(8 written after GET_VRING_BASE)"));
        let s = r.summary();
        assert!(
            s.contains("lost page GPA 0x3000 (data, never marked)"),
            "{s}"
        );
        assert!(
            s.contains(
                "40 lost (32 never marked, 8 marked too late; 20 data, 1 status, 10 used ring)"
            ),
            "{s}"
        );
    }
}
