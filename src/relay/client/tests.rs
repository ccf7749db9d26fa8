//! The client handshake against our own relay server, all in memory: two clients bind both legs
//! of one endpoint and prove the path with a Ping/Pong through the relay.

use super::*;
use crate::keys::NodePrivate;
use crate::relay::server::{Action, RelayServer};

const RELAY: &str = "198.51.100.7:40000";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

struct Side {
    disco: DiscoPrivate,
    node: NodePublic,
    from: SocketAddr,
}

impl Side {
    fn new(from: &str) -> Side {
        Side {
            disco: DiscoPrivate::generate(),
            node: NodePrivate::generate().public(),
            from: addr(from),
        }
    }
}

/// A relay with an endpoint for (a, b).
fn relay_for(now: Instant, a: &Side, b: &Side) -> (RelayServer, UdpRelayEndpoint) {
    let mut relay = RelayServer::new(now);
    relay.set_addr_ports(vec![addr(RELAY)]);
    let request = disco::AllocateRequest {
        client_disco: [a.disco.public(), b.disco.public()],
        generation: 1,
    };
    let endpoint = relay.allocate(now, &request).expect("allocated");
    (relay, endpoint)
}

/// Moves datagrams between the two handshakes and the relay until nothing is left to send.
fn run(now: Instant, relay: &mut RelayServer, sides: [(&Side, &mut Handshake); 2]) {
    let [(sa, ha), (sb, hb)] = sides;
    for _ in 0..20 {
        let mut outgoing: Vec<(SocketAddr, Transmit)> = Vec::new();
        outgoing.extend(std::iter::from_fn(|| ha.poll_transmit()).map(|t| (sa.from, t)));
        outgoing.extend(std::iter::from_fn(|| hb.poll_transmit()).map(|t| (sb.from, t)));
        if outgoing.is_empty() {
            return;
        }
        for (from, t) in outgoing {
            assert_eq!(t.to, addr(RELAY), "clients only talk to the relay");
            let delivered = match relay.handle_packet(now, from, &t.packet) {
                Action::Reply { to, packet } => Some((to, packet)),
                Action::Forward(to) => Some((to, t.packet)),
                _ => None,
            };
            if let Some((to, packet)) = delivered {
                let target = if to == sa.from { &mut *ha } else { &mut *hb };
                target.handle_packet(now, addr(RELAY), &packet);
            }
        }
    }
}

#[test]
fn both_sides_bind_and_prove_the_path_through_the_relay() {
    let t0 = Instant::now();
    let (a, b) = (Side::new("192.0.2.1:41641"), Side::new("192.0.2.2:41641"));
    let (mut relay, endpoint) = relay_for(t0, &a, &b);
    let mut ha = Handshake::start(t0, &a.disco, a.node, b.disco.public(), endpoint.clone(), 1)
        .expect("start a");
    let mut hb =
        Handshake::start(t0, &b.disco, b.node, a.disco.public(), endpoint.clone(), 9).expect("b");
    run(t0, &mut relay, [(&a, &mut ha), (&b, &mut hb)]);
    for (name, hs) in [("a", &ha), ("b", &hb)] {
        match hs.outcome() {
            Some(Outcome::Bound { via, vni, .. }) => {
                assert_eq!((*via, *vni), (addr(RELAY), endpoint.vni), "{name}")
            }
            other => panic!("{name}: {other:?}, drops {:?}", hs.drops()),
        }
        assert_eq!(hs.state(), State::Done);
        assert_eq!(hs.poll_timeout(), None, "done: no more timers");
    }
    let status = relay.status(t0, 40000);
    assert_eq!(status.sessions.len(), 1);
    assert!(
        status.sessions[0].legs.iter().all(|l| l.bound.is_some()),
        "{status:?}"
    );
}

