//! tern as a peer relay server for real Tailscale nodes: two Caddy/tsnet
//! nodes (tailscale.com v1.90.9) behind hard NATs, which cannot go direct, and a tern node on the
//! lab's public `server` host with `tern set --relay-server-port=40000`. Traffic from one tsnet
//! node to the other makes Go allocate an endpoint on tern over DERP, bind both legs and move the
//! path to the relay; with DERP blocked a 1 MiB download still arrives byte for byte. The lab is
//! torn down (with every process in it) even when the test panics.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::lab_cli::LabCli as Lab;
use support::output_text as text;
use support::{tail, wait as wait_for};
use tern_lab::{CaddyConfig, CaddyNode};

const RELAY_PORT: &str = "40000";
const CONTROL_URL: &str = "http://10.99.0.20:8080";
const BLOB_LEN: usize = 1 << 20;

/// A tern daemon with a TUN in the lab's `server` namespace (public, no NAT); killed on Drop.
struct RelayNode {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl RelayNode {
    fn start(lab: &Lab, dir: &Path) -> RelayNode {
        let (state, socket, log) = (
            dir.join("relay"),
            dir.join("relay.sock"),
            dir.join("relay.log"),
        );
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = lab
            .ns("server")
            .command(env!("CARGO_BIN_EXE_tern"))
            .arg("--socket")
            .arg(&socket)
            .args(["daemon", "--tun", "tern0", "--state-dir"])
            .arg(&state)
            .env("TERN_LOG", "info,tern::relay=debug,tern::engine=debug")
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("start the relay node's daemon");
        let node = RelayNode { child, socket, log };
        wait_for(
            "the relay node's LocalAPI",
            20,
            || node.logs(),
            || {
                std::os::unix::net::UnixStream::connect(&node.socket)
                    .ok()
                    .map(|_| ())
            },
        );
        node
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tern")
    }

    fn ok(&self, args: &[&str]) {
        let out = self.cli(args);
        assert!(out.status.success(), "tern {args:?}: {}", text(&out));
    }

    fn status(&self) -> Value {
        serde_json::from_slice(&self.cli(&["status", "--json"]).stdout).unwrap_or_default()
    }

    fn peer_ip(&self, hostname: &str) -> Option<String> {
        self.status()["peers"]
            .as_array()?
            .iter()
            .find(|p| p["hostname"] == hostname && p["online"] == true)?["tailnet_ips"][0]
            .as_str()
            .map(str::to_string)
    }

