//! The daemon's data plane over DERP, end to end in lab namespaces: two `tern daemon`s with a
//! kernel TUN in c1 and c2 behind `udpblock` NATs (no UDP leaves either site), the lab control
//! server in `server`, and `tern derp` (TLS, self-signed, `InsecureForTests` in the DERP map) on
//! the relay host. Ping and a TCP transfer between the tailnet addresses go through DERP;
//! `status --json` shows the path.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lab_nodes::{
    ping_once, serve_http, start_control, start_derp, start_derp_at, wait, Node, AUTH_KEY,
};
use lab_server::{test_config, LabServer};
use serde_json::Value;
use support::require_root;
use tern_lab::topology::{CONTROL_IP, RELAY_IPS};
use tern_lab::{CaddyConfig, CaddyNode, NatMode, Process, Topology};

#[test]
fn two_tern_nodes_ping_and_tcp_over_tern_derp() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Udpblock, NatMode::Udpblock).expect("build lab");
    let derp = std::cell::RefCell::new(start_derp(&topo));
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&topo, dir.path());
    let (c1, c2) = (topo.ns("c1").unwrap(), topo.ns("c2").unwrap());
    let a = Node::start(c1, dir.path(), "ta");
    let b = Node::start(c2, dir.path(), "tb");
    let logs = || {
        format!(
            "== ta\n{}\n== tb\n{}\n== derp\n{}",
            a.process.output(),
            b.process.output(),
            derp.borrow().output()
        )
    };
    wait("both LocalAPIs", 20, logs, || {
        (a.status().is_object() && b.status().is_object()).then_some(())
    });
    a.up("ta");
    b.up("tb");

    let peer_b = wait("ta to see tb with home DERP 900", 60, logs, || a.peer("tb"));
    wait("tb to see ta with home DERP 900", 60, logs, || b.peer("ta"));
    let b_ip = peer_b["tailnet_ips"][0].as_str().unwrap().to_string();
    // The lab disables IPv6 in its namespaces, so the data plane runs IPv4 only there.

    // The first packets wait for the handshake; a few tries are normal.
    wait("ping ta → tb over DERP", 30, logs, || {
        ping_once(c1, &b_ip).then_some(())
    });
    let ping = c1
        .exec_unchecked(&["ping", "-c", "3", "-i", "0.2", "-W", "3", &b_ip])
        .unwrap();
    assert!(
        ping.status.success(),
        "ping: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        logs()
    );

    // TCP: 4 MiB over HTTP from tb's tailnet address, checked byte for byte.
    let blob: &'static [u8] = Box::leak(
        (0..4u32 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into_boxed_slice(),
    );
    let (stop_http, http) = serve_http(c2, SocketAddr::new(b_ip.parse().unwrap(), 8000), blob);
    let url = format!("http://{b_ip}:8000/");
    let download = c1
        .exec_unchecked(&["curl", "-sS", "--max-time", "60", &url])
        .unwrap();
    stop_http.store(true, Ordering::Relaxed);
    let _ = http.join();
    assert!(
        download.status.success() && download.stdout.len() == blob.len(),
        "HTTP download over DERP: {} of {} bytes: {}\n{}",
        download.stdout.len(),
        blob.len(),
        String::from_utf8_lossy(&download.stderr),
        logs()
    );
    assert!(
        download.stdout == blob,
        "the 4 MiB download arrived corrupted"
    );

    // Throughput figure (iperf3 with a byte count; the receiver's total can trail the sender's
    // at the end of a test, so only the sender's total is checked).
    let mut server = Process::spawn(c2, "iperf3 -s", "iperf3", &["-s", "-1", "-B", &b_ip])
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let client = c1
        .exec_unchecked(&["timeout", "60", "iperf3", "-c", &b_ip, "-n", "4M", "-J"])
        .unwrap();
    let _ = server.stop();
    let report: Value = serde_json::from_slice(&client.stdout).unwrap_or_default();
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        client.status.success() && sent >= 4 << 20,
        "iperf3 over DERP sent {sent} bytes: {}\n{}",
        String::from_utf8_lossy(&client.stdout),
        logs()
    );
    eprintln!(
        "iperf3 TCP over tern derp (debug build): {:.1} Mbit/s",
        bps / 1e6
    );

    // Status: the path is DERP, region 900, with counters and a handshake time.
    let p = wait(
        "ta's status to show the DERP path",
        10,
        || format!("{:?}", a.peer("tb")),
        || {
            let p = a.peer("tb")?;
            (p["path"] == "derp"
                && p["rx_bytes"].as_u64()? > 4_000_000
                && p["tx_bytes"].as_u64()? > 1_000_000
                && !p["last_handshake_at"].is_null())
            .then_some(p)
        },
    );
    assert_eq!(p["derp_region"], 900, "{p}");
    let human = String::from_utf8_lossy(&a.cli(&["status"]).stdout).to_string();
    assert!(human.contains("derp(900)"), "human status: {human}");
    assert!(!human.contains("no packets flow"), "human status: {human}");

    // Idle past the WireGuard keepalive window (10 s); the next packet still passes. The long
    // cases (REJECT_AFTER_TIME, rekey) are covered by the wg unit tests with simulated time.
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        ping_once(c1, &b_ip) || ping_once(c1, &b_ip),
        "ping after 12 s idle failed\n{}",
        logs()
    );
    // And the other direction.
    let a_ip = b.peer("ta").unwrap()["tailnet_ips"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ping_once(c2, &a_ip), "ping tb → ta failed\n{}", logs());

    // The DERP server restarts (new process, new key): both nodes reconnect with back-off and
    // traffic flows again over the same WireGuard sessions.
    let _ = derp.borrow_mut().stop();
    assert!(
        !ping_once(c1, &b_ip),
        "ping passed with DERP down: is there another path?"
    );
    *derp.borrow_mut() = start_derp(&topo);
    wait("ping ta → tb after the DERP restart", 30, logs, || {
        ping_once(c1, &b_ip).then_some(())
    });

    // `tern down` removes the TUN (and its routes); `tern up` brings the data plane back.
    let down = a.cli(&["down"]);
    assert!(
        down.status.success(),
        "tern down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    wait("tern0 to go away after down", 10, logs, || {
        let link = c1.exec_unchecked(&["ip", "link", "show", "tern0"]).ok()?;
        (!link.status.success()).then_some(())
    });
    assert_eq!(a.status()["data_plane"]["active"], false);
    a.up("ta");
    wait("ping ta → tb after down/up", 30, logs, || {
        ping_once(c1, &b_ip).then_some(())
    });

    drop(a);
    drop(b);
    drop(control);
    let _ = derp.borrow_mut().stop();
}