#[test]
fn one_bind_per_address_and_a_deadline_capped_at_30s() {
    let t0 = Instant::now();
    let (a, b) = (Side::new("192.0.2.1:1"), Side::new("192.0.2.2:2"));
    let (_, mut endpoint) = relay_for(t0, &a, &b);
    endpoint.addr_ports = vec![addr(RELAY), addr("[2001:db8::7]:40000")];
    endpoint.bind_lifetime = Duration::from_secs(3600);
    let mut hs = Handshake::start(t0, &a.disco, a.node, b.disco.public(), endpoint.clone(), 1)
        .expect("start");
    let sent: Vec<SocketAddr> = std::iter::from_fn(|| hs.poll_transmit())
        .map(|t| t.to)
        .collect();
    assert_eq!(sent, endpoint.addr_ports);
    assert_eq!(hs.poll_timeout(), Some(t0 + MAX_HANDSHAKE_LIFETIME));
    hs.handle_timeout(t0 + Duration::from_secs(29));
    assert_eq!(hs.outcome(), None);
    hs.handle_timeout(t0 + MAX_HANDSHAKE_LIFETIME);
    assert_eq!(hs.outcome(), Some(&Outcome::TimedOut));
    assert!(hs.poll_transmit().is_none(), "no retransmission");
}

#[test]
fn endpoints_without_addresses_or_with_bad_vnis_do_not_start() {
    let t0 = Instant::now();
    let (a, b) = (Side::new("192.0.2.1:1"), Side::new("192.0.2.2:2"));
    let (_, endpoint) = relay_for(t0, &a, &b);
    let start = |ep: UdpRelayEndpoint| {
        Handshake::start(t0, &a.disco, a.node, b.disco.public(), ep, 1).err()
    };
    let no_addr = UdpRelayEndpoint {
        addr_ports: vec![],
        ..endpoint.clone()
    };
    assert_eq!(start(no_addr), Some(StartError::NoAddress));
    let bad_vni = UdpRelayEndpoint { vni: 0, ..endpoint };
    assert_eq!(start(bad_vni), Some(StartError::BadVni(0)));
}

/// a's handshake after its Bind, with the relay's real Challenge not yet delivered.
struct Challenged {
    a: Side,
    b: Side,
    endpoint: UdpRelayEndpoint,
    hs: Handshake,
    packet: Vec<u8>,
}

fn challenged(t0: Instant) -> Challenged {
    let (a, b) = (Side::new("192.0.2.1:1"), Side::new("192.0.2.2:2"));
    let (mut relay, endpoint) = relay_for(t0, &a, &b);
    let mut hs = Handshake::start(t0, &a.disco, a.node, b.disco.public(), endpoint.clone(), 1)
        .expect("start");
    let bind = hs.poll_transmit().expect("bind");
    let Action::Reply { packet, .. } = relay.handle_packet(t0, a.from, &bind.packet) else {
        panic!("no challenge");
    };
    Challenged {
        a,
        b,
        endpoint,
        hs,
        packet,
    }
}

#[test]
fn forged_garbage_and_wrong_vni_packets_are_counted_and_ignored() {
    let t0 = Instant::now();
    let Challenged {
        a,
        b,
        endpoint,
        mut hs,
        packet,
    } = challenged(t0);
    // Truncated, another VNI, sealed by a stranger: none of them moves the handshake.
    hs.handle_packet(t0, addr(RELAY), &packet[..5]);
    let mut other_vni = packet.clone();
    other_vni[4..7].copy_from_slice(&[0, 0, 0x63]);
    hs.handle_packet(t0, addr(RELAY), &other_vni);
    let stranger = DiscoPrivate::generate();
    let forged = {
        let body = BindBody {
            vni: endpoint.vni,
            generation: 1,
            remote_key: b.disco.public(),
            challenge: [7; 32],
        };
        let sealed = disco::seal(
            &stranger,
            &a.disco.public(),
            &Message::BindUdpRelayEndpointChallenge(body),
        );
        let mut p = packet[..geneve::HEADER_LEN].to_vec();
        p.extend_from_slice(&sealed);
        p
    };
    hs.handle_packet(t0, addr(RELAY), &forged);
    assert_eq!(hs.state(), State::BindSent);
    assert_eq!(
        hs.drops(),
        Drops {
            malformed: 2,
            bad_box: 1,
            unexpected: 0
        }
    );
    // The real Challenge still works, and only once.
    hs.handle_packet(t0, addr(RELAY), &packet);
    assert_eq!(hs.state(), State::AnswerSent(addr(RELAY)));
    hs.handle_packet(t0, addr(RELAY), &packet);
    assert_eq!(hs.drops().unexpected, 1, "a second Challenge is ignored");
}

