//! `vhost-dirtylog-check`: drives any vhost-user-blk or -net backend through a simulated live migration
//! and reports the guest pages it wrote without marking them in the dirty log. The work is done
//! by `vhost_dirtylog::check`; this is its command line (the only place clap is used), so
//! parsing of durations and the clap glue live here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::Parser;
use vhost_dirtylog::check::{
    self, default_layout, parse_frame_range, parse_layout, parse_size, BenchOptions, CheckOptions,
    Device, Fault, NetOptions, SyncMode, Traffic, VmmStyle, Workload, EXIT_OK, EXIT_PROTOCOL,
    EXIT_USAGE,
};

/// Drive a vhost-user-blk or vhost-user-net backend through a simulated live migration and
/// report lost dirty pages.
///
/// The checker is the VMM and the guest: it gives the backend memfd guest memory (several
/// regions with holes), starts the virtqueues, fills the disk with a pattern that names every
/// word's disk offset, and keeps many random reads (and, if asked, writes) in flight. Meanwhile
/// it migrates: it hands the backend a dirty log, turns LOG_ALL on, copies all memory to a
/// "destination", and every round copies the pages the log reports dirty. At the end it stops
/// every ring with GET_VRING_BASE, syncs a last time and compares the destination with the
/// source byte for byte: every differing page is a page the backend wrote and never reported,
/// a page a real migration would have lost.
///
/// Works with any vhost-user-blk backend: vhost-dirtylog-blk, qemu-storage-daemon
/// (--export type=vhost-user-blk,...,writable=on), ...
///
/// With --device net the guest is a virtio-net driver instead: RX queues full of mergeable
/// buffers, each poisoned with a unique pattern before it is posted, TX frames, and frames
/// injected into the backend's port (--traffic) that keep arriving through the final stop.
/// Lost pages are reported by kind: RX buffer, RX used ring, TX used ring, other.
#[derive(Debug, Parser)]
#[command(name = "vhost-dirtylog-check", version, verbatim_doc_comment)]
#[command(after_help = "Exit status:
  0   no lost page, every read returned the expected data
  1   lost pages: the backend wrote guest memory the dirty log never reported
  2   protocol error: the backend broke the protocol or failed; a queue hung (requests in
      flight, none completed for --stall-timeout); or requests were still in flight when
      the backend answered the final stop (GET_VRING_BASE, or SET_VRING_ENABLE(0) with
      --vmm-style ch). Lost pages take precedence (exit 1).
  3   the backend does not support dirty logging (no VHOST_F_LOG_ALL / LOG_SHMFD)
  4   no lost page, but reads returned wrong data or requests failed (net: frames arrived
      damaged, duplicated or out of order)
  64  invalid options

Examples:
  vhost-dirtylog-check /tmp/vblk.sock
  vhost-dirtylog-check --fault all --queues 2 --duration 10s /tmp/vblk.sock
  vhost-dirtylog-check --vmm-style ch --fault all /tmp/vblk.sock
  vhost-dirtylog-check --no-reply-ack --duration 60ms /tmp/vblk.sock
  vhost-dirtylog-check --layout 0:64M,1G:64M,4G:128M --workload mixed --deferred /tmp/vblk.sock
  vhost-dirtylog-check --bench --queues 1 --depth 32 /tmp/vblk.sock
  vhost-dirtylog-check --json /tmp/vblk.sock | jq .lost_pages
  vhost-dirtylog-check --device net --traffic socket:/tmp/port.sock --fault all /tmp/vnet.sock
  vhost-dirtylog-check --device net --traffic none --vmm-style ch /tmp/testpmd-vhost.sock
  vhost-dirtylog-check --device net --traffic socket:/tmp/port.sock --bench /tmp/vnet.sock")]
struct Args {
    /// The backend's vhost-user socket (required unless --write-image).
    #[arg(value_name = "SOCKET", required_unless_present = "write_image")]
    socket: Option<PathBuf>,

    /// The device the backend serves: blk or net.
    #[arg(long, value_name = "TYPE", default_value = "blk", value_parser = device_parser())]
    device: Device,

    /// net: where frames come from: socket:PATH (the checker sends frames to the backend's
    /// unix datagram socket port PATH, pair k > 0 at PATH.k, and counts the guest's TX frames
    /// coming back), tap:NAME or tap:NAME@NETNS (frames sent through an AF_PACKET socket bound to the
    /// backend's TAP interface NAME, in network namespace NETNS: a name from `ip netns` or a
    /// path; needs CAP_NET_RAW / root), or none (the backend makes its own traffic, e.g. dpdk-testpmd
    /// --forward-mode=txonly; no TX frames are sent, frame contents are not checked).
    #[arg(long, value_name = "SOURCE", default_value = "none", value_parser = Traffic::parse)]
    traffic: Traffic,

