//! The listening socket: who may connect, one daemon per path, one frontend at a time.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vhost::vhost_user::Listener;

use super::lock::{lock_file, LockError, LockKind};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another daemon holds the lock file of this socket path.
    #[error(
        "{path} is served by another daemon{pid} (lock {lock} is held); refusing to take it over"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// `" (pid N)"` if the lock file names its holder.
        pid: String,
    },
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// `--socket-group` names no group.
    #[error("no such group: {0}")]
    NoSuchGroup(String),
    /// `--socket-mode` is not an octal mode of permission bits.
    #[error("invalid socket mode {0:?}: give octal permission bits such as 0660")]
    BadMode(String),
    /// `--fd` is not a listening unix socket.
    #[error("--fd {fd}: {what}")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        what: String,
    },
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Who may connect to a socket the daemon creates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Group owner of the socket file (`--socket-group`); the daemon must be a member (or root).
    pub gid: Option<libc::gid_t>,
    /// Permission bits of the socket file (`--socket-mode`); connecting needs write permission.
    /// Without it the process umask decides (typically 0755: only the owner can connect).
    pub mode: Option<u32>,
}

/// Resolves a group name (or a numeric gid) to a gid.
pub fn parse_group(s: &str) -> Result<libc::gid_t, SocketError> {
    if let Ok(gid) = s.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let name = CString::new(s).map_err(|_| SocketError::NoSuchGroup(s.to_owned()))?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: all-zero is a valid `group` (plain old data with null pointers).
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live local of the stated size; getgrnam_r fills `grp`
    // with pointers into `buf` and sets `result` to `&grp` or null.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(SocketError::NoSuchGroup(s.to_owned()));
    }
    Ok(grp.gr_gid)
}

/// Parses an octal mode such as `0660` or `660` (permission bits only).
pub fn parse_mode(s: &str) -> Result<u32, SocketError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(SocketError::BadMode(s.to_owned())),
    }
}

/// The lock file guarding a socket path: `PATH.lock`, holding an exclusive OFD lock and the
/// holder's pid. Kept open for the daemon's lifetime; never removed (removing a lock file
/// lets a third process lock a new file of the same name while the old one is still held).
#[derive(Debug)]
pub struct SocketLock {
    _file: File,
    path: PathBuf,
}

impl SocketLock {
    /// The lock file path for socket `path`: `path` with `.lock` appended.
    pub fn path_for(socket: &Path) -> PathBuf {
        let mut p = socket.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the lock for socket `socket`, or fails with [`SocketError::InUse`].
    pub fn acquire(socket: &Path) -> Result<SocketLock, SocketError> {
        let path = Self::path_for(socket);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("cannot open lock file", &path))?;
        match lock_file(&file, LockKind::Exclusive) {
            Ok(()) => {}
            Err(LockError::Busy) => {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                let pid = match s.trim().parse::<u32>() {
                    Ok(p) => format!(" (pid {p})"),
                    Err(_) => String::new(),
                };
                return Err(SocketError::InUse {
                    path: socket.to_owned(),
                    lock: path,
                    pid,
                });
            }
            Err(LockError::Io(e)) => return Err(io_err("cannot lock", &path)(e)),
        }
        // Best effort: the pid only improves the message a second daemon prints.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(SocketLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A socket the daemon created and owns: listener, path and its lock.
pub struct OwnedSocket {
    /// The listening socket.
    pub listener: Listener,
    /// The socket file.
    pub path: PathBuf,
    /// The lock keeping other daemons off `path`.
    pub lock: SocketLock,
}

impl std::fmt::Debug for OwnedSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedSocket")
            .field("listener", &self.listener.as_raw_fd())
            .field("path", &self.path)
            .field("lock", &self.lock)
            .finish()
    }
}

