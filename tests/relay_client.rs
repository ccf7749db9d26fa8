//! tern as a peer relay *client* (issue 11), in labs made by `tern lab up --relay`: a tern node
//! named `relay` on the public `server` host runs the relay server (udp/40000), and the lab's
//! control grants every node `cap/relay` (so each client gets `relay-target` on the others).
//!
//! * tern ↔ tern behind hard NATs: both sides on `peer-relay`, 1 MiB over HTTP through the
//!   TUNs byte for byte with DERP's TCP port blocked, the relay counting it, `tern ping` saying
//!   `via peer-relay(ip:port:vni:N)` with exit code 3.
//! * Interop: tern ↔ Caddy/tsnet (tailscale.com v1.90.9) through the tern relay, HTTP both ways
//!   with DERP blocked.
//! * Failover: the relay daemon killed during a transfer → DERP, transfer intact; restarted →
//!   `peer-relay` again by itself.
//! * easy × easy with a relay available: direct.
//! * Control's `disable-relay-client` node attribute: hard × hard stays on DERP, and says why,
//!   also when a tsnet peer allocates and sends the node a CallMeMaybeVia;
//!   `disable-relay-server`: the relay node runs no server despite its pref, and says why.
//!
//! Every lab is torn down (with every process in it) even when a test panics.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lab_nodes::serve_http;
use serde_json::Value;
use support::lab_cli::LabCli as Lab;
use support::{output_text, tail, wait, wait_for};
use tern_lab::state::state_dir;
use tern_lab::{CaddyConfig, CaddyNode, Netns, Process};

/// Where the lab's relay server is reached (the `server` host's public address).
const RELAY_ENDPOINT: &str = "198.18.0.20:40000";
const CONTROL_URL: &str = "http://10.99.0.20:8080";

fn blob() -> &'static [u8] {
    static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
    BLOB.get_or_init(|| (0..1u32 << 20).map(|i| (i % 251) as u8).collect())
}

/// `tern --socket <lab node's socket> ARGS`.
fn tern(lab: &Lab, node: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--socket")
        .arg(lab.socket(node))
        .args(args)
        .output()
        .expect("run tern")
}

fn status(lab: &Lab, node: &str) -> Value {
    serde_json::from_slice(&tern(lab, node, &["status", "--json"]).stdout).unwrap_or_default()
}

fn peer(lab: &Lab, node: &str, hostname: &str) -> Option<Value> {
    status(lab, node)["peers"]
        .as_array()?
        .iter()
        .find(|p| p["hostname"] == hostname)
        .cloned()
}

fn tailnet_ip(lab: &Lab, node: &str) -> String {
    status(lab, node)["self"]["tailnet_ips"][0]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{node}'s tailnet IP"))
}

/// `tern metrics` of a lab node, checked by promtool.
fn metrics(lab: &Lab, node: &str) -> String {
    let out = tern(lab, node, &["metrics"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    support::promtool_check(&text).unwrap_or_else(|e| panic!("{node}'s metrics: {e}\n{text}"));
    text
}

/// The value of `tern_peer_path` for the peer named `host.…` and `path`.
fn path_gauge(text: &str, host: &str, path: &str) -> Option<f64> {
    let prefix = format!("tern_peer_path{{peer=\"{host}.");
    let suffix = format!("path=\"{path}\"}}");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            series.ends_with(&suffix).then(|| value.parse().ok())?
        })
}

/// Path changes to `path` counted in `tern_path_changes_total`, all reasons.
fn changes_to(text: &str, path: &str) -> f64 {
    let prefix = format!("tern_path_changes_total{{path=\"{path}\",");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn on_relay(p: &Value) -> bool {
    p["path"] == "peer-relay" && p["endpoint"] == RELAY_ENDPOINT
}

/// The relay server's forwarded byte count.
fn forwarded(lab: &Lab) -> u64 {
    status(lab, "relay")["relay_server"]["forwarded_bytes"]
        .as_u64()
        .unwrap_or(0)
}

fn log_of(lab: &Lab, name: &str) -> String {
    let path = state_dir(&lab.0).join(format!("{name}.log"));
    tail(&std::fs::read_to_string(path).unwrap_or_default(), 40)
}

fn report(lab: &Lab) -> String {
    let mut out = String::new();
    for node in ["c1", "c2", "relay"] {
        out += &format!(
            "== {node} status\n{}\n== {node} log\n{}\n",
            output_text(&tern(lab, node, &["status"])),
            log_of(lab, &format!("tern-{node}"))
        );
    }
    out
}

/// Drops TCP to the DERP server's port on the DERP host while alive.
struct DerpBlocked<'a>(&'a Lab);

