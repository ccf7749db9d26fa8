//! Metrics as Prometheus reads them: `promtool check metrics` (Prometheus's own linter,
//! extracted by .ci/install-test-deps) passes on what `tern metrics` prints and what
//! `tern daemon --metrics-listen` serves, and the listener survives a flood of junk and idle
//! connections. The lab tests (relay_client.rs) check the values with real peers.

mod support;
#[path = "support/tern_node.rs"]
mod tern_node;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::promtool_check;
use tern_node::Daemon;

fn http_get(addr: &str, path: &str) -> String {
    let mut conn = TcpStream::connect(addr).expect("connect to the metrics listener");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read");
    answer
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn metrics_pass_promtool_from_the_cli_and_the_listener_which_survives_a_flood() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with(
        &tmp.path().join("state"),
        &tmp.path().join("tern.sock"),
        &["--metrics-listen", &addr],
    );
    let printed = daemon.ok(&["metrics"]);
    assert!(
        printed.contains("# TYPE tern_up gauge\ntern_up 0\n"),
        "{printed}"
    );
    assert!(printed.contains("tailscaled_inbound_bytes_total{path=\"direct_ipv4\"} 0"));
    promtool_check(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));

    let served = http_get(&addr, "/metrics");
    let (head, body) = served.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    promtool_check(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert!(http_get(&addr, "/other").starts_with("HTTP/1.1 404"));

    // 200 connections: junk, half a request, nothing at all; held open meanwhile.
    let mut held = Vec::new();
    for i in 0..200 {
        if let Ok(mut c) = TcpStream::connect(&addr) {
            let junk: &[u8] = match i % 3 {
                0 => b"\x00\xff garbage\r\n\r\n",
                1 => b"GET /metrics HTTP/1.1\r\nHost:",
                _ => b"",
            };
            let _ = c.write_all(junk);
            held.push(c);
        }
    }
    drop(held);
    // Slots free again once the junk is gone: a scrape within a few seconds works.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(mut c) = TcpStream::connect(&addr) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = write!(
                c,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut answer = String::new();
            let _ = c.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                ok = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok, "the metrics listener answers after the flood");
    let bad = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["daemon", "--metrics-listen", ":9100"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("localhost:9100"));
    assert!(daemon.stop().success());
}

#[test]
fn the_derp_servers_metrics_pass_promtool() {
    let metrics = tern::derp::server::Metrics::default();
    metrics
        .packets_forwarded_total
        .store(7, std::sync::atomic::Ordering::Relaxed);
    let text = metrics.render_prometheus();
    assert!(text.contains(
        "# TYPE tern_derp_packets_forwarded_total counter\ntern_derp_packets_forwarded_total 7\n"
    ));
    assert!(text.contains("# HELP tern_derp_accept_errors_total Failed accepts"));
    promtool_check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
}
