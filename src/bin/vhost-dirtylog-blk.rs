//! `vhost-dirtylog-blk`: a vhost-user-blk backend with dirty-page logging, so the guest using it
//! can be live-migrated without losing a page.
//!
//! Follows the vhost-user specification's "backend program conventions": `--socket-path` or an
//! inherited listening socket with `--fd`, `--print-capabilities` (which ignores every other
//! option), and the block-specific `--blk-file` / `--read-only`. After a frontend disconnects
//! the daemon waits for the next one; SIGINT / SIGTERM exit cleanly (statistics printed, the
//! socket file it created removed), SIGUSR1 prints statistics, SIGHUP re-reads nothing now but
//! says when a new disk size will be seen (README: known limits).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use vhost_dirtylog::blk::daemon::{BlkOptions, BlkServer};
use vhost_dirtylog::blk::{parse_serial, AioMode, BlkConfig, MAX_QUEUES, MAX_QUEUE_SIZE};
use vhost_dirtylog::daemon::lock::{lock_file, LockError, LockKind};
use vhost_dirtylog::daemon::sandbox::{self, LandlockOutcome, LandlockPaths, SeccompMode};
use vhost_dirtylog::daemon::signals;
use vhost_dirtylog::daemon::socket::{self, SocketAccess};
use vhost_dirtylog::daemon::{default_num_queues, DEFAULT_MIN_QUEUES};

/// vhost-user-blk backend with dirty-page logging for live migration.
///
/// Serves a raw disk image or block device to a vhost-user frontend (QEMU's
/// vhost-user-blk-pci, or any VMM) over a unix socket. Every page of guest memory the
/// backend writes (read data, status bytes, used-ring entries) is marked in the frontend's
/// dirty log while logging is on, so the VM can be live-migrated.
///
/// Signals: SIGUSR1 prints per-queue statistics; SIGINT/SIGTERM print them and exit.
#[derive(Debug, Parser)]
#[command(name = "vhost-dirtylog-blk", version, verbatim_doc_comment)]
#[command(after_help = "Examples:\n  \
    vhost-dirtylog-blk --socket-path /run/vm1-disk.sock disk.img\n  \
    vhost-dirtylog-blk --socket-path /run/vm1-disk.sock --socket-group kvm --socket-mode 0660 disk.img\n  \
    vhost-dirtylog-blk --socket-path /run/vm1-disk.sock --blk-file /dev/vg/vm1 --direct --num-queues 4\n  \
    vhost-dirtylog-blk --print-capabilities")]
struct Args {
    /// Disk image file or block device to serve (raw format).
    #[arg(value_name = "IMAGE")]
    image: Option<PathBuf>,

    /// Disk image file or block device (same as IMAGE; vhost-user backend convention).
    #[arg(long = "blk-file", value_name = "PATH", conflicts_with = "image")]
    blk_file: Option<PathBuf>,

    /// Listen on this unix socket path. PATH.lock next to it keeps a second daemon off a live
    /// socket; a stale socket left by a daemon that died is replaced.
    #[arg(short = 's', long, value_name = "PATH", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,

    /// Use this inherited, already listening unix socket file descriptor.
    #[arg(long, value_name = "FD")]
    fd: Option<RawFd>,

    /// Group owning the socket file (name or gid), e.g. the group QEMU runs as under libvirt.
    #[arg(long, value_name = "GROUP", requires = "socket_path")]
    socket_group: Option<String>,

    /// Permission bits of the socket file, octal (e.g. 0660: owner and group may connect).
    #[arg(long, value_name = "MODE", requires = "socket_path")]
    socket_mode: Option<String>,

    /// Print the backend's capabilities as JSON (vhost-user.json schema) and exit; every other
    /// option is ignored.
    #[arg(long)]
    print_capabilities: bool,

    /// Export the disk read-only (writes complete with an I/O error).
    #[arg(short = 'r', long)]
    read_only: bool,

    /// Do not lock the disk image. By default it gets an OFD lock (shared with --read-only,
    /// exclusive otherwise), as QEMU and qemu-storage-daemon take, so two writers cannot share it.
    #[arg(long)]
    no_lock: bool,

    /// Number of request queues [default: the host's CPU count, at least 16, at most 64].
    /// QEMU's vhost-user-blk-pci asks for one per vCPU unless its num-queues is set.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES as i64))]
    num_queues: Option<u16>,

    /// Maximum virtqueue size (power of two).
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(2..=MAX_QUEUE_SIZE as i64))]
    queue_size: u16,

    /// Bypass the host page cache (O_DIRECT); aligned requests go straight between the disk
    /// and guest memory.
    #[arg(long)]
    direct: bool,

    /// Dataplane: io_uring (up to the queue depth in the disk per queue) or sync (one blocking
    /// request at a time per queue). Default: io_uring when the kernel allows it, else sync.
    #[arg(long, value_name = "auto|io_uring|sync", default_value_t = AioMode::Auto)]
    aio: AioMode,

    /// Serial number reported to the guest (GET_ID), at most 20 bytes.
    /// Defaults to the image file name, truncated.
    #[arg(long, value_name = "STR")]
    serial: Option<String>,

    /// Sandbox: `all` = seccomp allow-list + Landlock (best effort on kernels without it);
    /// `none` = neither.
    #[arg(long, value_enum, default_value_t = Sandbox::All)]
    sandbox: Sandbox,

    /// What a system call outside the seccomp allow-list does: `kill` the daemon, or `log` it
    /// (audit log) and let it through, to find a missing entry.
    #[arg(long, value_enum, default_value_t = SeccompAction::Kill)]
    seccomp_action: SeccompAction,

    /// Log filter (env_logger syntax: error, warn, info, debug, trace, or module=level lists).
    /// Default: RUST_LOG if set, else info.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
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

