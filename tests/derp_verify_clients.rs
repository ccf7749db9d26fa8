//! `tern derp --verify-clients` against real `tern daemon`s: ta and tb join the lab tailnet
//! (lab namespaces, lab control server); `tern derp` on 127.0.0.1 asks ta's LocalAPI about each
//! client. ta's own key and its peer tb's key are admitted, a random key is refused, and with
//! the daemon gone everyone is refused (fail closed).

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use lab_nodes::{start_control, wait, Node};
use support::require_root;
use tern::derp::client::{ClientConfig, DerpClient, Transport};
use tern::keys::NodePrivate;
use tern_lab::{NatMode, Topology};

/// The node's private key from its state directory (`node.key`, `privkey:` text).
fn node_private(dir: &Path, name: &str) -> NodePrivate {
    let path = dir.join(format!("{name}-state")).join("node.key");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("a node key")
}

/// Whether a DERP client with `key` gets through the handshake and stays (a refused one is
/// closed right after its ClientInfo, before ServerInfo arrives).
fn admitted(addr: SocketAddr, key: &NodePrivate) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = ClientConfig {
        addr,
        host: "localhost".into(),
        transport: Transport::Plain,
        private_key: key.clone(),
        preferred: false,
    };
    runtime.block_on(async {
        matches!(
            tokio::time::timeout(Duration::from_secs(10), DerpClient::connect(&config)).await,
            Ok(Ok(_))
        )
    })
}

/// Polls `/debug/metrics` (plain HTTP on loopback) for one counter.
fn metric(addr: SocketAddr, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics connect");
    stream
        .write_all(b"GET /debug/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn verify_clients_admits_the_daemons_tailnet_only() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let dir = tempfile::tempdir().unwrap();
    let _control = start_control(&topo, dir.path());
    let (c1, c2) = (topo.ns("c1").unwrap(), topo.ns("c2").unwrap());
    let a = Node::start(c1, dir.path(), "ta");
    let b = Node::start(c2, dir.path(), "tb");
    let logs = || format!("{}\n{}", a.logs(), b.logs());
    wait("both LocalAPIs", 20, logs, || {
        (a.status().is_object() && b.status().is_object()).then_some(())
    });
    a.up("ta");
    b.up("tb");
    wait("ta to see tb in its netmap", 60, logs, || {
        a.peer_entry("tb")
    });

    // `tern derp` in the test's own namespace, on loopback; it reaches ta by its socket file.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let log_path = dir.path().join("derp.log");
    let derp = DerpProcess::start(addr, &a.socket, &log_path);
    let derp_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let (ka, kb) = (
        node_private(dir.path(), "ta"),
        node_private(dir.path(), "tb"),
    );
    assert!(admitted(addr, &ka), "ta itself\n{}", derp_log());
    assert!(admitted(addr, &kb), "ta's peer tb\n{}", derp_log());
    assert!(!admitted(addr, &NodePrivate::generate()), "a stranger");
    assert_eq!(
        metric(addr, "tern_derp_clients_refused_unverified_total"),
        1
    );

    // No daemon to ask: refused, and the log says why.
    drop(a);
    let stranger_after = NodePrivate::generate();
    assert!(!admitted(addr, &stranger_after), "fail closed");
    assert!(metric(addr, "tern_derp_clients_refused_verify_error_total") >= 1);
    assert!(
        derp_log().contains("cannot ask the tern daemon"),
        "{}",
        derp_log()
    );
    drop(derp);
}

/// `tern derp --verify-clients` on `addr` (plain HTTP, no STUN) asking the daemon at `socket`;
/// its log goes to `log`. Killed on drop.
struct DerpProcess(std::process::Child);

impl DerpProcess {
    fn start(addr: SocketAddr, socket: &Path, log: &Path) -> DerpProcess {
        let log = std::fs::File::create(log).expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["derp", "--http", "--stun-port", "0", "--addr"])
            .arg(addr.to_string())
            .args(["--verify-clients", "--verify-socket"])
            .arg(socket)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tern derp");
        let derp = DerpProcess(child);
        wait("tern derp to listen", 20, String::new, || {
            std::net::TcpStream::connect(addr).ok().map(drop)
        });
        derp
    }
}

impl Drop for DerpProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