#[test]
fn a_relayed_ping_always_gets_a_pong_and_pings_are_capped() {
    let t0 = Instant::now();
    let Challenged {
        a,
        b,
        endpoint,
        mut hs,
        packet,
    } = challenged(t0);
    hs.handle_packet(t0, addr(RELAY), &packet);
    let _answer_and_ping: Vec<Transmit> = std::iter::from_fn(|| hs.poll_transmit()).collect();
    // The peer pings through the relay 12 times: 12 Pongs, but at most 10 pings of ours.
    let peer_ping = |n: u8| {
        let msg = Message::Ping(Ping {
            tx_id: TxId([n; 12]),
            node_key: Some(b.node),
            padding: 0,
        });
        let sealed = disco::seal(&b.disco, &a.disco.public(), &msg);
        let mut p = Header {
            version: 0,
            protocol: PROTOCOL_DISCO,
            control: false,
            vni: Vni::new(endpoint.vni),
        }
        .to_bytes()
        .expect("header")
        .to_vec();
        p.extend_from_slice(&sealed);
        p
    };
    let mut pongs = 0;
    let mut pings = 0;
    for n in 0..12 {
        hs.handle_packet(t0, addr(RELAY), &peer_ping(n));
        while let Some(t) = hs.poll_transmit() {
            let frame = disco::parse_packet(&t.packet[geneve::HEADER_LEN..]).expect("frame");
            match disco::open(&disco::shared_box(&b.disco, &a.disco.public()), &frame) {
                Ok(Message::Pong(p)) => {
                    assert_eq!(p.tx_id, TxId([n; 12]));
                    pongs += 1;
                }
                Ok(Message::Ping(_)) => pings += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(pongs, 12);
    assert_eq!(pings + 1, MAX_PINGS, "one ping went with the Answer");
}

#[test]
fn an_allocation_is_sent_twice_then_given_up_and_accepts_only_its_answer() {
    let t0 = Instant::now();
    let (a, b) = (Side::new("192.0.2.1:1"), Side::new("192.0.2.2:2"));
    let relay_node = NodePrivate::generate().public();
    let mut alloc = Allocation::new(t0, relay_node, b.disco.public(), a.disco.public(), 7);
    let Some(AllocStep::Send { relay, request }) = alloc.poll(t0) else {
        panic!("the first request is due at once");
    };
    assert_eq!(relay, relay_node);
    let mut sorted = [a.disco.public(), b.disco.public()];
    sorted.sort();
    assert_eq!((request.client_disco, request.generation), (sorted, 7));
    assert_eq!(alloc.poll(t0 + Duration::from_secs(1)), None);
    assert_eq!(alloc.next_deadline(), t0 + ALLOC_RETRY_AFTER);
    assert!(matches!(
        alloc.poll(t0 + ALLOC_RETRY_AFTER),
        Some(AllocStep::Send { .. })
    ));
    assert_eq!(
        alloc.poll(t0 + Duration::from_secs(5)),
        None,
        "one retransmission only"
    );
    assert_eq!(alloc.next_deadline(), t0 + ALLOC_TIMEOUT);
    assert_eq!(alloc.poll(t0 + ALLOC_TIMEOUT), Some(AllocStep::GaveUp));

    // The answer must come from that relay, for that generation and pair, with an address.
    let (_server, endpoint) = relay_for(t0, &a, &b);
    let answer = disco::AllocateResponse {
        generation: 7,
        endpoint: endpoint.clone(),
    };
    assert_eq!(alloc.accept(&relay_node, &answer), Some(endpoint.clone()));
    let stranger = NodePrivate::generate().public();
    assert_eq!(alloc.accept(&stranger, &answer), None);
    let old = disco::AllocateResponse {
        generation: 6,
        ..answer.clone()
    };
    assert_eq!(alloc.accept(&relay_node, &old), None);
    let other_pair = disco::AllocateResponse {
        endpoint: UdpRelayEndpoint {
            client_disco: [a.disco.public(), DiscoPrivate::generate().public()],
            ..endpoint.clone()
        },
        ..answer.clone()
    };
    assert_eq!(alloc.accept(&relay_node, &other_pair), None);
    let no_addr = disco::AllocateResponse {
        endpoint: UdpRelayEndpoint {
            addr_ports: vec![],
            ..endpoint
        },
        ..answer
    };
    assert_eq!(alloc.accept(&relay_node, &no_addr), None);
}
