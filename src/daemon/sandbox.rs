//! The daemon's sandbox: a seccomp allow-list and Landlock file-system rules, applied once the
//! disk is open and the socket bound, before the first frontend is accepted and before any
//! other thread exists (so every thread inherits both).
//!
//! **seccomp** ([`seccomp_filter`], rust-vmm's `seccompiler`): the system calls a serving
//! daemon makes, found with `strace -f` under `vhost-dirtylog-check` in every `--fault` mode,
//! with and without `--direct` and `--read-only`, plus the exit and error paths (the list is in
//! [`ALLOWED_SYSCALLS`]). Anything else kills the process (`SECCOMP_RET_KILL_PROCESS`; the
//! kernel's audit log names the call), or with [`SeccompMode::Log`] is allowed and logged, for
//! finding a missing entry. `ioctl` is limited to the block-device size queries and `prctl` to
//! naming threads. Opening files fails with `EACCES` instead of killing ([`REFUSED_SYSCALLS`]):
//! the daemon opens nothing once serving, but glibc's malloc reads
//! `/sys/devices/system/cpu/online` when a thread first needs an arena (`get_nprocs`), and
//! copes when it cannot.
//!
//! **Landlock** ([`landlock_restrict`], the `landlock` crate): file access is limited to the
//! disk image (read, and write unless read-only) and the socket directory (create and remove
//! the socket); TCP bind/connect (ABI 4), abstract unix sockets and signals to processes outside
//! the sandbox (ABI 6) are denied. Best effort: on a kernel without Landlock, or with an older
//! ABI, whatever the kernel supports is enforced and the rest is logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Building or installing the seccomp filter failed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// Building or applying the Landlock ruleset failed (not: the kernel lacks Landlock).
    #[error("landlock: {0}")]
    Landlock(String),
}

/// What happens on a system call outside the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the process (`SECCOMP_RET_KILL_PROCESS`).
    #[default]
    Kill,
    /// Allow it and write an audit record (`SECCOMP_RET_LOG`): for finding missing entries.
    Log,
    /// Fail it with `EPERM` (tests).
    Errno,
}

/// System calls that fail with `EACCES` rather than kill (a second filter; the kernel applies
/// the most restrictive verdict of all filters, so these must also be on the allow-list).
pub const REFUSED_SYSCALLS: &[&str] = &["open", "openat", "openat2"];

/// System calls a serving daemon makes (x86_64 and aarch64 names; calls a platform lacks are
/// skipped).
pub const ALLOWED_SYSCALLS: &[&str] = &[
    // vhost-user messages, the socket, refusing extra frontends
    "accept4",
    // the net daemon's relay (`backend::relay`): vhost-user-backend connects to the private
    // socket for every frontend (`socket` is allowed for AF_UNIX only, see `seccomp_filter`)
    "socket",
    "connect",
    // std's `UnixStream` read and write are `recv` / `send(.., MSG_NOSIGNAL)`, i.e. recvfrom
    // and sendto (the relay's copies)
    "sendto",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "shutdown",
    "getsockopt",
    "poll",
    "ppoll",
    "close",
    "fcntl",
    "read",
    "write",
    "writev",
    // event loops of the vring workers
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "eventfd2",
    // disk I/O
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "lseek",
    "fdatasync",
    "fsync",
    "fallocate",
    // The io_uring blk dataplane (`--aio io_uring`, the default): ring set-up, submission,
    // registration of the completion eventfd. The operations a ring carries (readv, writev,
    // fsync, fallocate) run in the kernel without a syscall of their own, so seccomp does not
    // see them; they are the synchronous path's operations on the same, already open fd.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // The kernel restarts an interrupted sleeping call (poll, nanosleep, futex) with this one;
    // io_uring's task work interrupts them routinely.
    "restart_syscall",
    "fstat",
    "newfstatat",
    "statx",
    "ioctl",
    // guest memory and the dirty log (mmap of received fds), allocator
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    // the dirty log's RCU (`membarrier`), threads and their synchronisation
    "membarrier",
    "futex",
    "clone",
    "clone3",
    "set_robust_list",
    "rseq",
    "sigaltstack",
    "prctl",
    "sched_getaffinity",
    "sched_yield",
    "gettid",
    "getpid",
    "getrandom",
    "nanosleep",
    "clock_nanosleep",
    "clock_gettime",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigtimedwait",
    "rt_sigreturn",
    "tgkill",
    "exit",
    "exit_group",
    // closing the leaked worker exit eventfds (reads /proc/self/fd/N links)
    "readlink",
    "readlinkat",
    // removing the socket at exit
    "unlink",
    "unlinkat",
    // refused with EACCES by the second filter (REFUSED_SYSCALLS)
    "open",
    "openat",
    "openat2",
];

