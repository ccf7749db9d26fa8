//! The daemon and its CLI on their own (no control server): state directory permissions,
//! LocalAPI socket, `up`/`down`/`status`, and how an unreachable control server is reported.
//! Dials only a closed loopback port.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[path = "support/tern_node.rs"]
mod tern_node;
use tern_node::{wait_for, Daemon};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn unreachable_control_is_reported_with_its_reason_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let state_dir = tmp.path().join("state");
    let socket = tmp.path().join("run/tern.sock");
    let daemon = Daemon::start(&state_dir, &socket);

    assert_eq!(mode(&state_dir), 0o700);
    assert_eq!(mode(&socket), 0o600);
    for key in ["machine.key", "node.key"] {
        assert_eq!(mode(&state_dir.join(key)), 0o600, "{key}");
    }
    let status = daemon.status();
    assert_eq!(status["backend_state"], "NoState");
    assert_eq!(status["data_plane"]["tun"], "userspace-networking");
    assert_eq!(status["data_plane"]["active"], false);

    let url = format!("http://127.0.0.1:{}", closed_port());
    daemon.ok(&[
        "up",
        "--login-server",
        &url,
        "--auth-key",
        "tskey-test",
        "--hostname",
        "n1",
    ]);
    let status = wait_for("two failed attempts", || {
        let s = daemon.status();
        (s["control"]["failed_attempts"].as_u64()? >= 2).then_some(s)
    });
    assert_eq!(status["backend_state"], "Starting");
    assert_eq!(status["control"]["url"], url.as_str());
    let error = status["control"]["last_error"]["message"].as_str().unwrap();
    assert!(
        error.contains("connection refused") || error.contains("Connection refused"),
        "{error}"
    );
    assert!(status["self"].is_null());

    let human = daemon.cli(&["status"]);
    assert!(
        !human.status.success(),
        "status must fail while not connected"
    );
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains(&format!("Control {url} unreachable")),
        "{text}"
    );
    assert!(text.contains("onnection refused"), "{text}");

    let prefs: Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("prefs.json")).unwrap()).unwrap();
    assert_eq!(prefs["login_server"], url.as_str());
    assert_eq!(prefs["hostname"], "n1");
    assert_eq!(prefs["want_running"], true);
    assert_eq!(mode(&state_dir.join("prefs.json")), 0o600);

    daemon.ok(&["down"]);
    let status = daemon.status();
    assert_eq!(status["backend_state"], "Stopped");
    assert_eq!(status["control"]["state"], "idle");
    let machine_key = std::fs::read_to_string(state_dir.join("machine.key")).unwrap();

    assert!(daemon.stop().success(), "daemon exits cleanly on SIGTERM");
    assert!(!socket.exists(), "socket removed on exit");

    // A restart keeps keys and the `down` preference.
    let daemon = Daemon::start(&state_dir, &socket);
    assert_eq!(daemon.status()["backend_state"], "Stopped");
    assert_eq!(
        std::fs::read_to_string(state_dir.join("machine.key")).unwrap(),
        machine_key
    );
    let err = daemon.cli(&["ip"]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no tailnet address yet"));
}

#[test]
fn bad_input_to_up_is_refused_with_context() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("state"), &tmp.path().join("tern.sock"));
    // (A bare `up` would default to Tailscale's control server, which tests never dial; the
    // default itself is a unit test in src/daemon.rs.)
    let out = daemon.cli(&["up", "--login-server", "ftp://x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad --login-server"));
    let out = daemon.cli(&[
        "up",
        "--login-server",
        "http://127.0.0.1:1",
        "--auth-key",
        "file:/nonexistent",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading auth key from /nonexistent"));
    assert_eq!(
        daemon.status()["backend_state"],
        "NoState",
        "refused `up` changes nothing"
    );
}

#[test]
fn cli_without_daemon_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--socket", "/nonexistent/tern.sock", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `tern daemon` running?"));
}

/// `tern status` run as `user` (via runuser) with the CLI binary at `cli`, returning whether it
/// succeeded and its stderr.
fn status_as(user: &str, cli: &Path, socket: &Path) -> (bool, String) {
    let out = Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(cli)
        .arg("--socket")
        .arg(socket)
        .args(["status", "--json"])
        .output()
        .expect("run runuser");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn operator_may_use_the_socket_and_other_users_may_not() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it starts the daemon and switches users with runuser)"
    );
    let tmp = tempfile::tempdir().unwrap();
    // Let other users reach the socket's directory; the socket's own mode is the gate.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tmp.path().join("tern.sock");
    let daemon = Daemon::start_with(
        &tmp.path().join("state"),
        &socket,
        &["--operator", "nobody"],
    );
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        65534,
        "owned by the operator"
    );
    // Other users cannot always reach the build tree (a checkout under a 0700 directory), so
    // they run a copy of the CLI from the shared directory.
    let cli = tmp.path().join("tern-cli");
    std::fs::copy(env!("CARGO_BIN_EXE_tern"), &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, err) = status_as("nobody", &cli, &socket);
    assert!(ok, "the operator can use the LocalAPI: {err}");
    let (ok, err) = status_as("daemon", &cli, &socket);
    assert!(!ok, "another user must be refused");
    assert!(err.contains("ermission denied"), "{err}");
    assert_eq!(
        daemon.status()["backend_state"],
        "NoState",
        "root still can"
    );
}
