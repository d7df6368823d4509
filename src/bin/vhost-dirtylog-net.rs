//! `vhost-dirtylog-net`: a vhost-user-net backend with dirty-page logging, so the guest using
//! it can be live-migrated without losing a page.
//!
//! Follows the vhost-user specification's "backend program conventions" as
//! `vhost-dirtylog-blk` does: `--socket-path` or an inherited listening socket with `--fd`,
//! `--print-capabilities`. Frames come from and go to a packet port: `--socket-port PATH` (a
//! unix datagram socket, one Ethernet frame per datagram; QEMU's `-netdev dgram` framing).
//! After a frontend disconnects the daemon waits for the next one; SIGINT / SIGTERM exit
//! cleanly (statistics printed, socket files removed), SIGUSR1 prints statistics.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use vhost_dirtylog::daemon::sandbox::{self, LandlockOutcome, LandlockPaths, SeccompMode};
use vhost_dirtylog::daemon::signals;
use vhost_dirtylog::daemon::socket::{self, SocketAccess};
use vhost_dirtylog::net::daemon::NetServer;
use vhost_dirtylog::net::port::pair_path;
use vhost_dirtylog::net::{
    NetConfig, Port, SocketPort, TapPort, DEFAULT_MAC, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE,
};
use vhost_dirtylog::virtio_net::parse_mac;

/// vhost-user-net backend with dirty-page logging for live migration.
///
/// Serves a virtio-net device to a vhost-user frontend (QEMU's `-netdev vhost-user` with
/// virtio-net-pci, or any VMM) over a unix socket. Every page of guest memory the backend
/// writes (received frames and their headers, used-ring entries) is marked in the frontend's
/// dirty log while logging is on, so the VM can be live-migrated.
///
/// Signals: SIGUSR1 prints per-queue-pair statistics; SIGINT/SIGTERM print them and exit.
#[derive(Debug, Parser)]
#[command(name = "vhost-dirtylog-net", version, verbatim_doc_comment)]
#[command(after_help = "Examples:\n  \
    vhost-dirtylog-net --socket-path /run/vm1-net.sock --socket-port /run/vm1-port.sock\n  \
    vhost-dirtylog-net --socket-path /run/a.sock --socket-port /tmp/pa --socket-peer /tmp/pb\n  \
    vhost-dirtylog-net --socket-path /run/b.sock --socket-port /tmp/pb --socket-peer /tmp/pa\n  \
    vhost-dirtylog-net --print-capabilities")]
