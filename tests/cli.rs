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
        "daemon", "up", "down", "login", "logout", "status", "ping", "netcheck", "set", "ip",
        "metrics", "top", "derp", "lab",
    ] {
        assert!(help.contains(sub), "help lacks {sub}: {help}");
    }
}
