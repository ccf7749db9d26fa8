//! `tern lab up/status/down` as a person runs it: up then down leaves the host as it was, `down
//! --force` cleans up after a crash, and bad input gets a clear error.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Output};

use support::output_text as text;
use support::require_root;
use tern_lab::topology::{namespaces_with_prefix, unique_prefix};

fn tern(prefix: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("lab")
        .args(args)
        .env("TERN_LAB_PREFIX", prefix)
        .output()
        .expect("run tern")
}

fn host(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run host tool");
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_set() -> BTreeSet<String> {
    host(&["ip", "netns", "list"])
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn lab_up_then_down_leaves_the_host_as_it_was() {
    require_root();
    let prefix = unique_prefix();
    let (ns_before, nft_before, links_before) = (
        netns_set(),
        host(&["nft", "list", "tables"]),
        host(&["ip", "-br", "link"]),
    );

    let up = tern(&prefix, &["up", "--nat1", "hard", "--nat2", "fw"]);
    assert!(up.status.success(), "{}", text(&up));
    assert_eq!(namespaces_with_prefix(&prefix).unwrap().len(), 7);

    let status = tern(&prefix, &["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(json["running"], true);
    assert_eq!(json["prefix"], prefix.as_str());
    let nodes = json["nodes"].as_array().expect("nodes");
    let names: BTreeSet<&str> = nodes.iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(
        names,
        ["c1", "c2", "nat1", "nat2", "relay", "rtr", "server"]
            .into_iter()
            .collect()
    );
    let c1 = nodes.iter().find(|n| n["name"] == "c1").unwrap();
    assert_eq!(c1["netns"], format!("{prefix}-c1").as_str());
    let c1_addrs: Vec<&str> = c1["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| {
            i["addrs"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|a| a.as_str())
        })
        .collect();
    assert!(c1_addrs.contains(&"10.1.0.2/24"), "{c1}");
    assert_eq!(json["nat_boxes"][0]["mode"], "hard");
    assert_eq!(json["nat_boxes"][1]["mode"], "fw");
    assert!(json["processes"].as_array().is_some() && json["services"].as_array().is_some());

    // The lab really is there: c1 reaches the server through its NAT box.
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{prefix}-c1"),
            "ping",
            "-c1",
            "-W2",
            "198.18.0.20",
        ])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{}", text(&ping));

    // The long-lived lab's NAT mode can be switched at run time (recorded in the state).
    tern_lab::state::set_nat_mode(&prefix, "nat2", tern_lab::NatMode::Hard).unwrap();
    let nft = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{prefix}-nat2"),
            "nft",
            "list",
            "ruleset",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nft.stdout).contains("fully-random"),
        "{}",
        text(&nft)
    );
    let status = tern(&prefix, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(json["nat_boxes"][1]["mode"], "hard");

    // A second `up` (or bare `tern lab`) with the same prefix is a clear error.
    let again = tern(&prefix, &[]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"), "{}", text(&again));

    let down = tern(&prefix, &["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(namespaces_with_prefix(&prefix).unwrap().is_empty());
    assert!(!tern_lab::state::state_dir(&prefix).exists());
    // Other tests may add or remove their own namespaces meanwhile; ours are gone and we removed
    // nothing that existed before.
    let ns_after = netns_set();
    assert!(ns_after
        .iter()
        .all(|n| !n.starts_with(&format!("{prefix}-"))));
    let ours_before: BTreeSet<_> = ns_before.iter().filter(|n| !n.starts_with("tl")).collect();
    let ours_after: BTreeSet<_> = ns_after.iter().filter(|n| !n.starts_with("tl")).collect();
    assert_eq!(
        ours_before, ours_after,
        "namespaces outside the lab changed"
    );
    assert_eq!(host(&["nft", "list", "tables"]), nft_before);
    assert_eq!(host(&["ip", "-br", "link"]), links_before);

    let status = tern(&prefix, &["status"]);
    assert!(!status.status.success());
    assert!(text(&status).contains("not running"), "{}", text(&status));
}

#[test]
fn down_force_cleans_up_after_a_crash() {
    require_root();
    let prefix = unique_prefix();
    let bare = tern(&prefix, &[]);
    assert!(bare.status.success(), "{}", text(&bare));
    assert!(
        text(&bare).contains(&format!("{prefix}-c1")),
        "bare `tern lab` prints status: {}",
        text(&bare)
    );
    // Something running inside, and the state file lost as in a crash.
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-c2"), "sleep", "600"])
        .spawn()
        .unwrap();
    std::fs::remove_dir_all(tern_lab::state::state_dir(&prefix)).unwrap();

    let status = tern(&prefix, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(json["running"], true);
    assert_eq!(json["unknown_netns"].as_array().map(Vec::len), Some(7));

    let down = tern(&prefix, &["down"]);
    assert!(!down.status.success());
    assert!(text(&down).contains("--force"), "{}", text(&down));
    assert_eq!(namespaces_with_prefix(&prefix).unwrap().len(), 7);

    let forced = tern(&prefix, &["down", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert!(namespaces_with_prefix(&prefix).unwrap().is_empty());
    let waited = sleeper.wait().unwrap();
    assert!(!waited.success(), "the process inside was killed");
}

#[test]
fn bad_input_gets_a_clear_error() {
    require_root();
    let prefix = unique_prefix();
    let bad_mode = tern(&prefix, &["up", "--nat1", "symmetric"]);
    assert!(!bad_mode.status.success());
    assert!(
        text(&bad_mode).contains("unknown NAT mode `symmetric`"),
        "{}",
        text(&bad_mode)
    );
    let bad_attr = tern(&prefix, &["up", "--node-attr", "x\"]\nlisten=1"]);
    assert!(!bad_attr.status.success());
    assert!(
        text(&bad_attr).contains("is not [HOST=]NAME"),
        "{}",
        text(&bad_attr)
    );

    let no_tools = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["lab", "up"])
        .env("TERN_LAB_PREFIX", &prefix)
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!no_tools.status.success());
    assert!(
        text(&no_tools).contains("`ip` not found"),
        "{}",
        text(&no_tools)
    );
    assert!(
        text(&no_tools).contains("apt-get install -y iproute2"),
        "{}",
        text(&no_tools)
    );

    let not_root = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tern"))
        .args(["lab", "up"])
        .env("TERN_LAB_PREFIX", &prefix)
        .output()
        .unwrap();
    assert!(!not_root.status.success());
    assert!(
        text(&not_root).contains("needs root"),
        "{}",
        text(&not_root)
    );
    assert!(namespaces_with_prefix(&prefix).unwrap().is_empty());
}

/// Takes the lab down when the test ends, passed or not.
struct LabDown<'a>(&'a str);

impl Drop for LabDown<'_> {
    fn drop(&mut self) {
        let _ = tern(self.0, &["down", "--force"]);
    }
}

/// `tern lab up --synthetic-peers 40`: c1's netmap has the 40 made-up nodes besides c2, each
/// with its name and a tailnet address of its own; too many is refused with the bound.
#[test]
fn synthetic_peers_join_every_nodes_netmap() {
    require_root();
    let too_many = tern(&unique_prefix(), &["up", "--synthetic-peers", "5001"]);
    assert!(!too_many.status.success());
    assert!(text(&too_many).contains("0..=5000"), "{}", text(&too_many));

    let prefix = unique_prefix();
    let _down = LabDown(&prefix);
    let up = tern(&prefix, &["up", "--synthetic-peers", "40"]);
    assert!(up.status.success(), "{}", text(&up));
    let socket = format!("/run/tern-lab/{prefix}/c1.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let peers = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["--socket", &socket, "status", "--json"])
            .output()
            .expect("tern status");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let peers = status["peers"].as_array().cloned().unwrap_or_default();
        if peers.len() == 41 || std::time::Instant::now() > deadline {
            break peers;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert_eq!(peers.len(), 41, "c1's peers: {peers:?}");
    let names: BTreeSet<&str> = peers
        .iter()
        .filter_map(|p| p["hostname"].as_str())
        .collect();
    assert!(
        names.contains("c2") && names.contains("synthetic-0") && names.contains("synthetic-39"),
        "{names:?}"
    );
    let ips: BTreeSet<&str> = peers
        .iter()
        .filter_map(|p| p["tailnet_ips"][0].as_str())
        .collect();
    assert_eq!(
        ips.len(),
        41,
        "every peer has an address of its own: {ips:?}"
    );
}
