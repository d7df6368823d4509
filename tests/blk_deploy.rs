//! `vhost-dirtylog-blk` as deployed: default queue count, who may connect (socket group and
//! mode, one daemon per socket path, one frontend at a time), the image lock, the sandbox under
//! the checker, capacity re-read on reconnect, `--print-capabilities`, statistics on SIGUSR1.
//!
//! Fixtures are local to this file (the shared ones are moving to `src/test_utils`).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vhost_dirtylog::driver::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-blk");
const CHECKER: &str = env!("CARGO_BIN_EXE_vhost-dirtylog-check");
const T: Duration = Duration::from_secs(10);

/// A daemon process whose stderr is collected line by line.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    /// Starts the daemon on `sock` and waits for "listening on".
    fn start(sock: &Path, image: &Path, extra: &[&str]) -> Daemon {
        let mut d = Self::spawn(sock, image, extra);
        d.wait_for("listening on")
            .unwrap_or_else(|| panic!("daemon did not start: {:?}", d.seen));
        d
    }

    fn spawn(sock: &Path, image: &Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("--socket-path")
            .arg(sock)
            .args(extra)
            .arg(image)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = pump(child.stderr.take().unwrap());
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (up to 10 s) for a stderr line containing `what`.
    fn wait_for(&mut self, what: &str) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| l.contains(what)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + T;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(what) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Waits for exit (10 s) and returns the status and all of stderr.
    fn exit(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        (status, self.seen.join("\n"))
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill with the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// Runs the daemon to completion with `args` and returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn capacity_of(sock: &Path) -> (u64, u64) {
    let mut c = Connection::connect(sock, T).unwrap();
    c.set_timeout(Some(T)).unwrap();
    c.negotiate_blk().unwrap();
    let cfg = c.get_config(0, 8).unwrap();
    (
        u64::from_le_bytes(cfg[..8].try_into().unwrap()),
        c.queue_num(),
    )
}

#[test]
fn print_capabilities_ignores_every_other_option() {
    for args in [
        &["--print-capabilities"][..],
        &[
            "--bogus-option",
            "--print-capabilities",
            "--num-queues",
            "0",
        ],
        &["--print-capabilities", "--socket-path"],
        &[
            "/nonexistent",
            "--print-capabilities",
            "--fd",
            "-5",
            "--sandbox",
            "nope",
        ],
    ] {
        let (ok, out, err) = run(args);
        assert!(ok, "{args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["type"], "block", "{args:?}");
    }
    // Negative control: the same bogus options without it are a usage error.
    let (ok, _, err) = run(&["--bogus-option", "--num-queues", "0"]);
    assert!(!ok && err.contains("--bogus-option"), "{err}");
}

#[test]
fn default_queue_count_is_the_cpu_count_within_16_to_64() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 1 << 20);
    let sock = dir.path().join("d.sock");
    let mut d = Daemon::start(&sock, &img, &[]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let (_, queues) = capacity_of(&sock);
    assert_eq!(queues, cpus.clamp(16, 64));
    assert!(d
        .wait_for(&format!("{} queue(s)", cpus.clamp(16, 64)))
        .is_some());
    drop(d);
    // --num-queues still wins.
    let mut d = Daemon::start(&sock, &img, &["--num-queues", "3"]);
    assert_eq!(capacity_of(&sock).1, 3);
    assert!(d.wait_for("3 queue(s)").is_some());
}

#[test]
fn idle_daemon_has_no_worker_threads() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "i.img", 1 << 20);
    let sock = dir.path().join("i.sock");
    // More queues than CPUs, so that glibc's malloc creates arenas (it then reads
    // /sys/devices/system/cpu/online, which the sandbox refuses with EACCES, not a kill).
    let d = Daemon::start(&sock, &img, &["--num-queues", "8"]);
    let threads = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| {
                let t = t.ok()?;
                std::fs::read_to_string(t.path().join("comm")).ok()
            })
            .filter(|c| c.trim() == "vring_worker")
            .count()
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        threads(d.child.id()),
        0,
        "worker threads while no frontend is connected"
    );
    // Negative control: with a frontend connected there is one worker per queue.
    let c = capacity_of_conn(&sock);
    let deadline = Instant::now() + T;
    while threads(d.child.id()) != 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(threads(d.child.id()), 8);
    drop(c);
}