fn syscall_number(name: &str) -> Option<i64> {
    let key = format!("SYS_{name}");
    macro_rules! table {
        ($($n:ident),* $(,)?) => {
            match key.as_str() {
                $(stringify!($n) => Some(libc::$n as i64),)*
                _ => None,
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    let arch_only = table!(SYS_poll, SYS_readlink, SYS_unlink, SYS_epoll_wait, SYS_open);
    #[cfg(not(target_arch = "x86_64"))]
    let arch_only: Option<i64> = None;
    arch_only.or({
        table!(
            SYS_accept4,
            SYS_socket,
            SYS_connect,
            SYS_sendto,
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendmsg,
            SYS_shutdown,
            SYS_getsockopt,
            SYS_ppoll,
            SYS_close,
            SYS_fcntl,
            SYS_read,
            SYS_write,
            SYS_writev,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_pwait,
            SYS_eventfd2,
            SYS_pread64,
            SYS_pwrite64,
            SYS_preadv,
            SYS_pwritev,
            SYS_lseek,
            SYS_fdatasync,
            SYS_fsync,
            SYS_fallocate,
            // The io_uring blk dataplane (`--aio io_uring`): ring set-up, submission and the
            // completion eventfd. The operations the ring then carries (readv, writev, fsync,
            // fallocate) run in the kernel without a syscall of their own, so seccomp never sees
            // them; they are the same operations as the synchronous path's, on the same fd.
            SYS_io_uring_setup,
            SYS_io_uring_enter,
            SYS_io_uring_register,
            SYS_restart_syscall,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_ioctl,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_mprotect,
            SYS_madvise,
            SYS_brk,
            SYS_membarrier,
            SYS_futex,
            SYS_clone,
            SYS_clone3,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_sigaltstack,
            SYS_prctl,
            SYS_sched_getaffinity,
            SYS_sched_yield,
            SYS_gettid,
            SYS_getpid,
            SYS_getrandom,
            SYS_nanosleep,
            SYS_clock_nanosleep,
            SYS_clock_gettime,
            SYS_rt_sigaction,
            SYS_rt_sigprocmask,
            SYS_rt_sigtimedwait,
            SYS_rt_sigreturn,
            SYS_tgkill,
            SYS_exit,
            SYS_exit_group,
            SYS_readlinkat,
            SYS_unlinkat,
            SYS_openat,
            SYS_openat2,
        )
    })
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;
#[cfg(target_arch = "riscv64")]
const ARCH: TargetArch = TargetArch::riscv64;

/// `ioctl` requests allowed: the block-device size and sector-size queries of
/// [`Disk`](crate::blk::disk::Disk) (`BLKGETSIZE64`, `BLKSSZGET`, `BLKPBSZGET`) and `FIONBIO`.
const ALLOWED_IOCTLS: &[u64] = &[
    0x8008_1272, // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    0x1268,      // BLKSSZGET
    0x127b,      // BLKPBSZGET
    0x5421,      // FIONBIO
    // vhost-dirtylog-net --tap: the virtio-net header size and offloads follow the features
    // each frontend acks (the TAP itself is opened with TUNSETIFF before the sandbox)
    libc::TUNSETVNETHDRSZ,
    libc::TUNSETOFFLOAD,
];

/// Builds the two filters: the allow-list ([`ALLOWED_SYSCALLS`]) and the one failing
/// [`REFUSED_SYSCALLS`] with `EACCES`. Install both ([`apply_seccomp`]).
pub fn seccomp_filters(mode: SeccompMode) -> Result<Vec<BpfProgram>, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let refused: BTreeMap<i64, Vec<SeccompRule>> = REFUSED_SYSCALLS
        .iter()
        .filter_map(|n| syscall_number(n))
        .map(|nr| (nr, Vec::new()))
        .collect();
    let refuse = SeccompFilter::new(
        refused,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        ARCH,
    )
    .map_err(err)?;
    let refuse: BpfProgram = refuse.try_into().map_err(err)?;
    // The refusing filter first: once the allow-list is in, seccomp(2) itself is not allowed.
    Ok(vec![refuse, seccomp_filter(mode)?])
}

/// Builds the allow-list filter.
pub fn seccomp_filter(mode: SeccompMode) -> Result<BpfProgram, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in ALLOWED_SYSCALLS {
        if let Some(nr) = syscall_number(name) {
            rules.insert(nr, Vec::new());
        }
    }
    let arg_eq = |arg: u8, v: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    let ioctls = ALLOWED_IOCTLS
        .iter()
        .map(|&r| arg_eq(1, r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    rules.insert(libc::SYS_ioctl, ioctls);
    // Unix sockets only (the relay's connection); no network socket is ever created once
    // serving.
    rules.insert(
        libc::SYS_socket,
        vec![arg_eq(0, libc::AF_UNIX as u64).map_err(err)?],
    );
    rules.insert(
        libc::SYS_prctl,
        vec![arg_eq(0, libc::PR_SET_NAME as u64).map_err(err)?],
    );
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, ARCH).map_err(err)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))
}

/// Installs `filters` on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`); threads
/// created later inherit them. Sets `PR_SET_NO_NEW_PRIVS`.
pub fn apply_seccomp(filters: &[BpfProgram]) -> Result<(), SandboxError> {
    for f in filters {
        seccompiler::apply_filter_all_threads(f)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// The paths a daemon may touch after the sandbox is on.
#[derive(Debug, Clone, Default)]
pub struct LandlockPaths {
    /// Files read and written (the disk image of a read-write export).
    pub read_write: Vec<PathBuf>,
    /// Files only read (a read-only image).
    pub read_only: Vec<PathBuf>,
    /// Directories where the daemon creates and removes its socket.
    pub socket_dirs: Vec<PathBuf>,
}

/// How much of the Landlock ruleset the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Everything requested.
    Full,
    /// Part of it (an older Landlock ABI).
    Partial,
    /// Nothing: the kernel has no Landlock (or it is disabled).
    NotEnforced,
}

/// Restricts the calling thread (and the threads it creates afterwards) to `paths`.
///
/// Call it before spawning threads: Landlock applies to the calling thread only (before ABI 8).
pub fn landlock_restrict(paths: &LandlockPaths) -> Result<LandlockOutcome, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let abi = ABI::V6;
    let file_rw = AccessFs::ReadFile | AccessFs::WriteFile;
    let file_ro = AccessFs::ReadFile.into();
    let dir = AccessFs::MakeSock | AccessFs::RemoveFile;
    let mut created = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?;
    let groups: [(&[PathBuf], landlock::BitFlags<AccessFs>); 3] = [
        (&paths.read_write, file_rw),
        (&paths.read_only, file_ro),
        (&paths.socket_dirs, dir),
    ];
    for (list, access) in groups {
        for p in list {
            let fd = PathFd::new(p)
                .map_err(|e| SandboxError::Landlock(format!("{}: {e}", p.display())))?;
            created = created
                .add_rule(PathBeneath::new(fd, access))
                .map_err(err)?;
        }
    }
    let status = created.restrict_self().map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Full,
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Partial,
        _ => LandlockOutcome::NotEnforced,
    })
}

