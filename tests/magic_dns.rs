//! MagicDNS at 100.100.100.100 in TUN mode (issue 14), with a real daemon in a lab namespace and
//! a Caddy/tsnet node (tailscale.com v1.90.9) as the name to find:
//!
//! * UDP and TCP queries from c1 to quad-100: the tsnet node's name (full and short) → its
//!   tailnet IP, PTR back, NXDOMAIN for a missing tailnet name, `www.example.lab` forwarded by
//!   the split route from control's `[dns]` to a stub DNS server on the public segment;
//! * `ping 100.100.100.100` answered;
//! * the host's resolver (direct mode: c1's /etc/resolv.conf, a bind mount as in a container)
//!   points at quad-100 with the tailnet's and the host's search domains: `curl` and `getent`
//!   find the tsnet node by its full and its short name and the host's own names through the
//!   forwarder; `--accept-dns=false` restores the file at once; after SIGKILL `tern daemon
//!   --cleanup` restores it byte for byte, as does a clean stop.

#[path = "support/dns_stub.rs"]
mod dns_stub;
#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use lab_nodes::{control_config, ping_once, start_control_with, start_derp, tail, wait, Node};
use support::require_root;
use tern_lab::topology::{CONTROL_IP, SERVER_IPS};
use tern_lab::{CaddyConfig, CaddyNode, NatMode, Netns, Topology};

const QUAD_100: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
/// What the stub upstream knows.
const STUB_NAME: &str = "www.example.lab";
const STUB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

fn query(name: &str, rtype: RecordType, id: u16) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    msg.to_vec().expect("encode query")
}

/// One query over UDP from inside `ns`; the parsed answer.
fn ask_udp(ns: &Netns, name: &str, rtype: RecordType) -> Option<Message> {
    let socket = ns.bind_udp("0.0.0.0:0".parse().ok()?).ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let id = rand::random();
    socket
        .send_to(&query(name, rtype, id), SocketAddr::from((QUAD_100, 53)))
        .ok()?;
    let mut buf = [0u8; 4096];
    let (n, from) = socket.recv_from(&mut buf).ok()?;
    assert_eq!(
        from,
        SocketAddr::from((QUAD_100, 53)),
        "answer from quad-100"
    );
    let msg = Message::from_vec(&buf[..n]).ok()?;
    assert_eq!(msg.metadata.id, id, "the answer's ID");
    Some(msg)
}

/// One query over TCP (length-prefixed) from inside `ns`.
fn ask_tcp(ns: &Netns, name: &str, rtype: RecordType) -> Option<Message> {
    let q = query(name, rtype, 7);
    ns.run_in(move || {
        let mut conn = std::net::TcpStream::connect_timeout(
            &SocketAddr::from((QUAD_100, 53)),
            Duration::from_secs(3),
        )
        .map_err(|e| tern_lab::LabError::io("connect", e))?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| tern_lab::LabError::io("timeout", e))?;
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        conn.write_all(&framed)
            .map_err(|e| tern_lab::LabError::io("write", e))?;
        let mut len = [0u8; 2];
        conn.read_exact(&mut len)
            .map_err(|e| tern_lab::LabError::io("read", e))?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut body)
            .map_err(|e| tern_lab::LabError::io("read", e))?;
        Ok(body)
    })
    .ok()
    .and_then(|body| Message::from_vec(&body).ok())
}

