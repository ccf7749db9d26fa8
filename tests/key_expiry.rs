//! Node-key expiry end to end, with the lab control server giving keys a short life
//! (`node_key_expiry_secs`) and allowing interactive logins. `ta` (c1) logs in with a pre-auth
//! key, `tb` (c2) by URL. Both show their key expiry. When `ta`'s key expires it renews it by
//! itself (its pre-auth key logs in again) and keeps talking. When `tb`'s expires, `tb` needs a
//! person: it shows `NeedsLogin` with a new URL, and `ta` stops using it (status `expired`, no
//! traffic). Once the URL is approved, `tb` is back with a new key and traffic flows again.
//! Everything runs inside lab namespaces with no route out.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::time::{Duration, Instant};

use lab_nodes::{control_config, curl, ping_once, start_derp, wait, Node};
use lab_server::LabServer;
use support::require_root;
use tern_lab::topology::CONTROL_IP;
use tern_lab::{NatMode, Netns, Topology};

/// How long node keys live in this lab.
const KEY_LIFE_SECS: u64 = 12;

fn approve(ns: &Netns, url: &str) {
    let body = curl(ns, "POST", url).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&body).contains("approved"),
        "approve {url}"
    );
}

/// Starts `tern up` for `node` without an auth key in the background, approves the URL it
/// gets, and waits until the node is Running.
fn interactive_up(node: &Node, ns: &Netns, url: &str, hostname: &str) {
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--socket")
        .arg(&node.socket)
        .args(["up", "--login-server", url, "--hostname", hostname])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tern up");
    let auth_url = wait(
        "a login URL",
        30,
        || node.logs(),
        || node.status()["auth_url"].as_str().map(str::to_string),
    );
    approve(ns, &auth_url);
    let done = wait(
        "tern up to finish",
        30,
        || node.logs(),
        || up.try_wait().ok().flatten(),
    );
    assert!(done.success(), "tern up after approval");
}

fn node_key(node: &Node) -> String {
    node.status()["self"]["node_key"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn expired_keys_are_renewed_by_login_and_not_used_meanwhile() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let _derp = start_derp(&topo);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = control_config(dir.path());
    config.interactive_login = true;
    config.node_key_expiry_secs = Some(KEY_LIFE_SECS);
    let server_ns = topo.ns("server").expect("server").name().to_string();
    let _control = LabServer::start(config, Some(&server_ns));
    let (c1, c2) = (topo.ns("c1").expect("c1"), topo.ns("c2").expect("c2"));
    let control_url = format!("http://{CONTROL_IP}:8080");

    let a = Node::start(c1, dir.path(), "ta");
    a.wait_for_api(20);
    a.up("ta");
    let b = Node::start(c2, dir.path(), "tb");
    b.wait_for_api(20);
    interactive_up(&b, c2, &control_url, "tb");
    let report = || format!("{}\n{}", a.logs(), b.logs());
    let peer = wait("ta to see tb", 60, report, || a.peer("tb"));
    let b_ip = peer["tailnet_ips"][0]
        .as_str()
        .expect("tb's IP")
        .to_string();
    assert!(
        peer["key_expiry"].is_string(),
        "ta sees tb's key expiry: {peer:#}"
    );
    assert!(a.status()["self"]["key_expiry"].is_string());
    wait("ta → tb traffic", 30, report, || {
        ping_once(c1, &b_ip).then_some(())
    });
    let (a_key, b_key) = (node_key(&a), node_key(&b));

    // ta's key expires first (it registered first): renewed with its pre-auth key.
    wait("ta's key to be renewed", KEY_LIFE_SECS + 30, report, || {
        let key = node_key(&a);
        (!key.is_empty() && key != a_key && a.status()["backend_state"] == "Running").then_some(())
    });

    // tb's key expires: tb needs a login, and ta stops using it.
    let second_url = wait("tb to ask for a login", KEY_LIFE_SECS + 30, report, || {
        let s = b.status();
        (s["backend_state"] == "NeedsLogin")
            .then(|| s["auth_url"].as_str().map(str::to_string))
            .flatten()
    });
    wait("ta to mark tb expired", 20, report, || {
        a.peer_entry("tb")
            .filter(|p| p["expired"] == true)
            .map(drop)
    });
    let quiet_since = Instant::now();
    assert!(
        !ping_once(c1, &b_ip),
        "ta must not reach tb while tb's key is expired\n{}",
        report()
    );
    assert!(quiet_since.elapsed() < Duration::from_secs(10));

    // Approved: tb registers a new key, ta uses tb again.
    approve(c2, &second_url);
    wait("tb Running with a new key", 30, report, || {
        let key = node_key(&b);
        (b.status()["backend_state"] == "Running" && !key.is_empty() && key != b_key).then_some(())
    });
    wait("ta → tb traffic again", 60, report, || {
        let fresh = a.peer_entry("tb").is_some_and(|p| p["expired"] == false);
        (fresh && ping_once(c1, &b_ip)).then_some(())
    });
    assert!(
        ping_once(c1, &b_ip),
        "tb reachable with its renewed key\n{}",
        report()
    );
}