    /// net: frame sizes injected and sent, MIN..MAX bytes (Ethernet header and payload).
    #[arg(long, value_name = "MIN..MAX", default_value = "60..1514", value_parser = parse_frame_range)]
    frame_size: (u32, u32),

    /// net: bytes per RX buffer (mergeable RX buffers: larger frames span several).
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    rx_buf_size: u32,

    /// net: frames per second injected per queue pair, and sent through each TX queue
    /// (0: as fast as the port takes them).
    #[arg(long, value_name = "FPS", default_value_t = 20000)]
    rate: u64,

    /// net: the guest sends no TX frames.
    #[arg(long)]
    no_tx: bool,

    /// Guest RAM, split evenly into --regions regions separated by holes.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    mem: u64,

    /// Number of guest RAM regions (each starts at the next 1 GiB boundary).
    #[arg(long, value_name = "N", default_value_t = 3)]
    regions: u32,

    /// Explicit RAM layout instead of --mem/--regions, e.g. 0:64M,1G:64M,4G:32M. The first
    /// region holds the rings.
    #[arg(long, value_name = "GPA:SIZE,...", conflicts_with_all = ["mem", "regions"])]
    layout: Option<String>,

    /// Queues to drive (net: queue pairs) [default: 2, or fewer if the backend has fewer].
    #[arg(long, value_name = "N")]
    queues: Option<u16>,

    /// Entries per queue.
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,

    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 32)]
    depth: u16,

    /// Put each used ring at a page boundary (as most drivers do) instead of placing it so that
    /// its avail_event field starts a page of its own (the default, which exposes a backend
    /// that writes avail_event without logging it).
    #[arg(long)]
    aligned_used_ring: bool,

    /// Guest workload.
    #[arg(long, default_value = "read", value_parser = workload_parser())]
    workload: Workload,

    /// Smallest request (multiple of 4K).
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_size)]
    min_io: u64,

    /// Largest request (multiple of 4K).
    #[arg(long, value_name = "SIZE", default_value = "128K", value_parser = parse_size)]
    max_io: u64,

    /// Pre-copy rounds after the full copy (default: as many as fit in --duration).
    #[arg(long, value_name = "N")]
    rounds: Option<u64>,

    /// How long the migration runs.
    #[arg(long, value_name = "TIME", default_value = "3s", value_parser = parse_duration)]
    duration: Duration,

    /// Time between the starts of two rounds.
    #[arg(long, value_name = "TIME", default_value = "50ms", value_parser = parse_duration)]
    round_interval: Duration,

    /// Deferred clearing: fetch the log without clearing it, clear each chunk right before
    /// copying it (MigrationBitmap::fetch_log / FetchedLog::clear_pages).
    #[arg(long)]
    deferred: bool,

    /// Chunk size in pages for --deferred.
    #[arg(long, value_name = "PAGES", default_value_t = 512)]
    clear_chunk: u64,

    /// Faults to inject, spread over the run: log-resize, mem-table, log-toggle, reconnect,
    /// vring-addr (a SET_VRING_ADDR storm from then on), all or none (comma-separated).
    #[arg(long, value_name = "LIST", default_value = "none", value_parser = Fault::parse_list)]
    fault: FaultList,

    /// Fill the disk span with the pattern through the backend first (the default when the
    /// device is writable).
    #[arg(long, conflicts_with = "no_prepare")]
    prepare: bool,

    /// The disk already holds the pattern for --seed (see --write-image); do not write it.
    #[arg(long)]
    no_prepare: bool,

    /// Disk bytes to use from offset 0 (capped at the capacity).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    disk_span: u64,

    /// Seed of the data pattern and the random workload.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,

    /// Bound on every wait for the backend (replies, completions).
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,

    /// A queue with requests in flight and no completion for this long fails the run.
    #[arg(long, value_name = "TIME", default_value = "2s", value_parser = parse_duration)]
    stall_timeout: Duration,

    /// Do not negotiate VHOST_USER_PROTOCOL_F_REPLY_ACK (messages then go unacknowledged; the
    /// checker waits with a GET_FEATURES barrier where it must).
    #[arg(long)]
    no_reply_ack: bool,

    /// How the log is read each round: swap (one log, consumed with atomic swaps, as QEMU) or
    /// flip (a fresh log handed over with SET_LOG_BASE every round, the retired one merged,
    /// as cloud-hypervisor) [default: swap, flip with --vmm-style ch].
    #[arg(long, value_name = "MODE", value_parser = sync_parser())]
    sync: Option<SyncMode>,

    /// Whose way of migrating to play: qemu (final stop by GET_VRING_BASE) or ch
    /// (cloud-hypervisor: flip sync, final stop by SET_VRING_ENABLE(0) on each ring and one
    /// more log flip; the new log is never read).
    #[arg(long, value_name = "STYLE", default_value = "qemu", value_parser = style_parser())]
    vmm_style: VmmStyle,

    /// Wait between the final sync and the comparison (catches writes after GET_VRING_BASE).
    #[arg(long, value_name = "TIME", default_value = "200ms", value_parser = parse_duration)]
    settle: Duration,

    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,

    /// No progress line on stderr (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,

    /// Measure IOPS and bandwidth with logging off vs on (4 KiB random reads, alternating
    /// phases) instead of checking.
    #[arg(long)]
    bench: bool,

    /// Length of one --bench phase.
    #[arg(long, value_name = "TIME", default_value = "50ms", value_parser = parse_duration)]
    bench_phase: Duration,

    /// Number of --bench phases (a multiple of 4: off, on, on, off, ...).
    #[arg(long, value_name = "N", default_value_t = 200)]
    bench_phases: u32,

    /// Write an image of --disk-span bytes holding the pattern for --seed to PATH and exit
    /// (for backends that export the disk read-only; then check with --no-prepare).
    #[arg(long, value_name = "PATH")]
    write_image: Option<PathBuf>,
}

