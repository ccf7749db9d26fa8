//! `tern lab up` as a demo: it starts the lab coordination server in `server`, `tern derp` on the
//! relay host and a registered tern daemon with a TUN in `c1` and `c2` (which ping each other); `tern lab status --json` names each node's socket, and
//! `tern --socket <it> status` from the root namespace shows both nodes Running and peered.
//! `tern lab down` (also `--force` without a state file) leaves no process, namespace or file.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Output};

use serde_json::Value;
use support::output_text as text;
use support::require_root;
use tern_lab::detached::is_alive;
use tern_lab::state::{state_dir, LabState, ProcessState};
use tern_lab::topology::{namespaces_with_prefix, unique_prefix};

fn tern(args: &[&str], prefix: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("TERN_LAB_PREFIX", prefix)
        .output()
        .expect("run tern")
}

fn ok_json(args: &[&str], prefix: &str) -> Value {
    let out = tern(args, prefix);
    assert!(out.status.success(), "tern {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|err| panic!("{args:?} JSON: {err}"))
}

fn host(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tears the lab down even when the test panics.
struct Lab(String);

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = tern(&["lab", "down", "--force"], &self.0);
    }
}

fn processes(status: &Value) -> Vec<ProcessState> {
    serde_json::from_value(status["processes"].clone()).expect("processes")
}

fn strings(value: &Value) -> Vec<String> {
    serde_json::from_value(value.clone()).expect("array of strings")
}

fn assert_gone(prefix: &str, procs: &[ProcessState]) {
    assert!(namespaces_with_prefix(prefix).unwrap().is_empty());
    for process in procs {
        assert!(
            !is_alive(process),
            "{} (pid {}) survived",
            process.name,
            process.pid
        );
    }
    assert!(!state_dir(prefix).exists(), "state dir left behind");
    let stray = processes_naming(&state_dir(prefix).display().to_string());
    assert!(stray.is_empty(), "processes of the lab left: {stray:?}");
}

/// Command lines of running processes that mention `needle` (the lab's state dir).
fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

