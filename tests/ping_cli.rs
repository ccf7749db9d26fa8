//! `tern ping` and `tern netcheck` against a real daemon without a data plane (no control
//! server, so no network map and no engine): clear errors and exit code 1. Pings over real
//! paths are tested in the lab tests and in daemon_control.

use std::process::Output;

#[path = "support/tern_node.rs"]
mod tern_node;
use tern_node::Daemon;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ping_and_netcheck_without_a_data_plane_exit_1_and_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("state"), &tmp.path().join("tern.sock"));

    // No netmap yet: nothing to resolve a name against.
    let out = daemon.cli(&["ping", "-c", "2", "--timeout", "500ms", "somepeer"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "tern: no network map yet (this node is not connected to the tailnet): run tern up, \
         see tern status\n"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:?}");

    let out = daemon.cli(&["netcheck"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("the data plane is not running; run tern up"),
        "{text}"
    );
    let out = daemon.cli(&["netcheck", "--json"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(out.stdout.is_empty(), "no JSON without a report: {out:?}");

    // Usage errors are refused before the daemon is asked.
    let out = daemon.cli(&["ping", "-c", "0", "somepeer"]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let out = daemon.cli(&["ping", "--timeout", "nonsense", "somepeer"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("e.g. 5s, 500ms or 1m"),
        "{}",
        stderr(&out)
    );
    assert!(daemon.stop().success(), "daemon exits cleanly");
}

#[test]
fn ping_without_a_daemon_exits_1() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--socket", "/nonexistent/tern.sock", "ping", "c2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is `tern daemon` running?"),
        "{}",
        stderr(&out)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--socket", "/nonexistent/tern.sock", "netcheck"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is `tern daemon` running?"),
        "{}",
        stderr(&out)
    );
}