/// One `--fault` value is a whole list (an alias, so clap does not read `Vec` as "repeatable").
type FaultList = Vec<Fault>;

/// `--workload`: the names [`Workload`]'s `FromStr` accepts, each with its help line (listed
/// by `--help`, and by the error for an unknown name).
fn workload_parser() -> impl TypedValueParser<Value = Workload> {
    PossibleValuesParser::new(Workload::ALL.map(|w| {
        PossibleValue::new(w.name()).help(match w {
            Workload::Read => "Reads only: the device writes guest memory with every request",
            Workload::Write => "Writes only: the device writes only status bytes and the used ring",
            Workload::Mixed => {
                "Half reads, half writes; reads check the data the writes put on disk"
            }
        })
    }))
    .try_map(|s| s.parse::<Workload>())
}

/// `--device`: the names [`Device`]'s `FromStr` accepts.
fn device_parser() -> impl TypedValueParser<Value = Device> {
    PossibleValuesParser::new(Device::ALL.map(|d| PossibleValue::new(d.name())))
        .try_map(|s| s.parse::<Device>())
}

/// `--sync`: the names [`SyncMode`]'s `FromStr` accepts.
fn sync_parser() -> impl TypedValueParser<Value = SyncMode> {
    PossibleValuesParser::new(SyncMode::ALL.map(|m| PossibleValue::new(m.name())))
        .try_map(|s| s.parse::<SyncMode>())
}

/// `--vmm-style`: the names [`VmmStyle`]'s `FromStr` accepts.
fn style_parser() -> impl TypedValueParser<Value = VmmStyle> {
    PossibleValuesParser::new(VmmStyle::ALL.map(|m| PossibleValue::new(m.name())))
        .try_map(|s| s.parse::<VmmStyle>())
}

