//! Every NAT mode, seen from behind it: STUN from c1 to 2 hosts x 2 addresses shows the mapping the
//! mode promises, and unsolicited inbound UDP is dropped or forwarded as the mode says. Then the
//! hole-punch matrix, done like disco.

mod support;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use support::{drain, punch, require_root, stun_query, StunServer, TcpSink};
use tern_lab::nat::PORTFWD_PORT;
use tern_lab::topology::{RELAY_IPS, SERVER_IPS};
use tern_lab::{NatMode, Topology};

const STUN_PORT: u16 = 3478;

fn stun_addrs() -> Vec<SocketAddr> {
    RELAY_IPS
        .iter()
        .chain(&SERVER_IPS)
        .map(|ip| SocketAddr::from((*ip, STUN_PORT)))
        .collect()
}

/// STUN servers on relay (.10, .11) and server (.20, .21).
fn stun_servers(topo: &Topology) -> (StunServer, StunServer) {
    let all = stun_addrs();
    (
        StunServer::start(topo.ns("relay").unwrap(), &all[..2]),
        StunServer::start(topo.ns("server").unwrap(), &all[2..]),
    )
}

/// What c1 learned: its local port, the 4 mappings, and whether an unsolicited packet from the
/// server host reached it.
struct Observed {
    local_port: u16,
    mapped: Vec<Option<SocketAddr>>,
    unsolicited_arrived: bool,
}

/// Bind c1's socket on `port`, STUN to all four addresses, then have the server host send an
/// unsolicited packet from a fresh port to c1's first mapping (or the NAT's WAN address), and use a
/// STUN round trip on the same path as a barrier: if the probe has not arrived by then, it was dropped.
fn observe(topo: &Topology, port: u16) -> Observed {
    let _servers = stun_servers(topo);
    let c1 = topo.ns("c1").unwrap();
    let sock = c1
        .bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .unwrap();
    let local_port = sock.local_addr().unwrap().port();
    let mut others = Vec::new();
    let mapped: Vec<_> = stun_addrs()
        .into_iter()
        .map(|server| stun_query(&sock, server, &mut others))
        .collect();

    let wan = topo.site("c1").unwrap().wan_ip;
    let target = mapped[0].unwrap_or(SocketAddr::from((wan, local_port)));
    let prober = topo
        .ns("server")
        .unwrap()
        .bind_udp(SocketAddr::from((SERVER_IPS[1], 0)))
        .unwrap();
    prober.send_to(b"unsolicited", target).unwrap();
    let barrier = stun_query(&sock, stun_addrs()[3], &mut others);
    if barrier.is_none() {
        // No UDP gets through (udpblock): wait a bounded while instead.
        others.extend(drain(&sock, Duration::from_millis(500)));
    }
    let unsolicited_arrived = others.iter().any(|(data, _)| data == b"unsolicited");
    Observed {
        local_port,
        mapped,
        unsolicited_arrived,
    }
}

fn site_topology(mode: NatMode) -> Topology {
    require_root();
    Topology::standard_unique(mode, NatMode::Easy).expect("build lab")
}

#[test]
fn easy_nat_keeps_one_mapping_for_all_destinations() {
    let topo = site_topology(NatMode::Easy);
    let seen = observe(&topo, 0);
    let wan = topo.site("c1").unwrap().wan_ip;
    let want = SocketAddr::from((wan, seen.local_port));
    assert_eq!(
        seen.mapped,
        vec![Some(want); 4],
        "easy NAT: same external port everywhere"
    );
    assert!(
        !seen.unsolicited_arrived,
        "easy NAT must filter unsolicited inbound UDP"
    );
}

#[test]
fn hard_nat_maps_each_destination_to_its_own_port() {
    let topo = site_topology(NatMode::Hard);
    let seen = observe(&topo, 0);
    let wan = IpAddr::V4(topo.site("c1").unwrap().wan_ip);
    let mapped: Vec<SocketAddr> = seen
        .mapped
        .iter()
        .map(|m| m.expect("STUN answer"))
        .collect();
    assert!(mapped.iter().all(|m| m.ip() == wan), "{mapped:?}");
    let ports: HashSet<u16> = mapped.iter().map(|m| m.port()).collect();
    assert_eq!(
        ports.len(),
        4,
        "hard NAT: a different port per destination: {mapped:?}"
    );
    assert!(
        !seen.unsolicited_arrived,
        "hard NAT must filter unsolicited inbound UDP"
    );
}

#[test]
fn fw_mode_does_not_translate_and_drops_unsolicited_udp() {
    let topo = site_topology(NatMode::Fw);
    let seen = observe(&topo, 0);
    let client = topo.site("c1").unwrap().client_ip;
    let want = SocketAddr::from((client, seen.local_port));
    assert_eq!(seen.mapped, vec![Some(want); 4], "fw: no NAT");
    assert!(
        !seen.unsolicited_arrived,
        "fw must drop unsolicited inbound UDP"
    );
}