    fn logs(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for RelayNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn blob() -> Vec<u8> {
    (0..BLOB_LEN).map(|i| (i % 251) as u8).collect()
}

/// GET the blob from tsb through tsa's loopback proxy (tsa → tailnet → tsb), from c1.
fn fetch_blob(lab: &Lab) -> Result<(), String> {
    let out = lab
        .ns("c1")
        .exec_unchecked(&[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "http://127.0.0.1:8081/blob",
        ])
        .map_err(|e| e.to_string())?;
    if out.status.success() && out.stdout == blob() {
        Ok(())
    } else {
        Err(format!(
            "curl: {} of {BLOB_LEN} bytes ({}): {}",
            out.stdout.len(),
            if out.stdout.len() == BLOB_LEN {
                "corrupted"
            } else {
                "short"
            },
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The open session whose legs are bound behind nat1 and nat2, if there is one.
fn open_session(status: &Value) -> Option<Value> {
    status["relay_server"]["sessions"]
        .as_array()?
        .iter()
        .find(|s| {
            let bound: Vec<&str> = s["legs"]
                .as_array()
                .map(|legs| legs.iter().filter_map(|l| l["bound"].as_str()).collect())
                .unwrap_or_default();
            s["state"] == "open"
                && bound.iter().any(|b| b.starts_with("198.18.1.2:"))
                && bound.iter().any(|b| b.starts_with("198.18.2.2:"))
        })
        .cloned()
}

fn set_derp_blocked(lab: &Lab, blocked: bool) {
    let ruleset = if blocked {
        "table inet blockderp {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    tcp dport 443 drop\n  }\n}\n"
    } else {
        "delete table inet blockderp\n"
    };
    lab.ns("relay")
        .nft_apply(ruleset)
        .expect("nft in the DERP host");
}

#[test]
fn two_tsnet_nodes_behind_hard_nats_relay_through_tern() {
    let lab = Lab::up(&["--nat1", "hard", "--nat2", "hard"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayNode::start(&lab, dir.path());
    relay.ok(&[
        "up",
        "--login-server",
        CONTROL_URL,
        "--auth-key",
        &lab.auth_key(),
        "--hostname",
        "relay",
    ]);
    relay.ok(&["set", &format!("--relay-server-port={RELAY_PORT}")]);
    wait_for(
        "the relay server to find its address",
        30,
        || relay.logs(),
        || {
            let addrs = relay.status()["relay_server"]["addr_ports"].clone();
            addrs
                .as_array()?
                .iter()
                .any(|a| a == &Value::from(format!("198.18.0.20:{RELAY_PORT}")))
                .then_some(())
        },
    );

    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).expect("site dir");
    std::fs::write(site.join("blob"), blob()).expect("blob");
    let mut b = CaddyConfig::new("tsb", CONTROL_URL, &lab.auth_key());
    b.site_body = format!("root * {}\nfile_server", site.display());
    b.debug = true;
    let tsb = CaddyNode::start(&lab.ns("c2"), b).expect("start tsb");
    let tsb_ip = wait_for("tsb to join", 90, || tsb.logs(), || relay.peer_ip("tsb"));

    let mut a = CaddyConfig::new("tsa", CONTROL_URL, &lab.auth_key());
    a.debug = true;
    a.extra_sites = format!(
        "http://127.0.0.1:8081 {{\n\treverse_proxy {{\n\t\tto http://{tsb_ip}:80\n\t\ttransport tailscale tsa\n\t}}\n}}\n"
    );
    let tsa = CaddyNode::start(&lab.ns("c1"), a).expect("start tsa");
    let report = || {
        format!(
            "== relay status\n{:#}\n== relay log\n{}\n== tsa\n{}\n== tsb\n{}",
            relay.status()["relay_server"],
            relay.logs(),
            tail(&tsa.logs(), 60),
            tail(&tsb.logs(), 60)
        )
    };
    wait_for(
        "tsa to fetch from tsb over the tailnet (DERP)",
        90,
        report,
        || fetch_blob(&lab).ok(),
    );

    // Traffic keeps Go looking for a better path: its relay discovery allocates on tern.
    let session = wait_for(
        "an open relay session between the two NATs",
        60,
        report,
        || {
            let _ = fetch_blob(&lab);
            open_session(&relay.status())
        },
    );
    let peers: Vec<&str> = session["legs"]
        .as_array()
        .map(|legs| legs.iter().filter_map(|l| l["peer"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        {
            let mut p = peers.clone();
            p.sort();
            p
        },
        vec!["tsa", "tsb"],
        "{session:#}"
    );
    wait_for("data through the relay", 30, report, || {
        let _ = fetch_blob(&lab);
        (relay.status()["relay_server"]["forwarded_bytes"].as_u64()? > BLOB_LEN as u64)
            .then_some(())
    });

    // With DERP gone, the relay is the only path (hard × hard never goes direct): 1 MiB still
    // arrives intact, and the relay counts it. Status refreshes every second: read the counter
    // once it has settled.
    let forwarded = || {
        relay.status()["relay_server"]["forwarded_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = wait_for("the forwarded counter to settle", 10, report, || {
        let first = forwarded();
        std::thread::sleep(Duration::from_millis(1500));
        (forwarded() == first).then_some(first)
    });
    set_derp_blocked(&lab, true);
    let fetched = fetch_blob(&lab);
    set_derp_blocked(&lab, false);
    if let Err(e) = fetched {
        panic!(
            "1 MiB through the relay with DERP blocked: {e}\n{}",
            report()
        );
    }
    wait_for("the relay to count the download", 10, report, || {
        (forwarded() >= before + BLOB_LEN as u64).then_some(())
    });
    let human = String::from_utf8_lossy(&relay.cli(&["status"]).stdout).into_owned();
    assert!(
        human.contains(&format!(
            "relay server: udp/{RELAY_PORT}, offers 198.18.0.20:{RELAY_PORT}"
        )),
        "{human}"
    );
    eprintln!("{human}");
    drop(tsa);
    drop(tsb);
}