/// Parses a duration: a number with `ms`, `s`, `m` (default seconds), e.g. `500ms`, `3s`, `1.5`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 3s, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => v,
        "ms" => v / 1000.0,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    if !(0.0..=1e7).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => exit(EXIT_OK),
                _ => exit(EXIT_USAGE),
            };
        }
    };
    if let Some(path) = &args.write_image {
        return match check::write_image(path, args.disk_span, args.seed) {
            Ok(()) => {
                eprintln!(
                    "wrote {} bytes of pattern (seed {}) to {}",
                    args.disk_span / 512 * 512,
                    args.seed,
                    path.display()
                );
                exit(EXIT_OK)
            }
            Err(e) => {
                eprintln!("vhost-dirtylog-check: {}: {e}", path.display());
                exit(EXIT_PROTOCOL)
            }
        };
    }
    let layout = match &args.layout {
        Some(l) => parse_layout(l),
        None => default_layout(args.mem, args.regions),
    };
    let layout = match layout {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vhost-dirtylog-check: {e}");
            return exit(EXIT_USAGE);
        }
    };
    let Some(socket) = args.socket.clone() else {
        eprintln!("vhost-dirtylog-check: no socket given");
        return exit(EXIT_USAGE);
    };
    let opts = CheckOptions {
        device: args.device,
        net: NetOptions {
            traffic: args.traffic.clone(),
            frame_min: args.frame_size.0,
            frame_max: args.frame_size.1,
            rx_buf: args.rx_buf_size,
            rate: args.rate,
            tx: !args.no_tx,
        },
        layout,
        queues: args.queues,
        queue_size: args.queue_size,
        depth: args.depth,
        isolate_avail_event: !args.aligned_used_ring,
        workload: args.workload,
        min_io: args.min_io,
        max_io: args.max_io,
        rounds: args.rounds,
        duration: args.duration,
        round_interval: args.round_interval,
        deferred: args.deferred,
        clear_chunk: args.clear_chunk,
        faults: args.fault.clone(),
        prepare: if args.prepare {
            Some(true)
        } else if args.no_prepare {
            Some(false)
        } else {
            None
        },
        disk_span: args.disk_span,
        seed: args.seed,
        timeout: args.timeout,
        settle: args.settle,
        progress: !args.no_progress,
        reply_ack: !args.no_reply_ack,
        stall_timeout: args.stall_timeout,
        sync: args.sync,
        vmm_style: args.vmm_style,
        ..CheckOptions::new(socket)
    };
    let (out, code) = if args.bench && args.device == Device::Net {
        let b = BenchOptions {
            phase: args.bench_phase,
            phases: args.bench_phases,
            ..BenchOptions::default()
        };
        match check::bench_net(&opts, &b) {
            Ok(r) if args.json => (serde_json::to_string(&r).map_err(|e| e.to_string()), 0),
            Ok(r) => (Ok(r.summary()), 0),
            Err(e) => return fail(&e, args.json),
        }
    } else if args.bench {
        let b = BenchOptions {
            phase: args.bench_phase,
            phases: args.bench_phases,
            ..BenchOptions::default()
        };
        match check::bench(&opts, &b) {
            Ok(r) if args.json => (serde_json::to_string(&r).map_err(|e| e.to_string()), 0),
            Ok(r) => (Ok(r.summary()), 0),
            Err(e) => return fail(&e, args.json),
        }
    } else {
        match check::run(&opts) {
            Ok(r) if args.json => (
                serde_json::to_string(&r).map_err(|e| e.to_string()),
                r.exit_code,
            ),
            Ok(r) => (Ok(r.summary()), r.exit_code),
            Err(e) => return fail(&e, args.json),
        }
    };
    match out {
        Ok(s) => {
            print_out(&s);
            exit(code)
        }
        Err(e) => {
            eprintln!("vhost-dirtylog-check: cannot encode the report: {e}");
            exit(EXIT_PROTOCOL)
        }
    }
}

/// Writes the report to stdout. A reader that went away (`--json | head -c 100`) is not an
/// error of the check: the exit code still tells the result, so `EPIPE` is ignored instead of
/// panicking as `println!` would.
fn print_out(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{s}").and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("vhost-dirtylog-check: cannot write the report: {e}");
        }
    }
}

fn fail(e: &check::CheckError, json: bool) -> ExitCode {
    if json {
        let v = serde_json::json!({ "error": e.to_string(), "exit_code": e.exit_code() });
        print_out(&v.to_string());
    }
    eprintln!("vhost-dirtylog-check: {e}");
    exit(e.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn command_line() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["x", "--workload", "mixed", "--fault", "all", "/s"]).unwrap();
        assert_eq!(a.workload, Workload::Mixed);
        assert_eq!(a.fault, Fault::ALL.to_vec());
        let a = Args::try_parse_from(["x", "/s"]).unwrap();
        assert_eq!(a.workload, Workload::Read);
        assert!(a.fault.is_empty());
        let a = Args::try_parse_from(["x", "--vmm-style", "ch", "--no-reply-ack", "/s"]).unwrap();
        assert_eq!((a.vmm_style, a.sync), (VmmStyle::Ch, None));
        assert!(a.no_reply_ack);
        assert_eq!(a.stall_timeout, Duration::from_secs(2));
        let a =
            Args::try_parse_from(["x", "--sync", "flip", "--fault", "vring-addr", "/s"]).unwrap();
        assert_eq!(a.sync, Some(SyncMode::Flip));
        assert_eq!(a.fault, [Fault::VringAddr]);
        let a = Args::try_parse_from([
            "x",
            "--device",
            "net",
            "--traffic",
            "socket:/p",
            "--frame-size",
            "64..1500",
            "/s",
        ])
        .unwrap();
        assert_eq!(a.device, Device::Net);
        assert_eq!(a.traffic, Traffic::Socket("/p".into()));
        assert_eq!(a.frame_size, (64, 1500));
        let a = Args::try_parse_from(["x", "--traffic", "tap:t0@ns1", "/s"]).unwrap();
        assert_eq!(
            a.traffic,
            Traffic::Tap {
                name: "t0".into(),
                netns: Some("ns1".into())
            }
        );
        assert_eq!(a.traffic.to_string(), "tap:t0@ns1");
        assert!(Args::try_parse_from(["x", "--traffic", "tap:", "/s"]).is_err());
        assert!(Args::try_parse_from(["x", "--traffic", "pcap:x", "/s"]).is_err());
        let e = Args::try_parse_from(["x", "--vmm-style", "kvm", "/s"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        let e = Args::try_parse_from(["x", "--workload", "random", "/s"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        assert!(e.to_string().contains("read, write, mixed"), "{e}");
    }
}