impl<'a> DerpBlocked<'a> {
    fn new(lab: &'a Lab) -> Self {
        lab.ns("relay")
            .nft_apply(
                "table inet blockderp {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    tcp dport 443 drop\n  }\n}\n",
            )
            .expect("nft in the DERP host");
        DerpBlocked(lab)
    }
}

impl Drop for DerpBlocked<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .ns("relay")
            .nft_apply("delete table inet blockderp\n");
    }
}

/// `curl` `url` from `ns`; Ok when the body is exactly `want`.
fn fetch(ns: &Netns, url: &str, want: &[u8], extra: &[&str]) -> Result<(), String> {
    let mut args = vec!["curl", "-sS", "--max-time", "60"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = ns.exec_unchecked(&args).map_err(|e| e.to_string())?;
    if out.status.success() && out.stdout == want {
        Ok(())
    } else {
        Err(format!(
            "curl {url}: got {} of {} bytes: {}",
            out.stdout.len(),
            want.len(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Continuous pings (5 a second): the outgoing traffic that makes a node look for paths.
fn background_ping(ns: &Netns, ip: &str) -> Process {
    Process::spawn(ns, "ping", "ping", &["-i", "0.2", "-W", "1", ip]).expect("start ping")
}

fn hard_lab_on_relay() -> (Lab, String, String, Process) {
    let lab = Lab::up(&["--nat1", "hard", "--nat2", "hard", "--relay"]);
    let (c1_ip, c2_ip) = (tailnet_ip(&lab, "c1"), tailnet_ip(&lab, "c2"));
    let ping = background_ping(&lab.ns("c1"), &c2_ip);
    for (node, other) in [("c1", "c2"), ("c2", "c1")] {
        wait(
            &format!("{node}'s path to {other} to be the peer relay"),
            30,
            || report(&lab),
            || peer(&lab, node, other).filter(on_relay),
        );
    }
    (lab, c1_ip, c2_ip, ping)
}

#[test]
fn tern_nodes_behind_hard_nats_talk_through_a_tern_relay() {
    let (lab, _c1_ip, c2_ip, _ping) = hard_lab_on_relay();
    let p = peer(&lab, "c1", "c2").expect("c1 sees c2");
    assert!(p["relay_vni"].as_u64().is_some_and(|v| v >= 1), "{p:#}");
    assert_eq!(p["relay_node"], "relay", "{p:#}");
    assert_eq!(p["path_reason"], "peer-relay", "{p:#}");
    assert!(p["relay_reason"].is_null(), "{p:#}");
    let history: Vec<&str> = p["path_history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["path"].as_str()).collect())
        .unwrap_or_default();
    assert!(history.contains(&"peer-relay"), "{history:?}");
    assert!(
        !history.contains(&"direct"),
        "hard × hard never goes direct"
    );

    // 1 MiB c2 → c1 through the TUNs with DERP's port blocked at the DERP host: the relay is
    // the only way, and it counts the bytes.
    let before = forwarded(&lab);
    let addr = SocketAddr::new(c2_ip.parse().expect("tailnet IP"), 8000);
    let (stop, server) = serve_http(&lab.ns("c2"), addr, blob());
    let got = {
        let _blocked = DerpBlocked::new(&lab);
        fetch(&lab.ns("c1"), &format!("http://{addr}/"), blob(), &[])
    };
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    if let Err(e) = got {
        panic!(
            "1 MiB through the relay with DERP blocked: {e}\n{}",
            report(&lab)
        );
    }
    wait(
        "the relay to count the download",
        10,
        || report(&lab),
        || (forwarded(&lab) >= before + blob().len() as u64).then_some(()),
    );

    // `tern ping` says where the pong came from, like Go, and exits 3 (not direct).
    let out = tern(&lab, "c1", &["ping", "-c", "2", "c2"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains(&format!("via peer-relay({RELAY_ENDPOINT}:vni:")),
        "{text}"
    );
    let human = output_text(&tern(&lab, "c1", &["status"]));
    assert!(
        human.contains(&format!("peer-relay {RELAY_ENDPOINT} vni "))
            && human.contains("(relay relay)"),
        "{human}"
    );
    // A relay behind a port forward also offers what the operator says (pushed live).
    let out = tern(
        &lab,
        "relay",
        &["set", "--relay-server-static-endpoints=198.18.0.20:40001"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    wait(
        "the relay to offer its static endpoint",
        10,
        || report(&lab),
        || {
            let relay = status(&lab, "relay")["relay_server"].clone();
            let offers = relay["addr_ports"].as_array()?.clone();
            (relay["static_endpoints"] == serde_json::json!(["198.18.0.20:40001"])
                && offers.contains(&Value::from("198.18.0.20:40001"))
                && offers.contains(&Value::from(RELAY_ENDPOINT)))
            .then_some(())
        },
    );
    let human = output_text(&tern(&lab, "relay", &["status"]));
    assert!(human.contains("(static: 198.18.0.20:40001)"), "{human}");
    // The relay's own view: one open session between the two NATs' addresses.
    let relay = status(&lab, "relay")["relay_server"].clone();
    assert!(
        relay["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["state"] == "open")),
        "{relay:#}"
    );
    // Metrics (promtool-clean) say the same: c1's gauge for c2 on the relay, the relay
    // server's forwarded counters with tailscaled's names and labels, an open endpoint.
    let c1_metrics = metrics(&lab, "c1");
    assert_eq!(
        path_gauge(&c1_metrics, "c2", "peer-relay"),
        Some(1.0),
        "{c1_metrics}"
    );
    assert_eq!(path_gauge(&c1_metrics, "c2", "direct"), Some(0.0));
    assert!(
        c1_metrics.lines().any(|l| l
            .starts_with("tailscaled_outbound_packets_total{path=\"peer_relay_ipv4\"}")
            && !l.ends_with(" 0")),
        "{c1_metrics}"
    );
    let relay_metrics = metrics(&lab, "relay");
    let forwarded_line = relay_metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "tailscaled_peer_relay_forwarded_bytes_total{transport_in=\"udp4\",transport_out=\"udp4\"}",
            )
        })
        .unwrap_or_default();
    let forwarded_metric: u64 = forwarded_line
        .rsplit_once(' ')
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    assert!(
        forwarded_metric >= blob().len() as u64,
        "{forwarded_line}\n{relay_metrics}"
    );
    assert!(relay_metrics.contains("\ntailscaled_peer_relay_endpoints{state=\"open\"} 1\n"));

    // The NATs become easy: the direct probing that goes on under a relay path finds a direct
    // path, and direct wins.
    for nat in ["nat1", "nat2"] {
        let out = lab.tern(&["lab", "nat", nat, "easy"]);
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let started = Instant::now();
    wait(
        "c1's path to c2 to turn direct",
        60,
        || report(&lab),
        || peer(&lab, "c1", "c2").filter(|p| p["path"] == "direct"),
    );
    eprintln!(
        "relay → direct {:?} after both NATs turned easy",
        started.elapsed()
    );
    // The NAT change shows in the per-peer path gauge and the path-change counter.
    let after = metrics(&lab, "c1");
    assert_eq!(path_gauge(&after, "c2", "direct"), Some(1.0), "{after}");
    assert_eq!(path_gauge(&after, "c2", "peer-relay"), Some(0.0), "{after}");
    assert!(
        after
            .lines()
            .any(|l| l.starts_with("tern_path_changes_total{path=\"direct\",reason=\"direct\"}")),
        "{after}"
    );
}

/// The relay daemon's command line, as `tern lab up --relay` started it.
fn relay_daemon_args(lab: &Lab) -> (PathBuf, PathBuf) {
    let dir = state_dir(&lab.0);
    (dir.join("relay.sock"), dir.join("relay"))
}

fn kill_relay_daemon(lab: &Lab) {
    // Its PID from the lab's state (no procps needed on a fresh Debian).
    let state: Value =
        serde_json::from_slice(&lab.tern(&["lab", "status", "--json"]).stdout).unwrap_or_default();
    let pid = state["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "tern:relay"))
        .and_then(|p| p["pid"].as_i64())
        .unwrap_or_else(|| panic!("no relay daemon in the lab state: {state:#}"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a PID"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the relay daemon");
}

#[test]
fn a_dead_relay_falls_back_to_derp_and_a_restarted_one_is_used_again() {
    let (lab, _c1_ip, c2_ip, _ping) = hard_lab_on_relay();
    // A 2 MiB download at 256 KiB/s (8 s) runs while the relay dies.
    let big: &'static [u8] = Box::leak([blob(), blob()].concat().into_boxed_slice());
    let addr = SocketAddr::new(c2_ip.parse().expect("tailnet IP"), 8001);
    let (stop, server) = serve_http(&lab.ns("c2"), addr, big);
    let c1 = lab.ns("c1");
    let url = format!("http://{addr}/");
    let download = std::thread::spawn(move || fetch(&c1, &url, big, &["--limit-rate", "256k"]));
    std::thread::sleep(Duration::from_secs(2));
    let before_kill = metrics(&lab, "c1");
    let killed = Instant::now();
    kill_relay_daemon(&lab);
    let on_derp = wait_for(
        "c1's path to c2 to leave the dead relay",
        Duration::from_secs(6),
        || report(&lab),
        || {
            let p = peer(&lab, "c1", "c2")?;
            (p["path"] == "derp").then(|| killed.elapsed())
        },
    );
    let p = peer(&lab, "c1", "c2").unwrap_or_default();
    // A DERP peer in the metrics (promtool-clean): the gauge moved off the relay.
    let on_derp_metrics = metrics(&lab, "c1");
    assert_eq!(
        path_gauge(&on_derp_metrics, "c2", "derp"),
        Some(1.0),
        "{on_derp_metrics}"
    );
    assert!(
        changes_to(&on_derp_metrics, "derp") > changes_to(&before_kill, "derp"),
        "a change to DERP counted:\n{on_derp_metrics}"
    );
    let got = download.join().expect("download thread");
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    if let Err(e) = got {
        panic!(
            "the download across the relay's death: {e}\n{}",
            report(&lab)
        );
    }
    let history: Vec<&str> = p["path_history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["reason"].as_str()).collect())
        .unwrap_or_default();
    assert!(history.contains(&"peer-relay"), "{p:#}");

    // The relay comes back (same state: same node, the relay pref kept): c1 moves back.
    let (socket, state) = relay_daemon_args(&lab);
    let (socket, state) = (socket.display().to_string(), state.display().to_string());
    let restarted = Instant::now();
    let _relay = Process::spawn(
        &lab.ns("server"),
        "tern:relay-again",
        env!("CARGO_BIN_EXE_tern"),
        &[
            "--socket",
            &socket,
            "daemon",
            "--state-dir",
            &state,
            "--tun",
            "tern0",
        ],
    )
    .expect("restart the relay daemon");
    let back = wait(
        "c1's path to c2 to be the restarted relay",
        75,
        || report(&lab),
        || {
            peer(&lab, "c1", "c2")
                .filter(on_relay)
                .map(|_| restarted.elapsed())
        },
    );
    eprintln!(
        "relay failover: on DERP {on_derp:?} after the kill; back on the relay {back:?} after the restart"
    );
}

/// The first tailnet address of `other` once `node` sees it (a tsnet node takes a while).
fn wait_for_peer_ip(lab: &Lab, node: &str, other: &str, logs: impl Fn() -> String) -> String {
    wait(&format!("{node} to see {other}"), 90, logs, || {
        peer(lab, node, other)?["tailnet_ips"][0]
            .as_str()
            .map(str::to_string)
    })
}

/// The Caddy/tsnet node `tsb` serving [`blob`] at `/blob` (the site directory goes with the
/// returned guard).
fn tsb_serving_blob(lab: &Lab) -> (tempfile::TempDir, CaddyConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).expect("site dir");
    std::fs::write(site.join("blob"), blob()).expect("blob");
    let mut config = CaddyConfig::new("tsb", CONTROL_URL, &lab.auth_key());
    config.site_body = format!("root * {}\nfile_server", site.display());
    (dir, config)
}

/// A hard × hard lab with the relay node and `--node-attr attr`.
fn hard_relay_lab_with(attr: &str) -> Lab {
    Lab::up(&[
        "--nat1",
        "hard",
        "--nat2",
        "hard",
        "--relay",
        "--node-attr",
        attr,
    ])
}

/// [`hard_relay_lab_with`], and c1 pinging c2.
fn hard_lab_with_node_attr(attr: &str) -> (Lab, Process) {
    let lab = hard_relay_lab_with(attr);
    let c2_ip = tailnet_ip(&lab, "c2");
    let ping = background_ping(&lab.ns("c1"), &c2_ip);
    (lab, ping)
}

/// `node`'s path to `other` stays off the relay for `secs` seconds.
fn never_on_relay(lab: &Lab, node: &str, other: &str, secs: u64, logs: impl Fn() -> String) {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        let p = peer(lab, node, other).unwrap_or_default();
        assert!(!on_relay(&p), "{p:#}\n{}", logs());
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Control's `disable-relay-client` node attribute (here on every node, `--node-attr`): the
/// clients neither allocate on the relay nor take a CallMeMaybeVia, so hard × hard stays on DERP
/// (the same lab without it is on the relay within seconds, above), and status says why.
#[test]
fn disable_relay_client_keeps_hard_nats_on_derp_and_says_why() {
    let (lab, _ping) = hard_lab_with_node_attr("disable-relay-client");
    for (node, other) in [("c1", "c2"), ("c2", "c1")] {
        wait(
            &format!("{node} to say why {other} is not on the relay"),
            30,
            || report(&lab),
            || {
                peer(&lab, node, other)
                    .filter(|p| p["path"] == "derp" && p["relay_reason"] == "relay-client-disabled")
            },
        );
    }
    never_on_relay(&lab, "c1", "c2", 12, || report(&lab));
    let p = peer(&lab, "c1", "c2").unwrap_or_default();
    assert_eq!(p["path"], "derp", "{p:#}\n{}", report(&lab));
    // The relay server runs (the attribute is about the client) and was asked nothing.
    let relay = status(&lab, "relay")["relay_server"].clone();
    assert!(relay["port"].as_u64().is_some(), "{relay:#}");
    assert_eq!(relay["allocations"], 0, "{relay:#}\n{}", report(&lab));
    assert_eq!(forwarded(&lab), 0, "{}", report(&lab));
}

/// Control's `disable-relay-server` node attribute on every node: the relay node keeps its
/// `--relay-server-port` pref but runs no server (its port is not bound) and says why; the
/// clients find no relay to use.
#[test]
fn disable_relay_server_keeps_the_relay_off_and_says_why() {
    let (lab, _ping) = hard_lab_with_node_attr("disable-relay-server");
    let off = wait(
        "the relay node to say its server is off",
        30,
        || report(&lab),
        || {
            let s = status(&lab, "relay");
            let why = s["relay_server_off"].as_str()?.to_string();
            s["relay_server"].is_null().then_some(why)
        },
    );
    assert!(off.contains("disable-relay-server"), "{off}");
    let human = output_text(&tern(&lab, "relay", &["status"]));
    assert!(
        human.contains("# Relay server: off: control set"),
        "{human}"
    );
    let sockets = lab.ns("relay").exec(&["ss", "-Huln"]).expect("ss");
    let sockets = String::from_utf8_lossy(&sockets.stdout).to_string();
    assert!(
        !sockets.contains(":40000 "),
        "udp/40000 still bound:\n{sockets}"
    );
    never_on_relay(&lab, "c1", "c2", 12, || report(&lab));
}

/// The other half of `disable-relay-client`, against Tailscale's own client: only c1 has the
/// attribute; tsb (Caddy/tsnet) behind the other hard NAT allocates on the relay for the two of
/// them and sends c1 a CallMeMaybeVia, which c1 ignores; so no relay path forms, c1 says why,
/// and traffic keeps flowing over DERP.
#[test]
fn a_node_with_disable_relay_client_ignores_a_tsnet_peers_call_me_maybe_via() {
    let lab = hard_relay_lab_with("c1=disable-relay-client");
    let config = CaddyConfig::new("tsb", CONTROL_URL, &lab.auth_key());
    let tsb = CaddyNode::start(&lab.ns("c2"), config).expect("start tsb");
    let logs = || format!("{}\n== tsb\n{}", report(&lab), tail(&tsb.logs(), 80));
    let tsb_ip = wait_for_peer_ip(&lab, "c1", "tsb", logs);
    let _ping = background_ping(&lab.ns("c1"), &tsb_ip);
    wait("tsb to allocate on the relay", 60, logs, || {
        let allocations = status(&lab, "relay")["relay_server"]["allocations"].as_u64()?;
        (allocations > 0).then_some(())
    });
    let tsb_key = peer(&lab, "c1", "tsb").unwrap_or_default()["node_key"]
        .as_str()
        .map(str::to_string)
        .expect("tsb's node key");
    wait("c1 to ignore tsb's CallMeMaybeVia", 30, logs, || {
        log_of(&lab, "tern-c1")
            .lines()
            .any(|l| l.contains("call-me-maybe-via ignored") && l.contains(&tsb_key))
            .then_some(())
    });
    never_on_relay(&lab, "c1", "tsb", 10, logs);
    let p = peer(&lab, "c1", "tsb").unwrap_or_default();
    assert_eq!(p["path"], "derp", "{p:#}");
    assert_eq!(p["relay_reason"], "relay-client-disabled", "{p:#}");
    // c2 (tern, without the attribute) may still use relays: its reason is not this one.
    let c2 = peer(&lab, "c2", "c1").unwrap_or_default();
    assert_ne!(c2["relay_reason"], "relay-client-disabled", "{c2:#}");
    let out = lab
        .ns("c1")
        .exec_unchecked(&["ping", "-c", "3", "-W", "2", &tsb_ip]);
    assert!(out.is_ok_and(|o| o.status.success()), "{}", logs());
}

#[test]
fn easy_nats_stay_direct_with_a_relay_available() {
    let lab = Lab::up(&["--relay"]);
    let c2_ip = tailnet_ip(&lab, "c2");
    let _ping = background_ping(&lab.ns("c1"), &c2_ip);
    wait(
        "c1's path to c2 to be direct",
        15,
        || report(&lab),
        || peer(&lab, "c1", "c2").filter(|p| p["path"] == "direct"),
    );
    // Relay discovery may run alongside (as in Go) but never beats a trusted direct path.
    std::thread::sleep(Duration::from_secs(5));
    let p = peer(&lab, "c1", "c2").unwrap_or_default();
    assert_eq!(p["path"], "direct", "{p:#}\n{}", report(&lab));
}

#[test]
fn tern_and_tsnet_behind_hard_nats_talk_through_a_tern_relay() {
    let lab = Lab::up(&["--nat1", "hard", "--nat2", "hard", "--relay"]);
    let c1_ip = tailnet_ip(&lab, "c1");
    // tsb in c2 serves the blob on the tailnet, and proxies its loopback :8081 to c1's tailnet
    // address (tsnet → tern).
    let (_site, mut config) = tsb_serving_blob(&lab);
    config.debug = true;
    config.extra_sites = format!(
        "http://127.0.0.1:8081 {{\n\treverse_proxy {{\n\t\tto http://{c1_ip}:8000\n\t\ttransport tailscale tsb\n\t}}\n}}\n"
    );
    let tsb = CaddyNode::start(&lab.ns("c2"), config).expect("start tsb");
    let logs = || format!("{}\n== tsb\n{}", report(&lab), tail(&tsb.logs(), 80));
    let tsb_ip = wait_for_peer_ip(&lab, "c1", "tsb", logs);
    let url = format!("http://{tsb_ip}/blob");
    wait("c1 to fetch tsb's blob (DERP)", 60, logs, || {
        fetch(&lab.ns("c1"), &url, blob(), &[]).ok()
    });
    let _ping = background_ping(&lab.ns("c1"), &tsb_ip);
    let p = wait("c1's path to tsb to be the peer relay", 60, logs, || {
        peer(&lab, "c1", "tsb").filter(on_relay)
    });
    eprintln!("tern → tsnet through the tern relay: {p:#}");

    // Both directions with DERP blocked.
    let addr = SocketAddr::new(c1_ip.parse().expect("tailnet IP"), 8000);
    let (stop, server) = serve_http(&lab.ns("c1"), addr, blob());
    let (to_tsnet, from_tsnet) = {
        let _blocked = DerpBlocked::new(&lab);
        (
            fetch(&lab.ns("c1"), &url, blob(), &[]),
            fetch(&lab.ns("c2"), "http://127.0.0.1:8081/", blob(), &[]),
        )
    };
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    if let Err(e) = to_tsnet.and(from_tsnet) {
        panic!("HTTP through the relay with DERP blocked: {e}\n{}", logs());
    }
    // The relay's view (its status refreshes every second; under load a little later).
    let open_legs = || -> Vec<String> {
        status(&lab, "relay")["relay_server"]["sessions"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter(|s| s["state"] == "open")
                    .flat_map(|s| s["legs"].as_array().cloned().unwrap_or_default())
                    .filter_map(|l| l["peer"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait("an open relay session between c1 and tsb", 15, logs, || {
        let legs = open_legs();
        (legs.iter().any(|p| p == "c1") && legs.iter().any(|p| p == "tsb")).then_some(())
    });
}

/// Control's `only-tcp-443` on c1 (Go `SetOnlyTCP443`): c1 sends no UDP at all, so even easy ×
/// easy stays on DERP (the same lab without it is direct within seconds, above), says why, and
/// a Go node (Caddy/tsnet) still exchanges data with c1 over DERP.
#[test]
fn only_tcp_443_sends_no_udp_and_keeps_a_node_on_derp() {
    let lab = Lab::up(&["--node-attr", "c1=only-tcp-443"]);
    let c2_ip = tailnet_ip(&lab, "c2");
    let _ping = background_ping(&lab.ns("c1"), &c2_ip);
    wait(
        "c1 to say UDP is blocked towards c2",
        30,
        || report(&lab),
        || {
            peer(&lab, "c1", "c2")
                .filter(|p| p["path"] == "derp" && p["path_reason"] == "udp-blocked")
        },
    );
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        for (node, other) in [("c1", "c2"), ("c2", "c1")] {
            let p = peer(&lab, node, other).unwrap_or_default();
            assert_ne!(
                p["path"],
                "direct",
                "{node}→{other}: {p:#}\n{}",
                report(&lab)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let c1 = status(&lab, "c1");
    let held_back = c1["data_plane"]["drops"]["udp_only_tcp_443"].as_u64();
    assert!(held_back > Some(0), "{:#}", c1["data_plane"]["drops"]);

    let (_site, config) = tsb_serving_blob(&lab);
    let tsb = CaddyNode::start(&lab.ns("c2"), config).expect("start tsb");
    let logs = || format!("{}\n== tsb\n{}", report(&lab), tail(&tsb.logs(), 60));
    let tsb_ip = wait_for_peer_ip(&lab, "c1", "tsb", logs);
    let url = format!("http://{tsb_ip}/blob");
    wait("c1 to fetch tsb's blob over DERP", 60, logs, || {
        fetch(&lab.ns("c1"), &url, blob(), &[]).ok()
    });
    let p = peer(&lab, "c1", "tsb").unwrap_or_default();
    assert_eq!(p["path"], "derp", "{p:#}\n{}", logs());
}
