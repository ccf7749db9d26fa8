//! `tern set` against a real daemon: flags are checked before anything is sent, the relay
//! server port lands in prefs.json, survives `tern up` and a daemon restart, and an empty value
//! turns it off.

use std::path::Path;

use serde_json::Value;

#[path = "support/tern_node.rs"]
mod tern_node;
use tern_node::Daemon;

fn prefs(state: &Path) -> Value {
    let text = std::fs::read_to_string(state.join("prefs.json")).expect("prefs.json");
    serde_json::from_str(&text).expect("prefs.json is JSON")
}

#[test]
fn set_relay_server_port_is_stored_kept_and_cleared() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (state, socket) = (tmp.path().join("state"), tmp.path().join("tern.sock"));
    let daemon = Daemon::start(&state, &socket);

    let out = daemon.cli(&["set"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing to change"), "{stderr}");
    let out = daemon.cli(&["set", "--relay-server-port=seventy"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`seventy` is not a UDP port"), "{stderr}");

    daemon.ok(&["set", "--relay-server-port=40000"]);
    assert_eq!(prefs(&state)["relay_server_port"], 40000);
    // `up` changes only what it is given.
    daemon.ok(&[
        "up",
        "--login-server",
        "http://127.0.0.1:9",
        "--auth-key",
        "tskey-auth-test",
        "--hostname",
        "pi",
    ]);
    let p = prefs(&state);
    assert_eq!(
        (p["relay_server_port"].clone(), p["hostname"].clone()),
        (40000.into(), "pi".into())
    );
    daemon.stop();

    let daemon = Daemon::start(&state, &socket);
    assert_eq!(prefs(&state)["relay_server_port"], 40000);
    daemon.ok(&["set", "--relay-server-port="]);
    assert_eq!(prefs(&state)["relay_server_port"], Value::Null);
    daemon.ok(&["set", "--relay-server-port=0"]);
    assert_eq!(prefs(&state)["relay_server_port"], 0);
}

#[test]
fn set_relay_server_static_endpoints_is_sorted_kept_and_cleared() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (state, socket) = (tmp.path().join("state"), tmp.path().join("tern.sock"));
    let daemon = Daemon::start(&state, &socket);
    for (bad, says) in [
        ("203.0.113.7", "`203.0.113.7` is not ip:port"),
        ("203.0.113.7:0", "cannot be reached by clients"),
        ("0.0.0.0:40000", "cannot be reached by clients"),
    ] {
        let out = daemon.cli(&["set", &format!("--relay-server-static-endpoints={bad}")]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{bad}: {stderr}");
    }
    assert!(
        !state.join("prefs.json").exists(),
        "nothing stored from bad input"
    );

    daemon.ok(&[
        "set",
        "--relay-server-static-endpoints=[2001:db8::7]:40000, 203.0.113.9:40000,203.0.113.7:40000,203.0.113.9:40000",
    ]);
    let want: Value = serde_json::json!([
        "203.0.113.7:40000",
        "203.0.113.9:40000",
        "[2001:db8::7]:40000"
    ]);
    assert_eq!(prefs(&state)["relay_server_static_endpoints"], want);
    // Setting the port leaves them alone, and they survive a restart.
    daemon.ok(&["set", "--relay-server-port=40000"]);
    daemon.stop();
    let daemon = Daemon::start(&state, &socket);
    let p = prefs(&state);
    assert_eq!(
        (
            p["relay_server_port"].clone(),
            p["relay_server_static_endpoints"].clone()
        ),
        (40000.into(), want)
    );
    daemon.ok(&["set", "--relay-server-static-endpoints="]);
    let p = prefs(&state);
    assert_eq!(p["relay_server_static_endpoints"], Value::Array(vec![]));
    assert_eq!(p["relay_server_port"], 40000, "the port is kept");
}