const CADDY_BODY: &str = "hello from tsnet over tern derp";
const TERN_BODY: &str = "hello from tern's tailnet address";

/// Interop with the real Go node: tern (kernel TUN) in c1 behind a UDP-blocking NAT, Caddy/tsnet
/// v1.90.9 in c2; the only path is tern derp. curl in c1 reaches Caddy's tailnet site, and
/// Caddy's reverse proxy (over its tailnet node) reaches an HTTP server on tern's address.
#[test]
fn tern_and_tsnet_talk_over_tern_derp() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Udpblock, NatMode::Easy).expect("build lab");
    let mut derp = start_derp(&topo);
    let dir = tempfile::tempdir().unwrap();
    let control = start_control(&topo, dir.path());
    let (c1, c2) = (topo.ns("c1").unwrap(), topo.ns("c2").unwrap());
    let a = Node::start(c1, dir.path(), "ta");
    let a_logs = || format!("== ta\n{}\n== derp\n{}", a.process.output(), derp.output());
    wait("tern's LocalAPI", 20, a_logs, || {
        a.status().is_object().then_some(())
    });
    a.up("ta");
    let a_ip = wait("tern's data plane and address", 60, a_logs, || {
        let s = a.status();
        (s["data_plane"]["active"] == true)
            .then(|| s["self"]["tailnet_ips"][0].as_str().map(str::to_string))
            .flatten()
    });
    let (stop_http, http) = serve_http(
        c1,
        SocketAddr::new(a_ip.parse().unwrap(), 8000),
        TERN_BODY.as_bytes(),
    );

    let url = format!("http://{CONTROL_IP}:8080");
    let mut config = CaddyConfig::new("tsb", &url, AUTH_KEY);
    config.site_body = format!(
        "respond \"{CADDY_BODY}\"\n}}\nhttp://127.0.0.1:8081 {{\nreverse_proxy http://{a_ip}:8000 {{\ntransport tailscale tsb\n}}"
    );
    let mut caddy = CaddyNode::start(c2, config).expect("start caddy");
    let logs = || format!("{}\n== tsb\n{}", a_logs(), caddy.logs());

    let peer = wait("tern to see tsb with home DERP 900", 90, logs, || {
        a.peer("tsb")
    });
    let caddy_ip = peer["tailnet_ips"][0].as_str().unwrap().to_string();
    let site = format!("http://{caddy_ip}/");
    let body = wait("curl in c1 → Caddy's tailnet site", 90, logs, || {
        let out = c1
            .exec_unchecked(&["curl", "-sS", "--max-time", "5", &site])
            .ok()?;
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && body == CADDY_BODY).then_some(body)
    });
    assert_eq!(body, CADDY_BODY);

    let body = wait(
        "curl in c2 → Caddy → tern's HTTP server",
        60,
        logs,
        || {
            let out = c2
                .exec_unchecked(&["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8081/"])
                .ok()?;
            let body = String::from_utf8_lossy(&out.stdout).to_string();
            (out.status.success() && body == TERN_BODY).then_some(body)
        },
    );
    assert_eq!(body, TERN_BODY);

    let p = wait(
        "tern's status to show the DERP path to tsb",
        10,
        logs,
        || {
            let p = a.peer("tsb")?;
            (p["path"] == "derp" && p["rx_bytes"].as_u64()? > 0).then_some(p)
        },
    );
    assert_eq!(p["derp_region"], 900, "{p}");
    assert!(!p["last_handshake_at"].is_null(), "{p}");
    eprintln!("tern status of the tsnet peer: {p}");

    stop_http.store(true, Ordering::Relaxed);
    let _ = http.join();
    let _ = caddy.stop();
    drop(a);
    drop(control);
    let _ = derp.stop();
}

