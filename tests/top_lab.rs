//! `tern top` end to end on a real lab (`tern lab up`, unique prefix, torn down on Drop even on
//! panic), driven in tmux: c2 shows DIRECT; with nat1 and nat2 switched to hard the badge flips
//! to DERP and the detail pane says why; the relay toggle starts the relay server; quitting
//! restores the terminal. Traffic stays inside the lab's namespaces.

mod support;

#[path = "support/tmux.rs"]
mod tmux;

use std::process::{Child, Command, Stdio};

use support::lab_cli::LabCli;
use tmux::Tmux;

/// A background ping from c1 to c2's tailnet IP, so the path is probed (idle peers are not).
struct Pinger(Child);

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn c2_ip(lab: &LabCli) -> String {
    let socket = lab.socket("c1");
    let out = lab.tern(&[
        "--socket",
        &socket.display().to_string(),
        "status",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    json["peers"][0]["tailnet_ips"][0]
        .as_str()
        .expect("c2's tailnet IP")
        .to_string()
}

#[test]
fn top_on_a_lab_shows_direct_then_derp_with_the_reason_and_toggles_the_relay() {
    let lab = LabCli::up(&[]);
    let ip = c2_ip(&lab);
    let _pinger = Pinger(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}-c1", lab.0),
                "ping",
                "-i",
                "0.2",
                &ip,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping"),
    );
    let tmp = tempfile::tempdir().unwrap();
    let stty = tmp.path().join("stty.txt");
    let cmd = format!(
        "{} --socket {} top; echo TOP-EXITED $?; stty -a > {}; sleep 120",
        env!("CARGO_BIN_EXE_tern"),
        lab.socket("c1").display(),
        stty.display()
    );
    let tmux = Tmux::start(120, 36, &cmd);
    tmux.wait_for("c2 DIRECT", 60, |p| p.contains("DIRECT c2"));

    for nat in ["nat1", "nat2"] {
        let out = lab.tern(&["lab", "nat", nat, "hard"]);
        assert!(out.status.success(), "{}", support::output_text(&out));
    }
    tmux.wait_for("c2 on DERP", 90, |p| p.contains("DERP   c2"));
    tmux.keys(&["Enter"]);
    let pane = tmux.wait_for("the reason in the detail view", 60, |p| {
        p.contains("On DERP (") && p.contains("    reason  ") && !p.contains("reason  direct")
    });
    let reasons = [
        "both this node and c2",
        "NAT changes the port",
        "candidate address",
        "direct path stopped answering",
        "looking for a direct path",
    ];
    assert!(
        reasons.iter().any(|r| pane.contains(r)),
        "the detail view must say why:\n{pane}"
    );
    tmux.keys(&["Escape"]);

    // The relay toggle: port prompt (40000 offered), confirmation, then the header says so.
    tmux.keys(&["r"]);
    tmux.wait_for("the port prompt", 10, |p| {
        p.contains("relay server UDP port: 40000")
    });
    tmux.keys(&["Enter"]);
    tmux.wait_for("the confirmation", 10, |p| {
        p.contains("start the relay server on udp/40000? (y/n)")
    });
    tmux.keys(&["y"]);
    tmux.wait_for("the relay server running", 30, |p| {
        p.contains("relay udp/40000")
    });

    tmux.keys(&["q"]);
    let pane = tmux.wait_for("top to exit", 10, |p| p.contains("TOP-EXITED"));
    assert!(pane.contains("TOP-EXITED 0"), "{pane}");
    assert!(
        !pane.contains("DERP   c2"),
        "the alternate screen must be gone:\n{pane}"
    );
    let stty = tern_node_wait(&stty);
    let words: Vec<&str> = stty.split_whitespace().collect();
    assert!(
        words.contains(&"icanon") && words.contains(&"echo"),
        "terminal not restored: {stty}"
    );
}

fn tern_node_wait(path: &std::path::Path) -> String {
    for _ in 0..100 {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.is_empty() {
                return s;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no stty output at {}", path.display());
}