#[test]
fn none_mode_routes_untranslated_and_unfiltered() {
    let topo = site_topology(NatMode::None);
    let seen = observe(&topo, 0);
    let client = topo.site("c1").unwrap().client_ip;
    let want = SocketAddr::from((client, seen.local_port));
    assert_eq!(seen.mapped, vec![Some(want); 4], "none: no NAT");
    assert!(
        seen.unsolicited_arrived,
        "none: no filtering, the probe must arrive"
    );
}

#[test]
fn udpblock_gets_no_stun_answer_but_tcp_works() {
    let topo = site_topology(NatMode::Udpblock);
    let seen = observe(&topo, 0);
    assert_eq!(seen.mapped, vec![None; 4], "udpblock: no UDP answer");
    assert!(!seen.unsolicited_arrived);
    let server_addr = SocketAddr::from((SERVER_IPS[0], 8081));
    let _sink = TcpSink::start(topo.ns("server").unwrap().bind_tcp(server_addr).unwrap());
    let connected = topo
        .ns("c1")
        .unwrap()
        .run_in(move || {
            Ok(TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)).map(|_| ()))
        })
        .unwrap();
    assert!(
        connected.is_ok(),
        "udpblock must let TCP out: {connected:?}"
    );
}

#[test]
fn portfwd_forwards_unsolicited_udp_to_41641() {
    let topo = site_topology(NatMode::Portfwd);
    let seen = observe(&topo, PORTFWD_PORT);
    let wan = topo.site("c1").unwrap().wan_ip;
    let want = SocketAddr::from((wan, PORTFWD_PORT));
    assert_eq!(
        seen.mapped,
        vec![Some(want); 4],
        "portfwd: easy mapping of 41641"
    );
    assert!(
        seen.unsolicited_arrived,
        "portfwd must forward inbound UDP to 41641"
    );
}

#[test]
fn switching_mode_at_run_time_changes_the_mapping() {
    let mut topo = site_topology(NatMode::Easy);
    let easy = observe(&topo, 0);
    let easy_ports: HashSet<_> = easy.mapped.iter().map(|m| m.map(|a| a.port())).collect();
    assert_eq!(easy_ports.len(), 1, "{:?}", easy.mapped);
    topo.set_nat_mode("nat1", NatMode::Hard).unwrap();
    assert_eq!(topo.site("nat1").unwrap().mode, NatMode::Hard);
    let hard = observe(&topo, 0);
    let hard_ports: HashSet<_> = hard.mapped.iter().map(|m| m.map(|a| a.port())).collect();
    assert_eq!(hard_ports.len(), 4, "{:?}", hard.mapped);
    topo.set_nat_mode("nat1", NatMode::Fw).unwrap();
    let fw = observe(&topo, 0);
    let client = topo.site("c1").unwrap().client_ip;
    assert_eq!(
        fw.mapped[0],
        Some(SocketAddr::from((client, fw.local_port)))
    );
}

/// Both clients STUN from :41641 to the server host, swap mappings (falling back to their local
/// address when STUN gets no answer), then punch for 3 s. True if each heard the other.
fn punches(m1: NatMode, m2: NatMode) -> bool {
    require_root();
    let topo = Topology::standard_unique(m1, m2).expect("build lab");
    let _servers = stun_servers(&topo);
    let stun_server = SocketAddr::from((SERVER_IPS[0], STUN_PORT));
    let mut sides = Vec::new();
    for client in ["c1", "c2"] {
        let sock = topo
            .ns(client)
            .unwrap()
            .bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORTFWD_PORT)))
            .unwrap();
        let local = SocketAddr::from((topo.site(client).unwrap().client_ip, PORTFWD_PORT));
        let mapped = stun_query(&sock, stun_server, &mut Vec::new()).unwrap_or(local);
        sides.push((sock, mapped));
    }
    let (sock2, mapped2) = sides.pop().unwrap();
    let (sock1, mapped1) = sides.pop().unwrap();
    let side1 = std::thread::spawn(move || punch(sock1, "punch c1", mapped2, 30));
    let side2 = std::thread::spawn(move || punch(sock2, "punch c2", mapped1, 30));
    let (r1, r2) = (side1.join().unwrap(), side2.join().unwrap());
    eprintln!("{m1}x{m2}: c1 {r1:?}, c2 {r2:?}");
    r1.received > 0 && r2.received > 0
}

#[test]
fn punch_easy_easy_succeeds() {
    assert!(punches(NatMode::Easy, NatMode::Easy));
}

#[test]
fn punch_fw_easy_succeeds() {
    assert!(punches(NatMode::Fw, NatMode::Easy));
}

#[test]
fn punch_fw_fw_succeeds() {
    assert!(punches(NatMode::Fw, NatMode::Fw));
}

#[test]
fn punch_portfwd_hard_succeeds() {
    assert!(punches(NatMode::Portfwd, NatMode::Hard));
}

#[test]
fn punch_easy_hard_fails() {
    assert!(!punches(NatMode::Easy, NatMode::Hard));
}

#[test]
fn punch_hard_hard_fails() {
    assert!(!punches(NatMode::Hard, NatMode::Hard));
}

#[test]
fn punch_fw_hard_fails() {
    assert!(!punches(NatMode::Fw, NatMode::Hard));
}

#[test]
fn punch_udpblock_easy_fails() {
    assert!(!punches(NatMode::Udpblock, NatMode::Easy));
}