#[test]
fn lab_up_runs_control_and_two_registered_nodes_and_down_removes_them() {
    require_root();
    let prefix = unique_prefix();
    let (nft_before, links_before) = (
        host(&["nft", "list", "tables"]),
        host(&["ip", "-br", "link"]),
    );
    let lab = Lab(prefix.clone());

    let up = tern(&["lab", "up", "--nat1", "easy", "--nat2", "hard"], &prefix);
    assert!(up.status.success(), "{}", text(&up));
    let status = ok_json(&["lab", "status", "--json"], &prefix);

    assert_eq!(status["services"][0]["kind"], "control");
    assert_eq!(status["services"][0]["url"], "http://10.99.0.20:8080");
    assert_eq!(status["sockets"][0]["addr"], "10.99.0.20:8080");
    let procs = processes(&status);
    let names: BTreeSet<&str> = procs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["control", "derp", "tern:c1", "tern:c2"]
            .into_iter()
            .collect()
    );
    for process in &procs {
        assert_eq!(process.alive, Some(true), "{process:?}");
        assert!(process.start_time.is_some(), "{process:?}");
        // Each runs inside its lab namespace.
        let ns = host(&["ip", "netns", "identify", &process.pid.to_string()]);
        assert_eq!(
            ns.trim(),
            format!("{prefix}-{}", process.node),
            "{process:?}"
        );
    }

    let nodes = status["tern_nodes"].as_array().expect("tern_nodes");
    assert_eq!(nodes.len(), 2, "{status}");
    // Each node's daemon, asked over the socket the lab status names, from the root namespace.
    let mut seen = Vec::new();
    for node in nodes {
        let socket = node["socket"].as_str().expect("socket");
        assert_eq!(
            node["status_command"],
            format!("tern --socket {socket} status").as_str()
        );
        let daemon = ok_json(&["--socket", socket, "status", "--json"], &prefix);
        assert_eq!(daemon["backend_state"], "Running", "{daemon}");
        assert_eq!(daemon["control"]["url"], "http://10.99.0.20:8080");
        assert_eq!(daemon["self"]["hostname"], node["hostname"]);
        let ips = strings(&daemon["self"]["tailnet_ips"]);
        assert!(
            ips.first().is_some_and(|ip| ip.starts_with("100.")),
            "{ips:?}"
        );
        // The lab status reports the same, live.
        assert_eq!(node["backend_state"], "Running");
        assert_eq!(strings(&node["tailnet_ips"]), ips);
        seen.push((node["hostname"].as_str().unwrap().to_string(), ips, daemon));
    }
    for (name, _, daemon) in &seen {
        let (other, other_ips, _) = seen.iter().find(|(n, _, _)| n != name).unwrap();
        let peers = daemon["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), 1, "{name}: {daemon}");
        assert_eq!(peers[0]["hostname"], other.as_str());
        assert_eq!(
            &strings(&peers[0]["tailnet_ips"]),
            other_ips,
            "{name}'s peer"
        );
    }

    // The data plane: each node pings the other's tailnet address from its namespace, over
    // tern derp on the relay host.
    assert_eq!(status["services"][1]["kind"], "derp", "{status}");
    for (name, _, _) in &seen {
        let (_, other_ips, _) = seen.iter().find(|(n, _, _)| n != name).unwrap();
        let ns = format!("{prefix}-{name}");
        let ping = Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-c", "3", "-i", "0.3", "-W", "5",
            ])
            .arg(&other_ips[0])
            .output()
            .unwrap();
        assert!(ping.status.success(), "ping from {name}: {}", text(&ping));
    }
    let daemon = ok_json(
        &[
            "--socket",
            nodes[0]["socket"].as_str().unwrap(),
            "status",
            "--json",
        ],
        &prefix,
    );
    assert_eq!(daemon["data_plane"]["active"], true, "{daemon}");

    // nat2 is hard: after the traffic the paths stay on DERP, and the lab status shows why, live
    // (the reason settles when the first discovery pings time out, 5 s).
    let want = |host: &Value| match host.as_str() {
        Some("c1") => "peer-hard-nat",
        _ => "local-hard-nat",
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let lab_status = loop {
        let lab_status = ok_json(&["lab", "status", "--json"], &prefix);
        let settled = lab_status["tern_nodes"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .all(|n| n["peers"][0]["path_reason"] == want(&n["hostname"]))
        });
        if settled {
            break lab_status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "path reasons not settled after 15 s: {lab_status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    for node in lab_status["tern_nodes"].as_array().unwrap() {
        let peer = &node["peers"][0];
        let other = if node["hostname"] == "c1" { "c2" } else { "c1" };
        assert_eq!(peer["hostname"], other, "{node}");
        assert_eq!(peer["path"], "derp", "{node}");
        assert_eq!(peer["derp_region"], 900, "{node}");
    }

    // The human status names the control server, the command to ask each node and the paths.
    let human = tern(&["lab", "status"], &prefix);
    let human = text(&human);
    assert!(human.contains("http://10.99.0.20:8080"), "{human}");
    assert!(
        human.contains("    to c2: derp(900), peer-hard-nat\n"),
        "{human}"
    );
    assert!(
        human.contains("    to c1: derp(900), local-hard-nat\n"),
        "{human}"
    );
    for node in nodes {
        assert!(
            human.contains(node["status_command"].as_str().unwrap()),
            "{human}"
        );
    }

    let down = tern(&["lab", "down"], &prefix);
    assert!(down.status.success(), "{}", text(&down));
    assert_gone(&prefix, &procs);
    assert_eq!(host(&["nft", "list", "tables"]), nft_before);
    assert_eq!(host(&["ip", "-br", "link"]), links_before);
    drop(lab);
}

#[test]
fn down_force_without_state_file_still_stops_control_and_daemons() {
    require_root();
    let prefix = unique_prefix();
    let lab = Lab(prefix.clone());
    let up = tern(&["lab", "up"], &prefix);
    assert!(up.status.success(), "{}", text(&up));
    let procs = processes(&ok_json(&["lab", "status", "--json"], &prefix));
    assert_eq!(procs.len(), 4);
    assert!(procs.iter().all(is_alive));
    let dir = state_dir(&prefix).display().to_string();
    assert_eq!(
        processes_naming(&dir).len(),
        4,
        "{:?}",
        processes_naming(&dir)
    );

    // As after a crash: the state file is gone, so nothing tells `down` what was started.
    std::fs::remove_file(LabState::path(&prefix)).unwrap();
    let down = tern(&["lab", "down", "--force"], &prefix);
    assert!(down.status.success(), "{}", text(&down));
    assert_gone(&prefix, &procs);
    drop(lab);
}

#[test]
fn a_failed_start_tears_everything_down_again() {
    require_root();
    let prefix = unique_prefix();
    let lab = Lab(prefix.clone());
    // c2's daemon cannot create its state directory: a file is in the way. By then the control
    // server and c1's daemon are running.
    std::fs::create_dir_all(state_dir(&prefix)).unwrap();
    std::fs::write(state_dir(&prefix).join("c2"), "in the way").unwrap();

    let up = tern(&["lab", "up"], &prefix);
    assert!(!up.status.success(), "{}", text(&up));
    let out = text(&up);
    assert!(out.contains("torn down again"), "{out}");
    assert!(out.contains("tern:c2 exited"), "{out}");
    assert!(
        out.contains("state directory"),
        "the daemon's log is quoted: {out}"
    );
    assert_gone(&prefix, &[]);
    drop(lab);
}