/// Home DERP by measured latency: the DERP map has region 900 on a relay address where
/// nothing listens (no STUN answer, TCP refused) and region 901 on `tern derp`. Both nodes
/// must pick 901 although it has the higher id, peers must see 901 as their home, and traffic
/// must flow. ta sits behind an easy NAT (STUN measures 901), tb behind a UDP-blocking NAT
/// (the TCP-connect fallback measures it).
#[test]
fn home_derp_is_the_region_that_answers() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Udpblock).expect("build lab");
    let mut derp = start_derp(&topo);
    let dir = tempfile::tempdir().unwrap();
    let server_ns = topo.ns("server").unwrap().name().to_string();
    let mut config = test_config(
        &format!("{CONTROL_IP}:8080"),
        &dir.path().join("control"),
        &RELAY_IPS[0].to_string(),
        10,
    );
    let mut reachable = config.derp_regions[0].clone();
    reachable.id = 901;
    reachable.code = "lab2".into();
    for node in &mut reachable.nodes {
        node.name = "901a".into();
    }
    let dead_ip = RELAY_IPS[1].to_string();
    for node in &mut config.derp_regions[0].nodes {
        node.host_name = dead_ip.clone();
        node.ipv4 = dead_ip.clone();
    }
    config.derp_regions.push(reachable);
    let control = LabServer::start(config, Some(&server_ns));

    let (c1, c2) = (topo.ns("c1").unwrap(), topo.ns("c2").unwrap());
    let a = Node::start(c1, dir.path(), "ta");
    let b = Node::start(c2, dir.path(), "tb");
    let logs = || {
        format!(
            "== ta\n{}\n== tb\n{}\n== derp\n{}",
            a.process.output(),
            b.process.output(),
            derp.output()
        )
    };
    wait("both LocalAPIs", 20, logs, || {
        (a.status().is_object() && b.status().is_object()).then_some(())
    });
    a.up("ta");
    b.up("tb");

    let peer_with_home = |n: &Node, host: &str| {
        let s = n.status();
        s["peers"]
            .as_array()?
            .iter()
            .find(|p| p["hostname"] == host && !p["home_derp"].is_null())
            .cloned()
    };
    let peer_b = wait("ta to see tb's home DERP", 60, logs, || {
        peer_with_home(&a, "tb")
    });
    let peer_a = wait("tb to see ta's home DERP", 60, logs, || {
        peer_with_home(&b, "ta")
    });
    assert_eq!(
        peer_b["home_derp"], 901,
        "tb's home as ta sees it: {peer_b}"
    );
    assert_eq!(
        peer_a["home_derp"], 901,
        "ta's home as tb sees it: {peer_a}"
    );
    for (name, node) in [("ta", &a), ("tb", &b)] {
        let s = node.status();
        let latency = &s["data_plane"]["derp_latency_ms"];
        assert!(
            latency["901"].as_f64().is_some(),
            "{name} measured no latency to region 901: {latency}"
        );
        assert!(
            latency["900"].is_null() && latency.get("900").is_some(),
            "{name} should have measured region 900 as unreachable: {latency}"
        );
    }

    let b_ip = peer_b["tailnet_ips"][0].as_str().unwrap().to_string();
    let a_ip = peer_a["tailnet_ips"][0].as_str().unwrap().to_string();
    wait("ping ta → tb over DERP 901", 30, logs, || {
        ping_once(c1, &b_ip).then_some(())
    });
    assert!(ping_once(c2, &a_ip), "ping tb → ta failed\n{}", logs());
    let p = wait("ta's status to show the DERP path", 10, logs, || {
        let p = peer_with_home(&a, "tb")?;
        (p["path"] == "derp").then_some(p)
    });
    assert_eq!(p["derp_region"], 901, "{p}");

    drop(a);
    drop(b);
    drop(control);
    let _ = derp.stop();
}