fn capacity_of_conn(sock: &Path) -> Connection {
    let mut c = Connection::connect(sock, T).unwrap();
    c.set_timeout(Some(T)).unwrap();
    c.negotiate_blk().unwrap();
    c
}

#[test]
fn socket_group_and_mode_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "g.img", 1 << 20);
    let sock = dir.path().join("g.sock");
    // SAFETY: geteuid and getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // As root any group works; otherwise use our own (a group we are a member of).
    let gid = if euid == 0 { 65534 } else { egid };
    let g = gid.to_string();
    let d = Daemon::start(
        &sock,
        &img,
        &["--socket-group", &g, "--socket-mode", "0660"],
    );
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), gid);
    drop(d);
    // Negative control: without the options the mode is whatever bind(2) and the umask give.
    let d = Daemon::start(&sock, &img, &[]);
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_ne!(m.permissions().mode() & 0o777, 0o660);
    drop(d);
    // Bad values are clear errors.
    let s = sock.to_str().unwrap();
    let i = img.to_str().unwrap();
    let (ok, _, err) = run(&["--socket-path", s, "--socket-group", "no-such-group-vdl", i]);
    assert!(
        !ok && err.contains("no such group: no-such-group-vdl"),
        "{err}"
    );
    let (ok, _, err) = run(&["--socket-path", s, "--socket-mode", "999", i]);
    assert!(!ok && err.contains("invalid socket mode"), "{err}");
    let (ok, _, err) = run(&["--fd", "3", "--socket-mode", "0660", i]);
    assert!(!ok && err.contains("apply to --socket-path"), "{err}");
}

#[test]
fn second_daemon_on_a_live_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img_a = image(dir.path(), "a.img", 1 << 20);
    let img_b = image(dir.path(), "b.img", 2 << 20);
    let sock = dir.path().join("s.sock");
    let a = Daemon::start(&sock, &img_a, &[]);
    let b = Daemon::spawn(&sock, &img_b, &[]);
    let (status, err) = b.exit();
    assert!(!status.success());
    assert!(
        err.contains("served by another daemon") && err.contains(&format!("pid {}", a.child.id())),
        "{err}"
    );
    // A still serves its own disk on the path.
    assert_eq!(capacity_of(&sock).0, (1 << 20) / 512);
    // Negative control: once A is gone (killed: its socket file stays behind), B takes over.
    drop(a);
    assert!(sock.exists(), "the killed daemon's stale socket");
    let _b = Daemon::start(&sock, &img_b, &[]);
    assert_eq!(capacity_of(&sock).0, (2 << 20) / 512);
}

#[test]
fn second_frontend_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "f.img", 1 << 20);
    let sock = dir.path().join("f.sock");
    let mut d = Daemon::start(&sock, &img, &["--num-queues", "1"]);
    let first = capacity_of_conn(&sock);
    assert!(d.wait_for("frontend connected").is_some());
    let mut second = UnixStream::connect(&sock).unwrap();
    second.set_read_timeout(Some(T)).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 1];
    // Closed by the daemon: EOF (or a reset), well before the timeout.
    let r = second.read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || r.is_err() && t0.elapsed() < T,
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        d.wait_for("refused a second frontend").is_some(),
        "{:?}",
        d.seen
    );
    // Negative control: once the first frontend is gone, a new one is served, not refused.
    drop(first);
    assert!(d.wait_for("frontend disconnected").is_some());
    let mut third = capacity_of_conn(&sock);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(third.get_config(0, 8).unwrap().len(), 8);
}

