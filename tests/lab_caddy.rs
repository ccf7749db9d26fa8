//! The real Tailscale peer (Caddy + tsnet v1.90.9) runs inside a lab namespace, talks to a control
//! URL inside the lab, and cannot reach anything outside it.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::time::Duration;

use support::require_root;
use tern_lab::topology::CONTROL_IP;
use tern_lab::{CaddyConfig, CaddyNode, LabError, NatMode, Topology};

const CONTROL_PORT: u16 = 8080;

/// A tiny HTTP listener that reports each request line and answers 404.
fn control_logger(listener: TcpListener) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let tx = tx.clone();
            std::thread::spawn(move || serve(stream, &tx));
        }
    });
    rx
}

fn serve(mut stream: TcpStream, tx: &mpsc::Sender<String>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Skip the headers; tsnet's GET /key has no body.
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
        }
        if tx.send(request_line.trim_end().to_string()).is_err() {
            return;
        }
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    }
}

fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

#[test]
fn tsnet_runs_in_a_namespace_and_asks_the_lab_control_for_its_key() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let listener = topo
        .ns("server")
        .unwrap()
        .bind_tcp(SocketAddr::from((CONTROL_IP, CONTROL_PORT)))
        .unwrap();
    let requests = control_logger(listener);
    let c1 = topo.ns("c1").unwrap();
    let config = CaddyConfig::new(
        "labpeer",
        &format!("http://{CONTROL_IP}:{CONTROL_PORT}"),
        "tskey-auth-lab",
    );
    let mut caddy = match CaddyNode::start(c1, config) {
        Ok(caddy) => caddy,
        Err(err @ LabError::CaddyMissing { .. }) => panic!("{err}"),
        Err(err) => panic!("starting caddy: {err}"),
    };

    let first = requests
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "no request to the lab control URL within 60 s; caddy logs:\n{}",
                caddy.logs()
            )
        });
    assert_eq!(first, "GET /key?v=130 HTTP/1.1", "logs:\n{}", caddy.logs());

    // It runs in c1's namespace.
    let pid = caddy.process().pid();
    assert_eq!(
        netns_inode(&format!("/proc/{pid}/ns/net")),
        netns_inode(&format!("/run/netns/{}", c1.name())),
        "caddy is not in the lab namespace"
    );
    assert!(
        caddy.process().try_wait().unwrap().is_none(),
        "caddy exited:\n{}",
        caddy.logs()
    );

    // The namespace has no route out: route lookup fails, and connect() fails locally with
    // ENETUNREACH, so nothing is sent.
    let route = c1
        .exec_unchecked(&["ip", "route", "get", "1.1.1.1"])
        .unwrap();
    assert!(!route.status.success(), "c1 has a route outside: {route:?}");
    let errors = c1
        .run_in(|| {
            let outside = SocketAddr::from((Ipv4Addr::new(1, 1, 1, 1), 443));
            let udp = UdpSocket::bind("0.0.0.0:0").map_err(|e| LabError::io("bind", e))?;
            let udp_err = udp.connect(outside).err().and_then(|e| e.raw_os_error());
            let tcp_err = TcpStream::connect_timeout(&outside, Duration::from_secs(2))
                .err()
                .and_then(|e| e.raw_os_error());
            Ok((udp_err, tcp_err))
        })
        .unwrap();
    assert_eq!(errors, (Some(libc::ENETUNREACH), Some(libc::ENETUNREACH)));

    let status = caddy.stop().unwrap();
    assert!(
        caddy.process().try_wait().unwrap().is_some(),
        "caddy still running ({status})"
    );
}

#[test]
fn missing_caddy_binary_is_a_clear_error() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let mut config = CaddyConfig::new("x", "http://10.99.0.20:1", "k");
    config.binary = Some("/nonexistent/caddy".into());
    let err = CaddyNode::start(topo.ns("c1").unwrap(), config).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(".ci/install-test-deps"), "{text}");
    assert!(text.contains("/nonexistent/caddy"), "{text}");
}