fn a_records(msg: &Message) -> Vec<Ipv4Addr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn magic_dns_answers_tailnet_names_and_forwards_the_rest() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("lab");
    let _derp = start_derp(&topo);
    let dir = tempfile::tempdir().expect("temp dir");
    let stub_ip = SERVER_IPS[1];
    let _stub = dns_stub::DnsStub::start(
        topo.ns("server").expect("server"),
        SocketAddr::from((stub_ip, 53)),
        &[(STUB_NAME, STUB_IP)],
    );
    let mut config = control_config(dir.path());
    config.dns.routes = vec![tern_lab::control::config::DnsRouteConfig {
        suffix: "example.lab".into(),
        resolvers: vec![IpAddr::V4(stub_ip)],
    }];
    let domain = config.domain.clone();
    let _control = start_control_with(&topo, config);
    let c1 = topo.ns("c1").expect("c1");
    std::fs::write(
        std::path::Path::new("/etc/netns")
            .join(c1.name())
            .join("resolv.conf"),
        ORIGINAL,
    )
    .expect("c1's resolv.conf");
    let ta = Node::start(c1, dir.path(), "ta");
    ta.wait_for_api(20);
    ta.up("ta");
    let tsd = CaddyNode::start(
        topo.ns("c2").expect("c2"),
        CaddyConfig::new(
            "tsd",
            &format!("http://{CONTROL_IP}:8080"),
            lab_nodes::AUTH_KEY,
        ),
    )
    .expect("start tsd");
    let logs = || format!("{}\n== tsd\n{}", ta.logs(), tail(&tsd.logs(), 40));
    let tsd_ip: Ipv4Addr = wait("ta sees tsd", 90, logs, || {
        ta.peer_entry("tsd")?["tailnet_ips"][0]
            .as_str()?
            .parse()
            .ok()
    });
    let fqdn = format!("tsd.{domain}.");

    // Full name, any case, and the short name (the tailnet domain is a search domain).
    for name in [fqdn.clone(), fqdn.to_uppercase(), "tsd".to_string()] {
        let answer = wait(&format!("A {name}"), 20, logs, || {
            ask_udp(c1, &name, RecordType::A)
        });
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert_eq!(a_records(&answer), [tsd_ip], "{name}: {answer:?}");
        assert!(answer.metadata.authoritative && answer.metadata.recursion_available);
        assert!(answer.answers.iter().all(|r| r.ttl == 600));
    }
    // PTR back to the name.
    let o = tsd_ip.octets();
    let reverse = format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]);
    let ptr = ask_udp(c1, &reverse, RecordType::PTR).expect("PTR answer");
    let names: Vec<String> = ptr
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(names, std::slice::from_ref(&fqdn), "{ptr:?}");
    // A missing tailnet name.
    let missing = ask_udp(c1, &format!("nope.{domain}."), RecordType::A).expect("answer");
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    // Split DNS: forwarded to the stub on the public segment.
    let forwarded = ask_udp(c1, STUB_NAME, RecordType::A).expect("forwarded answer");
    assert_eq!(a_records(&forwarded), [STUB_IP], "{forwarded:?}");
    // TCP.
    let over_tcp = ask_tcp(c1, &fqdn, RecordType::A).expect("TCP answer");
    assert_eq!(a_records(&over_tcp), [tsd_ip]);
    // ICMP echo to quad-100.
    assert!(ping_once(c1, &QUAD_100.to_string()), "ping 100.100.100.100");
    // The host's resolver (direct mode) points at quad-100: names work through libc.
    let resolv = text(c1, &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("generated by tailscale"), "{resolv}");
    assert!(
        resolv.contains(&format!(
            "nameserver 100.100.100.100\nsearch {domain} example.lab\n"
        )),
        "{resolv}"
    );
    let body = wait("curl by name", 30, logs, || {
        lab_nodes::curl(c1, "GET", &format!("http://tsd.{domain}/"))
    });
    assert_eq!(String::from_utf8_lossy(&body).trim(), "hi");
    let short = text(c1, &["getent", "ahostsv4", "tsd"]);
    assert!(short.starts_with(&tsd_ip.to_string()), "{short}");
    let upstream = text(c1, &["getent", "ahostsv4", "www"]);
    assert!(
        upstream.starts_with(&STUB_IP.to_string()),
        "search domain of the host: {upstream}"
    );
    let dns = ta.status()["dns"].clone();
    assert_eq!(dns["manager"], "direct", "{dns}");
    assert_eq!(dns["nameservers"][0], "100.100.100.100", "{dns}");
    let counted = wait("quad-100's counters in the status", 5, logs, || {
        let quad = ta.status()["data_plane"]["quad100"].clone();
        (quad["udp_queries"].as_u64() >= Some(7) && quad["tcp_queries"].as_u64() >= Some(1))
            .then_some(quad)
    });
    assert_eq!(counted["tcp_aborted"].as_u64(), Some(0), "{counted}");

    // --accept-dns=false gives the host its file back at once; true takes it again.
    let off = ta.cli(&["set", "--accept-dns=false"]);
    assert!(off.status.success(), "{off:?}");
    wait("the host's resolv.conf back", 10, logs, || {
        (text(c1, &["cat", "/etc/resolv.conf"]) == ORIGINAL).then_some(())
    });
    let on = ta.cli(&["set", "--accept-dns"]);
    assert!(on.status.success(), "{on:?}");
    wait("quad-100 in resolv.conf again", 10, logs, || {
        text(c1, &["cat", "/etc/resolv.conf"])
            .contains("100.100.100.100")
            .then_some(())
    });
    assert!(
        !std::path::Path::new(tern::dns::os::BACKUP).exists(),
        "nothing written beside the host's own /etc/resolv.conf"
    );
    // SIGKILL leaves tern's file; the next start puts the original back first.
    let mut ta = ta;
    ta.process
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill ta");
    std::thread::sleep(Duration::from_millis(300));
    assert!(text(c1, &["cat", "/etc/resolv.conf"]).contains("100.100.100.100"));
    let cleanup = c1
        .exec_unchecked(&[env!("CARGO_BIN_EXE_tern"), "daemon", "--cleanup"])
        .expect("cleanup");
    assert!(cleanup.status.success(), "{cleanup:?}");
    assert_eq!(
        text(c1, &["cat", "/etc/resolv.conf"]),
        ORIGINAL,
        "byte for byte"
    );
    // A restarted daemon takes over again, and a clean stop restores byte for byte.
    let mut ta2 = Node::start(c1, dir.path(), "ta");
    ta2.wait_for_api(20);
    wait(
        "quad-100 in resolv.conf after restart",
        30,
        || ta2.logs(),
        || {
            text(c1, &["cat", "/etc/resolv.conf"])
                .contains("100.100.100.100")
                .then_some(())
        },
    );
    ta2.process.stop().expect("stop ta");
    assert_eq!(
        text(c1, &["cat", "/etc/resolv.conf"]),
        ORIGINAL,
        "byte for byte"
    );
    let _ = ta.process.stop();
}

