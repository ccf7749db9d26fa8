//! `tern ping` and `tern netcheck` between the two tern nodes of a real lab (`tern lab up`):
//! the exit codes scripts rely on (0 direct, 3 DERP only, 4 no reply) and the tailscale-style
//! lines, over real NAT boxes, DERP and UDP. The lab is torn down even when a test panics.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use support::output_text as text;
use support::require_root;
use tern_lab::state::state_dir;
use tern_lab::topology::unique_prefix;

/// Tears the lab down even when the test panics.
struct Lab(String);

impl Lab {
    fn up(nat1: &str, nat2: &str) -> Lab {
        require_root();
        let lab = Lab(unique_prefix());
        let up = lab.tern(&["lab", "up", "--nat1", nat1, "--nat2", nat2]);
        assert!(up.status.success(), "lab up: {}", text(&up));
        lab
    }

    fn tern(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .env("TERN_LAB_PREFIX", &self.0)
            .output()
            .expect("run tern")
    }

    fn socket(&self, node: &str) -> PathBuf {
        state_dir(&self.0).join(format!("{node}.sock"))
    }

    /// `tern --socket <c1's> ARGS`, from the root namespace.
    fn c1(&self, args: &[&str]) -> Output {
        let socket = self.socket("c1");
        let mut full = vec!["--socket", socket.to_str().expect("UTF-8 socket path")];
        full.extend_from_slice(args);
        self.tern(&full)
    }

    fn pid_of(&self, process: &str) -> i32 {
        let out = self.tern(&["lab", "status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let status: Value = serde_json::from_slice(&out.stdout).expect("lab status JSON");
        status["processes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == process))
            .and_then(|p| p["pid"].as_i64())
            .and_then(|pid| i32::try_from(pid).ok())
            .unwrap_or_else(|| panic!("no process {process} in {status}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.tern(&["lab", "down", "--force"]);
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ping_exits_0_once_direct_and_4_when_the_peer_is_gone() {
    let lab = Lab::up("easy", "easy");
    // First contact goes over DERP; the CLI ping starts discovery, and an easy NAT on both
    // sides gives a direct path well within 20 pings.
    let out = lab.c1(&["ping", "-c", "20", "c2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = stdout(&out);
    let last = lines.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("pong from c2 (100.64.0.2) via 198.18.2.2:41641 in "),
        "ends on the direct pong through nat2's WAN address: {lines}"
    );
    for line in lines.lines() {
        assert!(line.starts_with("pong from c2 (100.64.0.2) via "), "{line}");
    }

    // --json: one PingResult per line; the path is now direct from the first ping.
    let out = lab.c1(&["ping", "--json", "-c", "1", "100.64.0.2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let result: Value = serde_json::from_str(stdout(&out).trim()).expect("PingResult JSON");
    assert_eq!(result["node_name"], "c2");
    assert_eq!(result["node_ip"], "100.64.0.2");
    assert_eq!(result["path"], "direct");
    assert_eq!(result["endpoint"], "198.18.2.2:41641");
    assert!(result["latency_ms"].as_f64().is_some(), "{result}");

    let status = lab.c1(&["status"]);
    assert!(
        stdout(&status).contains("c2  linux  online; direct 198.18.2.2:41641"),
        "{}",
        text(&status)
    );

    let out = lab.c1(&["netcheck"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = stdout(&out);
    for needle in [
        "\t* UDP: true\n",
        "\t* IPv4: yes, 198.18.1.2:",
        "\t* MappingVariesByDestIP: false\n",
        "\t* Nearest DERP: Lab DERP\n",
        "\t\t- lab: ",
        "(local)\n",
    ] {
        assert!(
            report.contains(needle),
            "netcheck lacks {needle:?}: {report}"
        );
    }
    let out = lab.c1(&["netcheck", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("netcheck JSON");
    assert_eq!(json["udp"], true);
    assert_eq!(json["preferred_derp"], 900);

    // c2's daemon stops: nothing answers any more.
    let pid = nix::unistd::Pid::from_raw(lab.pid_of("tern:c2"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill c2's daemon");
    let out = lab.c1(&["ping", "-c", "2", "--timeout", "1s", "c2"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        "ping \"100.64.0.2\" timed out\nping \"100.64.0.2\" timed out\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "no reply\n");
}

#[test]
fn ping_exits_3_when_only_derp_answers() {
    let lab = Lab::up("udpblock", "easy");
    let out = lab.c1(&["ping", "-c", "3", "c2"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lines = stdout(&out);
    assert_eq!(lines.lines().count(), 3, "{lines}");
    for line in lines.lines() {
        assert!(
            line.starts_with("pong from c2 (100.64.0.2) via DERP(lab) in "),
            "{line}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "direct connection not established\n"
    );
    // Without --until-direct the verdict is the same, but no complaint.
    let out = lab.c1(&["ping", "-c", "1", "--until-direct=false", "c2"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(out.stderr.is_empty(), "{}", text(&out));

    let out = lab.c1(&["netcheck"]);
    let report = stdout(&out);
    assert!(report.contains("\t* UDP: false\n"), "{report}");
    assert!(report.contains("\t* IPv4: (no addr found)\n"), "{report}");
}