/// The `--print-capabilities` answer (vhost-user.json: `VHostUserBackendCapabilitiesBlock`).
#[derive(serde::Serialize)]
struct Capabilities {
    #[serde(rename = "type")]
    kind: &'static str,
    features: Vec<&'static str>,
}

fn print_capabilities() -> ExitCode {
    let caps = Capabilities {
        kind: "block",
        features: vec!["read-only", "blk-file"],
    };
    match serde_json::to_string_pretty(&caps) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vhost-dirtylog-blk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // The spec's backend program conventions: `--print-capabilities` prints and exits whatever
    // else is on the command line, so look for it before parsing the rest.
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
            eprintln!("vhost-dirtylog-blk: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let image = args
        .image
        .or(args.blk_file)
        .ok_or("no disk image given (IMAGE or --blk-file PATH)")?;
    let serial = match &args.serial {
        Some(s) => parse_serial(s).map_err(|e| e.to_string())?,
        None => default_serial(&image),
    };
    if args.fd.is_some() && (args.socket_group.is_some() || args.socket_mode.is_some()) {
        return Err(
            "--socket-group and --socket-mode apply to --socket-path; with --fd the \
                    socket's creator sets them (systemd: SocketGroup=, SocketMode=)"
                .into(),
        );
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
    let num_queues = args
        .num_queues
        .unwrap_or_else(|| default_num_queues(DEFAULT_MIN_QUEUES, MAX_QUEUES));
    let opts = BlkOptions {
        image: image.clone(),
        read_only: args.read_only,
        direct: args.direct,
        config: BlkConfig {
            num_queues,
            queue_size: args.queue_size,
            serial,
            aio: args.aio,
        },
    };

    // Block the signals the signal thread handles before any thread exists, so every thread
    // inherits the mask and only that thread receives them.
    signals::block()?;

    // An inherited socket is checked first: a wrong --fd is the more basic error.
    let inherited = match (&args.socket_path, args.fd) {
        (None, Some(fd)) => Some(socket::inherit(fd).map_err(|e| e.to_string())?),
        (Some(_), None) => None,
        _ => return Err("exactly one of --socket-path PATH or --fd FD is required".into()),
    };

    let server = Arc::new(BlkServer::new(&opts).map_err(|e| e.to_string())?);
    if args.no_lock {
        log::info!("--no-lock: {} is not locked", image.display());
    } else {
        let kind = if args.read_only {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        match lock_file(server.disk().file(), kind) {
            Ok(()) => {}
            Err(LockError::Busy) => {
                return Err(format!(
                    "{} is locked by another process (QEMU, qemu-storage-daemon or another \
                     vhost-dirtylog-blk{}); use --no-lock only if you know it is safe",
                    image.display(),
                    if args.read_only {
                        " that writes it"
                    } else {
                        ""
                    }
                ))
            }
            Err(e) => {
                return Err(format!(
                    "cannot lock {}: {e} (--no-lock skips the lock)",
                    image.display()
                ))
            }
        }
    }

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
        let paths = LandlockPaths {
            read_write: if args.read_only {
                vec![]
            } else {
                vec![image.clone()]
            },
            read_only: if args.read_only {
                vec![image.clone()]
            } else {
                vec![]
            },
            socket_dirs: owned_path.iter().map(|p| sandbox::socket_dir(p)).collect(),
        };
        match sandbox::landlock_restrict(&paths).map_err(|e| e.to_string())? {
            LandlockOutcome::Full => {
                log::info!("landlock: file access limited to the image and the socket directory")
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
        log::info!(
            "seccomp: allow-list on ({} calls), others {}",
            sandbox::ALLOWED_SYSCALLS.len(),
            if mode == SeccompMode::Kill {
                "kill the daemon"
            } else {
                "are logged"
            }
        );
    } else {
        log::warn!("--sandbox none: no seccomp filter, no Landlock rules");
    }

    spawn_signal_thread(owned_path, server.clone())?;
    let r = server.serve(listener).map_err(|e| e.to_string());
    drop(owned);
    r
}

fn default_serial(image: &Path) -> Vec<u8> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut bytes = name.into_bytes();
    bytes.truncate(20);
    bytes
}

fn spawn_signal_thread(socket: Option<PathBuf>, server: Arc<BlkServer>) -> Result<(), String> {
    let (s1, s2) = (server.clone(), server.clone());
    signals::spawn(signals::Handlers {
        stats: move || s1.stats_report(),
        hup: move || {
            log::info!(
                "SIGHUP: a connected guest cannot be told a new disk size (vhost 0.18 has no \
                 way to send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG); the size is re-read \
                 when the next frontend connects ({} sectors now)",
                s2.disk().capacity()
            )
        },
        exit: move || {
            if let Some(p) = &socket {
                let _ = std::fs::remove_file(p);
            }
            // Completed writes become durable even if the guest never flushed them.
            if let Err(e) = server.disk().flush() {
                log::warn!("flush on exit failed: {e}");
            }
        },
    })
}