/// The home moves when it stops answering: regions 900 and 901 each have a `tern derp` (on the
/// relay's two addresses); once both nodes have a home, that region's server is stopped, and
/// within the next re-measure (20–26 s) both nodes move to the other region, peers see the new
/// home, and traffic flows there.
#[test]
fn home_derp_moves_when_the_home_region_dies() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
    let mut derps = [
        start_derp_at(&topo, &RELAY_IPS[0].to_string()),
        start_derp_at(&topo, &RELAY_IPS[1].to_string()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let server_ns = topo.ns("server").unwrap().name().to_string();
    let mut config = test_config(
        &format!("{CONTROL_IP}:8080"),
        &dir.path().join("control"),
        &RELAY_IPS[0].to_string(),
        10,
    );
    let mut second = config.derp_regions[0].clone();
    second.id = 901;
    second.code = "lab2".into();
    for node in &mut second.nodes {
        node.name = "901a".into();
        node.host_name = RELAY_IPS[1].to_string();
        node.ipv4 = RELAY_IPS[1].to_string();
    }
    config.derp_regions.push(second);
    let control = LabServer::start(config, Some(&server_ns));

    let (c1, c2) = (topo.ns("c1").unwrap(), topo.ns("c2").unwrap());
    let a = Node::start(c1, dir.path(), "ta");
    let b = Node::start(c2, dir.path(), "tb");
    let logs = || {
        format!(
            "== ta\n{}\n== tb\n{}",
            a.process.output(),
            b.process.output()
        )
    };
    wait("both LocalAPIs", 20, logs, || {
        (a.status().is_object() && b.status().is_object()).then_some(())
    });
    a.up("ta");
    b.up("tb");
    let home_of = |n: &Node, host: &str| -> Option<(u64, String)> {
        let s = n.status();
        let p = s["peers"]
            .as_array()?
            .iter()
            .find(|p| p["hostname"] == host)?;
        Some((
            p["home_derp"].as_u64()?,
            p["tailnet_ips"][0].as_str()?.to_string(),
        ))
    };
    let (home, b_ip) = wait("ta to see tb's home DERP", 60, logs, || home_of(&a, "tb"));
    assert!(home == 900 || home == 901, "tb's home: {home}");
    wait("ping ta → tb", 30, logs, || {
        ping_once(c1, &b_ip).then_some(())
    });

    // Stop the server of tb's home region; the other region must take over.
    let dead = usize::from(home == 901);
    let _ = derps[dead].stop();
    let other = if home == 900 { 901 } else { 900 };
    wait("ta to see tb's home move", 90, logs, || {
        (home_of(&a, "tb")?.0 == other).then_some(())
    });
    let (a_home, a_ip) = wait("tb to see ta's home move", 90, logs, || {
        home_of(&b, "ta").filter(|(h, _)| *h == other)
    });
    assert_eq!(a_home, other);
    let latency = b.status()["data_plane"]["derp_latency_ms"].clone();
    assert!(
        latency[home.to_string()].is_null() && latency[other.to_string()].is_number(),
        "tb's latency report after the move: {latency}"
    );
    wait("ping ta → tb after the move", 30, logs, || {
        ping_once(c1, &b_ip).then_some(())
    });
    assert!(
        ping_once(c2, &a_ip),
        "ping tb → ta after the move\n{}",
        logs()
    );

    drop(a);
    drop(b);
    drop(control);
    for d in &mut derps {
        let _ = d.stop();
    }
}