#[test]
fn image_lock_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "l.img", 1 << 20);
    let s = |n: &str| dir.path().join(n);
    let _a = Daemon::start(&s("a.sock"), &img, &[]);
    // A writer holds it: a second writer and a reader are refused...
    for extra in [&[][..], &["--read-only"]] {
        let b = Daemon::spawn(&s("b.sock"), &img, extra);
        let (status, err) = b.exit();
        assert!(!status.success(), "{extra:?}");
        assert!(err.contains("is locked by another process"), "{err}");
    }
    // ...unless --no-lock (negative control: the refusal came from the lock).
    let _c = Daemon::start(&s("c.sock"), &img, &["--no-lock"]);
    drop(_a);
    // Readers share the image; a writer is then refused.
    let ro = tempfile::tempdir().unwrap();
    let img2 = image(ro.path(), "r.img", 1 << 20);
    let _r1 = Daemon::start(&s("r1.sock"), &img2, &["--read-only"]);
    let _r2 = Daemon::start(&s("r2.sock"), &img2, &["--read-only"]);
    let (status, err) = Daemon::spawn(&s("w.sock"), &img2, &[]).exit();
    assert!(!status.success() && err.contains("locked"), "{err}");
    // An OFD write lock from another process (as QEMU takes) also keeps the daemon out.
    let img3 = image(ro.path(), "q.img", 1 << 20);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img3)
        .unwrap();
    vhost_dirtylog::daemon::lock::lock_file(&f, vhost_dirtylog::daemon::lock::LockKind::Exclusive)
        .unwrap();
    let (status, err) = Daemon::spawn(&s("q.sock"), &img3, &["--read-only"]).exit();
    assert!(!status.success() && err.contains("locked"), "{err}");
}

#[test]
fn capacity_is_reread_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "c.img", 1 << 20);
    let sock = dir.path().join("c.sock");
    let mut d = Daemon::start(&sock, &img, &["--num-queues", "1"]);
    assert_eq!(capacity_of(&sock).0, 2048);
    assert!(d.wait_for("frontend disconnected").is_some());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    // SIGHUP explains what happens (and the daemon keeps running).
    d.signal(libc::SIGHUP);
    assert!(d
        .wait_for("re-read when the next frontend connects")
        .is_some());
    assert_eq!(capacity_of(&sock).0, 8192);
    assert!(d
        .wait_for("disk size changed from 2048 to 8192 sectors")
        .is_some());
}

#[test]
fn statistics_on_sigusr1_and_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "st.img", 64 << 20);
    let sock = dir.path().join("st.sock");
    let mut d = Daemon::start(&sock, &img, &["--num-queues", "2"]);
    let out = Command::new(CHECKER)
        .args(["--duration", "1s", "--disk-span", "16M"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.wait_for("frontend disconnected").is_some());
    d.signal(libc::SIGUSR1);
    let header = d.wait_for("pages-marked").expect("statistics on SIGUSR1");
    assert!(header.contains("requests") && header.contains("in-flight"));
    let total = d.wait_for("total").unwrap();
    let n: Vec<u64> = total
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // requests, errors, bytes, pages marked: the checker's reads were counted and marked.
    assert!(n[0] > 0 && n[1] == 0 && n[2] > 0 && n[3] > 0, "{total}");
    d.signal(libc::SIGTERM);
    let (status, err) = d.exit();
    assert!(status.success());
    assert!(err.matches("pages-marked").count() >= 2, "{err}");
    assert!(!sock.exists(), "socket removed at exit");
}

#[test]
fn log_level_option() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "ll.img", 1 << 20);
    let sock = dir.path().join("ll.sock");
    let session = |extra: &[&str]| {
        let d = Daemon::spawn(&sock, &img, extra);
        drop(capacity_of_conn(&sock));
        std::thread::sleep(Duration::from_millis(300));
        d.signal(libc::SIGTERM);
        let (status, err) = d.exit();
        assert!(status.success(), "{err}");
        err
    };
    // --log-level wins over RUST_LOG (the fixture sets RUST_LOG=info).
    let err = session(&["--log-level", "warn"]);
    assert!(!err.contains("INFO"), "{err}");
    assert!(
        err.contains("pages-marked"),
        "statistics are not log lines: {err}"
    );
    let err = session(&["--log-level", "vhost_dirtylog=debug"]);
    assert!(err.contains("DEBUG"), "{err}");
    // Negative control: at the default level the info lines are there.
    let err = session(&[]);
    assert!(err.contains("INFO") && !err.contains("DEBUG"), "{err}");
}