/// The socket directory of `socket` (its parent, `.` for a bare name).
pub fn socket_dir(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs this test binary again with only `test` selected and `VDL_SANDBOX_CHILD` set, so a
    /// sandbox can be applied to a throw-away process.
    fn run_child(test: &str, what: &str) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env("VDL_SANDBOX_CHILD", what)
            .output()
            .unwrap()
    }

    fn child_mode() -> Option<String> {
        std::env::var("VDL_SANDBOX_CHILD").ok()
    }

    #[test]
    fn every_listed_syscall_is_known_on_this_platform() {
        #[cfg(target_arch = "x86_64")]
        for name in ALLOWED_SYSCALLS {
            assert!(syscall_number(name).is_some(), "{name}");
        }
        seccomp_filter(SeccompMode::Kill).unwrap();
    }

    #[test]
    fn seccomp_kills_an_unlisted_syscall() {
        if let Some(what) = child_mode() {
            let f = seccomp_filter(SeccompMode::Kill).unwrap();
            seccompiler::apply_filter(&f).unwrap();
            // SAFETY: plain system calls with integer arguments.
            unsafe {
                if what == "listed" {
                    libc::syscall(libc::SYS_getpid);
                } else {
                    // socket(2) is allowed for AF_UNIX only: the daemon never creates a network
                    // socket once serving.
                    libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
                }
                libc::syscall(libc::SYS_exit_group, 0);
            }
            unreachable!();
        }
        use std::os::unix::process::ExitStatusExt;
        let out = run_child(
            "daemon::sandbox::tests::seccomp_kills_an_unlisted_syscall",
            "unlisted",
        );
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
        // Negative control: the same filter lets a listed call through.
        let out = run_child(
            "daemon::sandbox::tests::seccomp_kills_an_unlisted_syscall",
            "listed",
        );
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }

    #[test]
    fn seccomp_refuses_open_with_eacces() {
        if child_mode().is_some() {
            for f in seccomp_filters(SeccompMode::Kill).unwrap() {
                seccompiler::apply_filter(&f).unwrap();
            }
            let path = c"/sys/devices/system/cpu/online";
            // SAFETY: a NUL-terminated path; the result is only compared.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            let e = std::io::Error::last_os_error().raw_os_error();
            let ok = fd == -1 && e == Some(libc::EACCES);
            // SAFETY: exit_group with an integer status.
            unsafe { libc::syscall(libc::SYS_exit_group, if ok { 0 } else { 3 }) };
            unreachable!();
        }
        let out = run_child(
            "daemon::sandbox::tests::seccomp_refuses_open_with_eacces",
            "open",
        );
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }

    #[test]
    fn seccomp_ioctl_is_limited_to_the_listed_requests() {
        if child_mode().is_some() {
            let f = seccomp_filter(SeccompMode::Errno).unwrap();
            seccompiler::apply_filter(&f).unwrap();
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD/FIONBIO on stdin with a live int.
            let (nbio, fionread) = unsafe {
                (
                    libc::ioctl(0, libc::FIONBIO as _, &mut n),
                    libc::ioctl(0, libc::FIONREAD as _, &mut n),
                )
            };
            let e = std::io::Error::last_os_error().raw_os_error();
            // FIONBIO is allowed (its result depends on stdin), FIONREAD is refused with EPERM.
            let _ = nbio;
            // SAFETY: exit_group with an integer status.
            unsafe {
                libc::syscall(
                    libc::SYS_exit_group,
                    if fionread == -1 && e == Some(libc::EPERM) {
                        0
                    } else {
                        3
                    },
                )
            };
            unreachable!();
        }
        let out = run_child(
            "daemon::sandbox::tests::seccomp_ioctl_is_limited_to_the_listed_requests",
            "ioctl",
        );
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }

    #[test]
    fn landlock_refuses_paths_outside_the_rules() {
        if let Some(dir) = child_mode() {
            let dir = PathBuf::from(dir);
            let image = dir.join("image");
            let outcome = landlock_restrict(&LandlockPaths {
                read_write: vec![image.clone()],
                read_only: vec![],
                socket_dirs: vec![dir.join("sockets")],
            })
            .unwrap();
            if outcome == LandlockOutcome::NotEnforced {
                std::process::exit(77);
            }
            let image_ok = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&image)
                .is_ok();
            let other = std::fs::read(dir.join("other"));
            let other_denied = matches!(&other, Err(e) if e.raw_os_error() == Some(libc::EACCES));
            let sock_ok = std::os::unix::net::UnixListener::bind(dir.join("sockets/s")).is_ok();
            let sock_elsewhere = std::os::unix::net::UnixListener::bind(dir.join("s")).is_err();
            let code = if image_ok && other_denied && sock_ok && sock_elsewhere {
                0
            } else {
                eprintln!("image_ok={image_ok} other={other:?} sock_ok={sock_ok} sock_elsewhere_denied={sock_elsewhere}");
                3
            };
            std::process::exit(code);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("image"), [0u8; 4096]).unwrap();
        std::fs::write(dir.path().join("other"), b"secret").unwrap();
        std::fs::create_dir(dir.path().join("sockets")).unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "daemon::sandbox::tests::landlock_refuses_paths_outside_the_rules",
                "--nocapture",
            ])
            .env("VDL_SANDBOX_CHILD", dir.path())
            .output()
            .unwrap();
        match out.status.code() {
            Some(77) => eprintln!("!!! kernel without Landlock: landlock test SKIPPED !!!"),
            _ => assert_eq!(out.status.code(), Some(0), "{out:?}"),
        }
        // Negative control: without the sandbox the same accesses succeed.
        assert!(std::fs::read(dir.path().join("other")).is_ok());
    }
}
