//! The `vhost-dirtylog-blk` program itself: command line, capabilities, error messages,
//! reconnection, signals and socket inheritance.

mod blk_support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blk_support::*;

#[test]
fn blk_daemon_print_capabilities_is_valid_json() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["type"], "block");
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(features.contains(&"read-only"));
    assert!(features.contains(&"blk-file"));
    // Only the schema's keys.
    assert_eq!(v.as_object().unwrap().len(), 2);
}

#[test]
fn blk_daemon_help_and_usage_errors() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for opt in [
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--blk-file",
        "--read-only",
        "--num-queues",
        "--queue-size",
        "--direct",
        "--serial",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let s = sock.to_str().unwrap();
    let err = run(&["--socket-path", s, "/nonexistent/disk.img"]);
    assert!(
        err.contains("cannot open disk image /nonexistent/disk.img"),
        "{err}"
    );
    let env = disk_dir(4096);
    let img = env.image.to_str().unwrap();
    let err = run(&[img]);
    assert!(err.contains("--socket-path"), "{err}");
    let err = run(&["--socket-path", s, "--queue-size", "100", img]);
    assert!(err.contains("power of two"), "{err}");
    let err = run(&["--socket-path", s, "--num-queues", "0", img]);
    assert!(err.contains("num-queues"), "{err}");
    let err = run(&[
        "--socket-path",
        s,
        "--serial",
        "this-serial-is-far-too-long",
        img,
    ]);
    assert!(err.contains("20 bytes"), "{err}");
    let err = run(&["--socket-path", s, "--blk-file", img, img]);
    assert!(err.contains("cannot be used with"), "{err}");
    // An existing non-socket file at the socket path is not clobbered.
    let err = run(&["--socket-path", img, img]);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::metadata(img).unwrap().len(), 4096);
    // An empty image.
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    let err = run(&["--socket-path", s, empty.to_str().unwrap()]);
    assert!(err.contains("smaller than one 512-byte sector"), "{err}");
}

#[test]
fn blk_daemon_serves_again_after_disconnect() {
    let mut d = spawn(IMAGE_SIZE, &["--num-queues", "2"]);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    {
        let mut vm = Vm::new(d.connect(), 2);
        vm.ram.write(DATA_BASE, &pattern).unwrap();
        assert!(vm.queues[1]
            .write(512, &[(DATA_BASE, 4096)], T)
            .unwrap()
            .is_ok());
        // Dropping the connection disconnects without GET_VRING_BASE, like a crashed VMM.
    }
    let mut fds = Vec::new();
    for round in 0..3 {
        let mut vm = Vm::new(d.connect(), 2);
        assert!(vm.queues[0]
            .read(512, &[(DATA_BASE + 0x10000, 4096)], T)
            .unwrap()
            .is_ok());
        // Same point of every session: the daemon's open fds must not grow per connection
        // (vhost-user-backend leaks each worker's exit eventfd unless the device reclaims it).
        fds.push(
            std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
                .unwrap()
                .count(),
        );
        assert_eq!(
            vm.ram.read_vec(DATA_BASE + 0x10000, 4096).unwrap(),
            pattern,
            "round {round}"
        );
        let log = vm.start_logging(RAM_SIZE);
        assert!(vm.queues[1]
            .read(0, &[(DATA_BASE + 0x20000, 4096)], T)
            .unwrap()
            .is_ok());
        assert!(set_pages(&log).any(|p| p == (DATA_BASE + 0x20000) >> 12));
        // A clean shutdown of the rings this time.
        vm.conn.stop_queue(0).unwrap();
        vm.conn.stop_queue(1).unwrap();
    }
    assert_eq!(fds[0], fds[2], "daemon fds per session: {fds:?}");
    d.assert_alive();
}

#[test]
fn blk_daemon_sigterm_removes_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut d = spawn(IMAGE_SIZE, &[]);
        // Also while a frontend is connected.
        let _vm = Vm::new(d.connect(), 1);
        // SAFETY: kill() with a child pid we own and a valid signal number.
        assert_eq!(unsafe { libc::kill(d.child.id() as libc::pid_t, sig) }, 0);
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(s) = d.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "daemon ignored signal {sig}");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "signal {sig}: {status:?}");
        assert!(
            !d.env.sock.exists(),
            "socket left behind after signal {sig}"
        );
    }
}

#[test]
fn blk_daemon_inherited_fd() {
    let env = disk_dir(IMAGE_SIZE);
    let listener = UnixListener::bind(&env.sock).unwrap();
    // std sets CLOEXEC; the child needs an inheritable copy (dup clears the flag).
    // SAFETY: dup of a valid descriptor we own; the result is checked and owned below.
    let fd = unsafe { libc::dup(listener.as_raw_fd()) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let child = Command::new(BIN)
        .arg("--fd")
        .arg(fd.as_raw_fd().to_string())
        .arg("--blk-file")
        .arg(&env.image)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(fd);
    drop(listener);
    let mut d = DaemonProcess::adopt(child, env);
    let mut vm = Vm::new(d.connect(), 1);
    assert!(vm.queues[0]
        .read(8, &[(DATA_BASE, 4096)], T)
        .unwrap()
        .is_ok());
    assert_eq!(
        vm.ram.read_vec(DATA_BASE, 4096).unwrap(),
        image_bytes(8 * 512, 4096)
    );
    d.assert_alive();

    // Not a socket: a clear error.
    let out = Command::new(BIN)
        .args(["--fd", "0", "--blk-file"])
        .arg(&d.env.image)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fd 0: not a socket"));
}