/// The sandboxed daemon (the default) passes the checker in every fault mode, buffered and
/// with `--direct`, and read-only with a prepared image.
#[test]
fn sandboxed_daemon_passes_the_checker_in_every_fault_mode() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        &["--num-queues", "2"][..],
        &["--num-queues", "2", "--direct"],
    ] {
        let img = image(dir.path(), "sb.img", 64 << 20);
        let sock = dir.path().join("sb.sock");
        let mut d = Daemon::start(&sock, &img, extra);
        assert!(
            d.wait_for("seccomp: allow-list on").is_some(),
            "{:?}",
            d.seen
        );
        assert!(d.wait_for("landlock").is_some());
        for fault in [
            "none",
            "log-resize",
            "mem-table",
            "log-toggle",
            "reconnect",
            "all",
        ] {
            let out = Command::new(CHECKER)
                .args(["--fault", fault, "--duration", "1s", "--disk-span", "32M"])
                .arg(&sock)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{extra:?} --fault {fault}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = Command::new(CHECKER)
            .args([
                "--workload",
                "mixed",
                "--fault",
                "all",
                "--deferred",
                "--duration",
                "1s",
            ])
            .args(["--disk-span", "32M"])
            .arg(&sock)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{extra:?} mixed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d.signal(libc::SIGTERM);
        let (status, err) = d.exit();
        assert!(status.success(), "{extra:?}: {status:?}\n{err}");
        std::fs::remove_file(&img).unwrap();
    }
    // Read-only: the checker writes its pattern into the image first.
    let img = dir.path().join("ro.img");
    let out = Command::new(CHECKER)
        .args(["--disk-span", "32M", "--write-image"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = dir.path().join("ro.sock");
    let mut d = Daemon::start(&sock, &img, &["--num-queues", "2", "--read-only"]);
    assert!(d.wait_for("seccomp: allow-list on").is_some());
    let out = Command::new(CHECKER)
        .args([
            "--fault",
            "all",
            "--duration",
            "1s",
            "--disk-span",
            "32M",
            "--no-prepare",
        ])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "read-only: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.signal(libc::SIGTERM);
    assert!(d.exit().0.success());
}

/// `contrib/install.sh` with DESTDIR and PREFIX: the files land where the README says, the
/// descriptor and the units name the installed daemon, and the descriptor is valid JSON.
#[test]
fn install_script_honours_destdir_and_prefix() {
    let dest = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let out = Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/install.sh"))
        .arg("--no-build")
        .env("DESTDIR", dest.path())
        .env("PREFIX", "/opt/vdl")
        .env("BUILD_DIR", bin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dest.path();
    let daemon = d.join("opt/vdl/libexec/vhost-dirtylog-blk");
    assert!(std::fs::metadata(&daemon).unwrap().permissions().mode() & 0o111 != 0);
    assert!(d.join("opt/vdl/bin/vhost-dirtylog-check").exists());
    let desc =
        std::fs::read_to_string(d.join("opt/vdl/share/qemu/vhost-user/50-vhost-dirtylog-blk.json"))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&desc).unwrap();
    assert_eq!(v["type"], "block");
    assert_eq!(v["binary"], "/opt/vdl/libexec/vhost-dirtylog-blk");
    let unit =
        std::fs::read_to_string(d.join("etc/systemd/system/vhost-dirtylog-blk@.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/vdl/libexec/vhost-dirtylog-blk --fd 3"),
        "{unit}"
    );
    assert!(d
        .join("etc/systemd/system/vhost-dirtylog-blk@.socket")
        .exists());
    assert!(d
        .join("opt/vdl/lib/sysusers.d/vhost-dirtylog.conf")
        .exists());
    assert!(d.join("etc/vhost-dirtylog/vm.conf.example").exists());
    // The installed daemon answers the descriptor's capability query.
    let out = Command::new(&daemon)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
}