/// Creates the listening socket at `path`: takes `PATH.lock` (a second daemon is refused with
/// [`SocketError::InUse`]), replaces a stale socket left by a daemon that died (never another
/// kind of file), binds, and applies `access`.
///
/// Mode and group are set on the socket file right after `bind`; a frontend connecting in
/// between would only have been let in by the directory and umask alone, so set the
/// directory's permissions (systemd `RuntimeDirectoryMode=`, or a private directory) when that
/// matters.
pub fn bind(path: &Path, access: SocketAccess) -> Result<OwnedSocket, SocketError> {
    let lock = SocketLock::acquire(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // We hold the lock, so no live daemon of ours owns it: it is stale.
            std::fs::remove_file(path).map_err(io_err("cannot remove stale socket", path))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listener = Listener::new(path, false).map_err(|e| SocketError::Io {
        what: "cannot listen on",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    if let Some(gid) = access.gid {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| SocketError::NotASocket(path.to_owned()))?;
        // SAFETY: `c` is a valid NUL-terminated path; lchown only reads it. (-1 keeps the uid.)
        let rc = unsafe { libc::lchown(c.as_ptr(), u32::MAX, gid) };
        if rc != 0 {
            let _ = std::fs::remove_file(path);
            return Err(io_err("cannot set the group of", path)(
                std::io::Error::last_os_error(),
            ));
        }
    }
    if let Some(mode) = access.mode {
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            let _ = std::fs::remove_file(path);
            return Err(io_err("cannot set the mode of", path)(e));
        }
    }
    Ok(OwnedSocket {
        listener,
        path: path.to_owned(),
        lock,
    })
}

/// Adopts an inherited, listening unix socket (`--fd`, e.g. from systemd socket activation).
pub fn inherit(fd: RawFd) -> Result<Listener, SocketError> {
    let bad = |what: &str| SocketError::BadFd {
        fd,
        what: what.to_owned(),
    };
    if fd < 0 {
        return Err(bad("not a file descriptor"));
    }
    // SAFETY: `st` is a plain-old-data out parameter; fstat only inspects the descriptor.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(bad(&std::io::Error::last_os_error().to_string()));
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket"));
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
        return Err(bad("not a listening socket"));
    }
    // SAFETY: the descriptor is open (fstat succeeded), is a listening socket, and was handed
    // to this process to own by the convention `--fd` follows; nothing else in the process
    // uses it.
    let l = unsafe { UnixListener::from_raw_fd(fd) };
    Ok(Listener::from(l))
}

/// How long a waiting connection is left alone before it is refused, in case the connected
/// frontend is just leaving (a frontend that disconnects and at once reconnects, such as QEMU
/// with `reconnect=` or the checker's reconnect fault, must not be refused).
pub const REFUSE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs `serve` while a helper thread refuses every further connection on `listener`: once a
/// connection has waited [`REFUSE_GRACE`] and `serve` is still running, it accepts it, logs a
/// warning naming the peer's pid and uid, and closes it, so a second frontend sees the
/// connection closed instead of hanging in the listen backlog until the first one leaves.
/// (vhost-user has no message to say "busy"; the frontend reports the closed connection,
/// e.g. QEMU: "Failed to read msg header".) A connection still waiting when `serve` returns
/// stays in the backlog for the next accept.
pub fn refusing_others<R>(listener: &Listener, serve: impl FnOnce() -> R) -> R {
    let stop = match vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC) {
        Ok(e) => e,
        Err(e) => {
            log::warn!("cannot refuse extra frontends (eventfd: {e}); they will wait instead");
            return serve();
        }
    };
    // SAFETY: the listener outlives the scope below, which joins the thread using this fd.
    let lfd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    std::thread::scope(|s| {
        let refuser = std::thread::Builder::new()
            .name("refuse-extra".into())
            .spawn_scoped(s, || refuse_loop(lfd, &stop));
        let r = serve();
        let _ = stop.write(1);
        if let Ok(h) = refuser {
            let _ = h.join();
        }
        r
    })
}

fn refuse_loop(lfd: BorrowedFd<'_>, stop: &vmm_sys_util::eventfd::EventFd) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: lfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // Grace period: if the served frontend leaves meanwhile, the waiting one is next.
        let mut stop_only = libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let grace_ms = REFUSE_GRACE.as_millis() as libc::c_int;
        // SAFETY: `stop_only` is a live, initialised pollfd.
        if unsafe { libc::poll(&mut stop_only, 1, grace_ms) } != 0 {
            return;
        }
        // SAFETY: accept4 on a listening socket with null address pointers.
        let fd = unsafe {
            libc::accept4(
                lfd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let conn = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let peer = peer_cred(&conn)
            .map(|c| format!(" (pid {}, uid {})", c.pid, c.uid))
            .unwrap_or_default();
        log::warn!(
            "refused a second frontend{peer}: this daemon serves one frontend at a time and one \
             is connected"
        );
        drop(conn);
    }
}

fn peer_cred(fd: &std::os::fd::OwnedFd) -> Option<libc::ucred> {
    // SAFETY: all-zero is a valid `ucred`.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live local of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_groups_parse() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("660").unwrap(), 0o660);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("1777").is_err());
        assert!(parse_mode("").is_err());
        assert_eq!(parse_group("0").unwrap(), 0);
        assert_eq!(parse_group("root").unwrap(), 0);
        assert!(matches!(
            parse_group("no-such-group-vdl"),
            Err(SocketError::NoSuchGroup(_))
        ));
    }

    #[test]
    fn second_lock_on_a_socket_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let a = bind(&sock, SocketAccess::default()).unwrap();
        let e = bind(&sock, SocketAccess::default()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SocketError::InUse { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // The live socket was not replaced.
        assert!(sock.exists());
        drop(a);
        // Lock released (the stale socket file stays and is replaced).
        bind(&sock, SocketAccess::default()).unwrap();
    }
}