struct Args {
    /// Listen on this unix socket path (vhost-user). PATH.lock next to it keeps a second
    /// daemon off a live socket; a stale socket left by a daemon that died is replaced.
    #[arg(
        short = 's',
        long,
        alias = "socket",
        value_name = "PATH",
        conflicts_with = "fd"
    )]
    socket_path: Option<PathBuf>,

    /// Use this inherited, already listening unix socket file descriptor.
    #[arg(long, value_name = "FD")]
    fd: Option<RawFd>,

    /// Group owning the socket file (name or gid).
    #[arg(long, value_name = "GROUP", requires = "socket_path")]
    socket_group: Option<String>,

    /// Permission bits of the socket file, octal (e.g. 0660).
    #[arg(long, value_name = "MODE", requires = "socket_path")]
    socket_mode: Option<String>,

    /// Packet port: a unix datagram socket bound at PATH, one Ethernet frame per datagram
    /// (no virtio-net header; QEMU `-netdev dgram` framing). With N queue pairs, pair k > 0
    /// uses PATH.k.
    #[arg(long, value_name = "PATH", required_unless_present = "tap")]
    socket_port: Option<PathBuf>,

    /// Where the socket port sends frames (pair k > 0: PEER.k). Default: to the sender of the
    /// last frame received.
    #[arg(long, value_name = "PEER", requires = "socket_port")]
    socket_peer: Option<PathBuf>,

    /// Packet port: the TAP interface NAME (attached to if it exists, else created), with a
    /// virtio-net header (checksum / TSO offloads pass through) and one queue per queue pair
    /// (IFF_MULTI_QUEUE). Needs CAP_NET_ADMIN.
    #[arg(long, value_name = "NAME", conflicts_with = "socket_port")]
    tap: Option<String>,

    /// Queue pairs (one RX and one TX queue each, one worker thread each).
    #[arg(long, alias = "queue-pairs", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUE_PAIRS as i64))]
    queues: u16,

    /// Maximum queue size the frontend may configure (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(2..=MAX_QUEUE_SIZE as i64))]
    queue_size: u16,

    /// MAC address in the config space (QEMU supplies its own to the guest).
    #[arg(long, value_name = "XX:XX:XX:XX:XX:XX")]
    mac: Option<String>,

    /// MTU to advertise (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "BYTES")]
    mtu: Option<u16>,

    /// How received frames are marked in the dirty log while migrating: `batched` (one atomic
    /// OR per distinct log word per RX burst, flushed before the used index is published) or
    /// `plain` (one per write; for comparisons).
    #[arg(long, value_enum, default_value_t = Marks::Batched)]
    marks: Marks,

    /// Sandbox: `all` = seccomp allow-list + Landlock; `none` = neither.
    #[arg(long, value_enum, default_value_t = Sandbox::All)]
    sandbox: Sandbox,

    /// What a system call outside the seccomp allow-list does: `kill` or `log`.
    #[arg(long, value_enum, default_value_t = SeccompAction::Kill)]
    seccomp_action: SeccompAction,

    /// Log filter (env_logger syntax). Default: RUST_LOG if set, else info.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Marks {
    Batched,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Sandbox {
    All,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SeccompAction {
    Kill,
    Log,
}

/// The `--print-capabilities` answer (vhost-user.json: a `net` backend has no extra features).
fn print_capabilities() -> ExitCode {
    println!("{{\n  \"type\": \"net\"\n}}");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--print-capabilities")
    {
        return print_capabilities();
    }
    let args = Args::parse();
    let filter = args
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    env_logger::Builder::new().parse_filters(&filter).init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vhost-dirtylog-net: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let mac = match &args.mac {
        Some(s) => parse_mac(s).ok_or_else(|| format!("--mac {s}: not XX:XX:XX:XX:XX:XX"))?,
        None => DEFAULT_MAC,
    };
    let config = NetConfig {
        queue_pairs: args.queues,
        queue_size: args.queue_size,
        mac,
        mtu: args.mtu,
        batch_marks: args.marks == Marks::Batched,
    };
    config.validate().map_err(|e| e.to_string())?;
    if args.fd.is_some() && (args.socket_group.is_some() || args.socket_mode.is_some()) {
        return Err("--socket-group and --socket-mode apply to --socket-path".into());
    }
    let access = SocketAccess {
        gid: args
            .socket_group
            .as_deref()
            .map(socket::parse_group)
            .transpose()
            .map_err(|e| e.to_string())?,
        mode: args
            .socket_mode
            .as_deref()
            .map(socket::parse_mode)
            .transpose()
            .map_err(|e| e.to_string())?,
    };

    signals::block()?;

    let inherited = match (&args.socket_path, args.fd) {
        (None, Some(fd)) => Some(socket::inherit(fd).map_err(|e| e.to_string())?),
        (Some(_), None) => None,
        _ => return Err("exactly one of --socket-path PATH or --fd FD is required".into()),
    };

    let mut ports: Vec<Arc<dyn Port>> = Vec::new();
    let mut port_paths = Vec::new();
    if let Some(name) = &args.tap {
        let multi = config.queue_pairs > 1;
        for pair in 0..usize::from(config.queue_pairs) {
            let tap = TapPort::open(name, multi).map_err(|e| format!("--tap {name}: {e}"))?;
            log::info!("queue pair {pair}: TAP {name}");
            ports.push(Arc::new(tap));
        }
    } else {
        let base = args
            .socket_port
            .clone()
            .ok_or("--socket-port PATH or --tap NAME is required")?;
        for pair in 0..usize::from(config.queue_pairs) {
            let path = pair_path(&base, pair);
            let peer = args.socket_peer.as_ref().map(|p| pair_path(p, pair));
            let port = SocketPort::bind(&path, peer.as_deref())
                .map_err(|e| format!("socket port {}: {e}", path.display()))?;
            log::info!(
                "queue pair {pair}: socket port {}{}",
                path.display(),
                match &peer {
                    Some(p) => format!(", sending to {}", p.display()),
                    None => ", sending to the last sender".into(),
                }
            );
            port_paths.push(path);
            ports.push(Arc::new(port));
        }
    }

    // The relay's private socket (QEMU's early SET_VRING_ENABLE, `backend::relay`) goes where
    // the sandbox lets the daemon remove it at exit: beside the vhost-user socket, else beside
    // the first socket port; with `--fd` and `--tap` in $TMPDIR (left there if Landlock is on).
    let relay_dir = args
        .socket_path
        .as_deref()
        .or(port_paths.first().map(PathBuf::as_path))
        .map_or_else(std::env::temp_dir, sandbox::socket_dir);
    let server = Arc::new(NetServer::new_in(config, ports, &relay_dir).map_err(|e| e.to_string())?);
    let (listener, owned) = match (args.socket_path, inherited) {
        (Some(path), None) => {
            let s = socket::bind(&path, access).map_err(|e| e.to_string())?;
            log::info!(
                "listening on {} (lock {})",
                path.display(),
                s.lock.path().display()
            );
            (s.listener, Some((path, s.lock)))
        }
        (_, Some(l)) => {
            log::info!("listening on an inherited socket (--fd)");
            (l, None)
        }
        (None, None) => {
            return Err("exactly one of --socket-path PATH or --fd FD is required".into())
        }
    };
    let owned_path = owned.as_ref().map(|(p, _)| p.clone());

    if args.sandbox == Sandbox::All {
        let mut socket_dirs: Vec<PathBuf> =
            owned_path.iter().map(|p| sandbox::socket_dir(p)).collect();
        socket_dirs.extend(port_paths.iter().map(|p| sandbox::socket_dir(p)));
        let paths = LandlockPaths {
            socket_dirs,
            ..Default::default()
        };
        match sandbox::landlock_restrict(&paths).map_err(|e| e.to_string())? {
            LandlockOutcome::Full => {
                log::info!("landlock: file access limited to the socket directories")
            }
            LandlockOutcome::Partial => log::warn!("landlock: partly enforced (older kernel ABI)"),
            LandlockOutcome::NotEnforced => {
                log::warn!("landlock: not supported by this kernel; file access is not restricted")
            }
        }
        let mode = match args.seccomp_action {
            SeccompAction::Kill => SeccompMode::Kill,
            SeccompAction::Log => SeccompMode::Log,
        };
        let filters = sandbox::seccomp_filters(mode).map_err(|e| e.to_string())?;
        sandbox::apply_seccomp(&filters).map_err(|e| e.to_string())?;
        log::info!("seccomp: allow-list on");
    } else {
        log::warn!("--sandbox none: no seccomp filter, no Landlock rules");
    }

    let mut remove = port_paths;
    remove.extend(owned_path);
    spawn_signal_thread(remove, server.clone())?;
    let r = server.serve(listener).map_err(|e| e.to_string());
    drop(owned);
    r
}

fn spawn_signal_thread(remove: Vec<PathBuf>, server: Arc<NetServer>) -> Result<(), String> {
    let s2 = server.clone();
    signals::spawn(signals::Handlers {
        stats: move || s2.stats_report(),
        hup: || log::info!("SIGHUP: nothing to re-read"),
        exit: move || {
            for p in &remove {
                let _ = std::fs::remove_file(p);
            }
            server.cleanup();
        },
    })
}
