//! The CLI's contract for usage errors and a missing daemon: a clear message and the exit code.

use std::process::Command;

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

#[test]
fn metrics_without_a_daemon_says_so_and_exits_1() {
    let out = tern()
        .args(["--socket", "/nonexistent/tern.sock", "metrics"])
        .output()
        .expect("run tern");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/tern.sock"),
        "stderr: {stderr}"
    );
}

#[test]
fn ping_usage_errors_say_what_to_write() {
    let out = tern()
        .args(["ping", "--timeout", "nonsense", "c2"])
        .output()
        .expect("run tern");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid duration \"nonsense\": write a number and a unit, e.g. 5s"),
        "stderr: {stderr}"
    );
    let out = tern()
        .args(["ping", "-c", "0", "c2"])
        .output()
        .expect("run tern");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("-c <COUNT>") && stderr.contains("0"),
        "stderr: {stderr}"
    );
}

#[test]
fn ping_help_documents_the_exit_codes() {
    let out = tern().args(["ping", "--help"]).output().expect("run tern");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "0 = a pong came back over a direct path",
        "3 = ",
        "4 = no pong",
        "1 = other",
    ] {
        assert!(help.contains(needle), "help lacks {needle:?}: {help}");
    }
}

#[test]
fn unknown_flag_is_refused_with_usage() {
    let out = tern()
        .args(["status", "--no-such-flag"])
        .output()
        .expect("run tern");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--no-such-flag"), "stderr: {stderr}");
}

#[test]
fn help_lists_every_subcommand() {
    let out = tern().arg("--help").output().expect("run tern");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "daemon",
        "up",
        "down",
        "login",
        "logout",
        "status",
        "ping",
        "netcheck",
        "set",
        "ip",
        "metrics",
        "top",
        "derp",
        "lab",
        "completion",
    ] {
        assert!(help.contains(sub), "help lacks {sub}: {help}");
    }
    // The packaging helper is hidden from help but works.
    assert!(!help.contains("gen-man"), "help shows gen-man: {help}");
}

/// Starts `tern daemon` (userspace networking: no TUN, no host changes; not logged in: no
/// control traffic) with `env`, stderr into `dir/stderr`.
fn spawn_daemon(dir: &std::path::Path, env: &[(&str, &std::ffi::OsStr)]) -> std::process::Child {
    let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    let mut cmd = tern();
    cmd.arg("--socket")
        .arg(dir.join("sock"))
        .args([
            "daemon",
            "--tun",
            "userspace-networking",
            "--port",
            "0",
            "--state-dir",
        ])
        .arg(dir.join("state"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("TERN_LOG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn tern daemon")
}

fn stop_daemon(mut child: std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

/// Waits up to 20 s for `path` to exist.
fn wait_for(path: &std::path::Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn daemon_tells_systemd_it_is_ready_once_its_socket_listens_and_logs_plain_text() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let child = spawn_daemon(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", notify_path.as_os_str()),
            ("TERN_LOG", std::ffi::OsStr::new("info")),
        ],
    );
    let mut buf = [0u8; 64];
    let got = notify.recv(&mut buf);
    let socket_listening = dir.path().join("sock").exists();
    // The start-up line comes just after READY=1.
    let stderr_path = dir.path().join("stderr");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline
        && !std::fs::read_to_string(&stderr_path)
            .unwrap_or_default()
            .contains("tern daemon started")
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop_daemon(child);
    let n = got.expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        socket_listening,
        "READY=1 came before the LocalAPI socket existed"
    );
    let stderr = std::fs::read_to_string(&stderr_path).expect("stderr");
    assert!(stderr.contains("tern daemon started"), "stderr: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in logs that go to a file: {stderr:?}"
    );
}

#[test]
fn daemon_logs_follow_tern_log_not_rust_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = spawn_daemon(
        dir.path(),
        &[
            ("TERN_LOG", std::ffi::OsStr::new("warn")),
            ("RUST_LOG", std::ffi::OsStr::new("debug")),
        ],
    );
    let up = wait_for(&dir.path().join("sock"));
    // The start-up line is logged right after the bind; give it a moment to reach the file.
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop_daemon(child);
    assert!(up, "the daemon never listened");
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).expect("stderr");
    assert!(
        !stderr.contains("tern daemon started") && !stderr.contains("DEBUG"),
        "TERN_LOG=warn let info/debug through: {stderr}"
    );
}
