//! Interactive login end to end: the lab control server with `interactive_login = true`, a tern
//! daemon in c1 running `tern up` without an auth key. `tern up` prints the login URL and waits;
//! `tern status` shows `NeedsLogin` with the URL; the test opens the approval page from c1 and
//! approves it; `tern up` then returns 0 and the node is Running. `tern logout` expires the node
//! at control, and `tern login --json` goes through a new URL back to the same addresses.
//! Everything runs inside lab namespaces with no route out.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lab_nodes::{control_config, curl, start_derp, wait, Node};
use lab_server::LabServer;
use support::require_root;
use tern_lab::topology::CONTROL_IP;
use tern_lab::{NatMode, Netns, Topology};

/// A CLI command that runs in the background; its output lines arrive on a channel.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Background {
    fn start(node: &Node, args: &[&str]) -> Background {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg("--socket")
            .arg(&node.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the tern CLI");
        let (tx, lines) = mpsc::channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Background { child, lines }
    }

    /// The first line that `pick` accepts, within `secs`.
    fn line(&self, secs: u64, pick: impl Fn(&str) -> Option<String>) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = pick(&line) {
                        return found;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no matching line from the CLI within {secs} s");
    }

    /// Waits (bounded) for the command to end; its exit code.
    fn exit_code(mut self, secs: u64) -> Option<i32> {
        for _ in 0..secs * 10 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("the CLI did not finish within {secs} s");
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` from `ns`: GET or POST `url`, the body as text.
fn curl_text(ns: &Netns, method: &str, url: &str) -> String {
    String::from_utf8_lossy(&curl(ns, method, url).unwrap_or_default()).into_owned()
}

fn url_in(line: &str) -> Option<String> {
    let start = line.find("http://")?;
    let url: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    url.contains("/register/").then_some(url)
}

#[test]
fn tern_up_prints_the_login_url_and_returns_once_it_is_approved() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let _derp = start_derp(&topo);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = control_config(dir.path());
    config.interactive_login = true;
    let server_ns = topo.ns("server").expect("server").name().to_string();
    let control = LabServer::start(config, Some(&server_ns));
    let c1 = topo.ns("c1").expect("c1");
    let a = Node::start(c1, dir.path(), "ta");
    a.wait_for_api(20);

    let control_url = format!("http://{CONTROL_IP}:8080");
    let up = Background::start(
        &a,
        &["up", "--login-server", &control_url, "--hostname", "ta"],
    );
    let url = up.line(30, url_in);
    assert!(
        url.starts_with(&format!("{control_url}/register/")),
        "{url}"
    );
    // While it waits: NeedsLogin with the URL, in JSON and in `tern status`.
    let status = a.status();
    assert_eq!(status["backend_state"], "NeedsLogin");
    assert_eq!(status["auth_url"], url.as_str());
    let text = String::from_utf8_lossy(&a.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("To authenticate, visit:") && text.contains(&url),
        "{text}"
    );
    assert!(
        control.handle.nodes().is_empty(),
        "not registered before approval"
    );

    let page = curl_text(c1, "GET", &url);
    assert!(page.contains("<b>ta</b> asks to join"), "{page}");
    let approved = curl_text(c1, "POST", &url);
    assert!(approved.contains("approved"), "{approved}");
    assert_eq!(
        up.exit_code(60),
        Some(0),
        "tern up ends with 0 once approved"
    );
    let running = a.status();
    assert_eq!(running["backend_state"], "Running", "{running:#}");
    assert!(running["auth_url"].is_null());
    let ips = running["self"]["tailnet_ips"].clone();
    assert!(ips[0].is_string(), "{running:#}");

    // Logout: control marks the node logged out; the daemon needs a login again.
    let out = a.cli(&["logout"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.status()["backend_state"], "NeedsLogin");
    wait(
        "control to see the logout",
        20,
        || format!("{:?}", control.handle.nodes()),
        || {
            control
                .handle
                .nodes()
                .first()
                .filter(|n| n.logged_out)
                .map(drop)
        },
    );

    // `tern login --json`: a new URL as JSON, approved, the same addresses back.
    let login = Background::start(&a, &["login", "--json"]);
    let url2 = login.line(30, |l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        v["AuthURL"].as_str().map(str::to_string)
    });
    assert_ne!(url2, url, "a new login");
    assert!(curl_text(c1, "POST", &url2).contains("approved"));
    assert_eq!(login.exit_code(60), Some(0));
    let again = a.status();
    assert_eq!(again["backend_state"], "Running", "{again:#}");
    assert_eq!(
        again["self"]["tailnet_ips"], ips,
        "same node, same addresses"
    );
}

#[test]
fn a_login_url_that_is_not_approved_times_out_with_an_error() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = control_config(dir.path());
    config.interactive_login = true;
    let server_ns = topo.ns("server").expect("server").name().to_string();
    let _control = LabServer::start(config, Some(&server_ns));
    let a = Node::start(topo.ns("c1").expect("c1"), dir.path(), "ta");
    a.wait_for_api(20);
    let out = a.cli(&[
        "up",
        "--login-server",
        &format!("http://{CONTROL_IP}:8080"),
        "--timeout",
        "3s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("To authenticate, visit:") && stderr.contains("timed out"),
        "{stderr}"
    );
}
