//! `vhost-dirtylog-blk`: a vhost-user-blk backend with dirty-page logging, so the guest using it
//! can be live-migrated without losing a page.
//!
//! Follows the vhost-user specification's "backend program conventions": `--socket-path` or an
//! inherited listening socket with `--fd`, `--print-capabilities`, and the block-specific
//! `--blk-file` / `--read-only`. After a frontend disconnects the daemon waits for the next one;
//! SIGINT / SIGTERM exit cleanly and remove the socket file it created.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost::vhost_user::Listener;
use vhost_dirtylog::blk::daemon::{BlkOptions, BlkServer};
use vhost_dirtylog::blk::disk::Disk;
use vhost_dirtylog::blk::{parse_serial, AioMode, BlkConfig, MAX_QUEUES, MAX_QUEUE_SIZE};

/// vhost-user-blk backend with dirty-page logging for live migration.
///
/// Serves a raw disk image or block device to a vhost-user frontend (QEMU's
/// vhost-user-blk-pci, or any VMM) over a unix socket. Every page of guest memory the
/// backend writes (read data, status bytes, used-ring entries) is marked in the frontend's
/// dirty log while logging is on, so the VM can be live-migrated.
///
/// Logging: RUST_LOG=debug|info|warn (default info), to stderr.
#[derive(Debug, Parser)]
#[command(name = "vhost-dirtylog-blk", version, verbatim_doc_comment)]
#[command(after_help = "Examples:\n  \
    vhost-dirtylog-blk --socket-path /run/vm1-disk.sock disk.img\n  \
    vhost-dirtylog-blk --socket-path /run/vm1-disk.sock --blk-file /dev/vg/vm1 --direct --num-queues 4\n  \
    vhost-dirtylog-blk --print-capabilities")]
struct Args {
    /// Disk image file or block device to serve (raw format).
    #[arg(value_name = "IMAGE")]
    image: Option<PathBuf>,

    /// Disk image file or block device (same as IMAGE; vhost-user backend convention).
    #[arg(long = "blk-file", value_name = "PATH", conflicts_with = "image")]
    blk_file: Option<PathBuf>,

    /// Listen on this unix socket path (a stale socket there is replaced).
    #[arg(short = 's', long, value_name = "PATH", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,

    /// Use this inherited, already listening unix socket file descriptor.
    #[arg(long, value_name = "FD")]
    fd: Option<RawFd>,

    /// Print the backend's capabilities as JSON (vhost-user.json schema) and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// Export the disk read-only (writes complete with an I/O error).
    #[arg(short = 'r', long)]
    read_only: bool,

    /// Number of request queues; each gets its own worker thread.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES as i64))]
    num_queues: u16,

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
    #[arg(long, value_name = "io_uring|sync", default_value_t = AioMode::Auto)]
    aio: AioMode,

    /// Serial number reported to the guest (GET_ID), at most 20 bytes.
    /// Defaults to the image file name, truncated.
    #[arg(long, value_name = "STR")]
    serial: Option<String>,
}

/// The `--print-capabilities` answer (vhost-user.json: `VHostUserBackendCapabilitiesBlock`).
#[derive(serde::Serialize)]
struct Capabilities {
    #[serde(rename = "type")]
    kind: &'static str,
    features: Vec<&'static str>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if args.print_capabilities {
        let caps = Capabilities {
            kind: "block",
            features: vec!["read-only", "blk-file"],
        };
        match serde_json::to_string_pretty(&caps) {
            Ok(s) => {
                println!("{s}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("vhost-dirtylog-blk: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
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
    let opts = BlkOptions {
        image,
        read_only: args.read_only,
        direct: args.direct,
        config: BlkConfig {
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            serial,
            aio: args.aio,
        },
    };

    // Block the termination signals before any thread exists, so every thread inherits the
    // mask and only the dedicated signal thread below receives them.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // An already-blocked signal is fine; anything else would leave signals unhandled.
        if let Err(e) = vmm_sys_util::signal::block_signal(sig) {
            if !matches!(e, vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) {
                return Err(format!("cannot block signal {sig}: {e}"));
            }
        }
    }

    let server = BlkServer::new(&opts).map_err(|e| e.to_string())?;

    let (listener, owned_path) = match (args.socket_path, args.fd) {
        (Some(path), None) => (bind(&path)?, Some(path)),
        (None, Some(fd)) => (inherit(fd)?, None),
        _ => return Err("exactly one of --socket-path PATH or --fd FD is required".into()),
    };
    if let Some(p) = &owned_path {
        log::info!("listening on {}", p.display());
    } else {
        log::info!("listening on inherited fd");
    }

    spawn_signal_thread(owned_path.clone(), server.disk().clone())?;
    server.serve(listener).map_err(|e| e.to_string())
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

/// Binds `path`, replacing a stale socket but never another kind of file.
fn bind(path: &Path) -> Result<Listener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    Listener::new(path, false).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

/// Adopts an inherited listening socket.
fn inherit(fd: RawFd) -> Result<Listener, String> {
    if fd < 0 {
        return Err(format!("--fd {fd}: not a file descriptor"));
    }
    // SAFETY: `st` is a plain-old-data out parameter; fstat only inspects the descriptor.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(format!("--fd {fd}: {}", std::io::Error::last_os_error()));
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(format!("--fd {fd}: not a socket"));
    }
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, a live local of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        return Err(format!("--fd {fd}: not a listening socket"));
    }
    // SAFETY: the descriptor is open (fstat succeeded), is a listening socket, and was handed
    // to this process to own by the convention `--fd` follows; nothing else in the process
    // uses it.
    let l = unsafe { UnixListener::from_raw_fd(fd) };
    Ok(Listener::from(l))
}

fn spawn_signal_thread(socket: Option<PathBuf>, disk: Arc<Disk>) -> Result<(), String> {
    let set = vmm_sys_util::signal::create_sigset(&[libc::SIGINT, libc::SIGTERM])
        .map_err(|e| format!("cannot create signal set: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset_t and `sig` a live local for the result.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            log::info!("received signal {sig}, exiting");
            if let Some(p) = &socket {
                let _ = std::fs::remove_file(p);
            }
            // Completed writes become durable even if the guest never flushed them.
            if let Err(e) = disk.flush() {
                log::warn!("flush on exit failed: {e}");
            }
            std::process::exit(0);
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start signal thread: {e}"))
}