/// c1's resolv.conf before tern: the stub upstream and a search domain of the host's own.
const ORIGINAL: &str = "# c1's own resolver\nnameserver 198.18.0.21\nsearch example.lab\noptions timeout:1 attempts:2\n";

fn text(ns: &Netns, args: &[&str]) -> String {
    let out = ns.exec_unchecked(args).expect("run in namespace");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Quad-100 faces every local program: a flood of idle TCP connections and garbage datagrams
/// leaves it answering, with the connections capped and the garbage counted, never a crash.
#[test]
fn quad_100_survives_idle_connections_and_garbage() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("lab");
    let _derp = start_derp(&topo);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = control_config(dir.path());
    let domain = config.domain.clone();
    let _control = start_control_with(&topo, config);
    let c1 = topo.ns("c1").expect("c1");
    let ta = Node::start(c1, dir.path(), "ta");
    ta.wait_for_api(20);
    ta.up("ta");
    let logs = || ta.logs();
    let own = format!("ta.{domain}.");
    wait("quad-100 answers", 20, logs, || {
        ask_udp(c1, &own, RecordType::A)
    });
    // 60 connections that never send a byte, held open.
    let held = c1
        .run_in(|| {
            let quad = SocketAddr::from((QUAD_100, 53));
            Ok((0..60)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&quad, Duration::from_millis(500)).ok()
                })
                .collect::<Vec<_>>())
        })
        .expect("connect");
    // Garbage: random bytes, a header alone, a compression loop, a response.
    let socket = c1.bind_udp("0.0.0.0:0".parse().unwrap()).expect("udp");
    let quad = SocketAddr::from((QUAD_100, 53));
    for i in 0..200u16 {
        let junk: Vec<u8> = (0..(i % 64)).map(|_| rand::random()).collect();
        let _ = socket.send_to(&junk, quad);
    }
    let _ = socket.send_to(
        &[
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
        ],
        quad,
    );
    let still = ask_udp(c1, &own, RecordType::A).expect("answered after the flood");
    assert_eq!(still.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&still).len(), 1, "{still:?}");
    let tcp = ask_tcp(c1, &own, RecordType::A);
    // The status snapshot refreshes every second.
    let quad100 = wait("the flood in quad-100's counters", 5, logs, || {
        let q = ta.status()["data_plane"]["quad100"].clone();
        (q["udp_queries"].as_u64() >= Some(202)).then_some(q)
    });
    let connections = quad100["tcp_connections"].as_u64().unwrap_or(0);
    let cap = tern::netstack::MAX_TCP;
    assert!(
        (1..=cap).contains(&held.len()) && connections <= cap as u64,
        "connections stay capped at {cap}: {} accepted for the client, {connections} counted, \
         TCP answer {:?}\n{quad100}",
        held.len(),
        tcp.is_some()
    );
    assert!(ta.status()["data_plane"]["active"] == true, "{}", logs());
    drop(held);
}
