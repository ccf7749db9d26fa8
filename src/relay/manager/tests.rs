//! Two relay managers and our relay server, all in memory: allocation over "DERP",
//! CallMeMaybeVia, both bind handshakes, and the drops and dedup rules.

use std::time::Duration;

use super::*;
use crate::keys::NodePrivate;
use crate::relay::server::{Action, RelayServer};

const RELAY: &str = "198.51.100.7:40000";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

struct Side {
    private: DiscoPrivate,
    node: NodePublic,
    disco: DiscoPublic,
    from: SocketAddr,
    manager: RelayManager,
    ready: Vec<(NodePublic, RelayPath)>,
    failed: Vec<(NodePublic, RelayReason)>,
    /// Relayed disco the manager left to the path machines.
    not_mine: usize,
}

impl Side {
    fn new(from: &str, relay: NodePublic) -> Side {
        let disco = DiscoPrivate::generate();
        let node = NodePrivate::generate().public();
        let mut manager = RelayManager::new(disco.clone(), node);
        let disco_public = disco.public();
        manager.set_candidates([relay].into());
        Side {
            private: disco,
            node,
            disco: disco_public,
            from: addr(from),
            manager,
            ready: Vec::new(),
            failed: Vec::new(),
            not_mine: 0,
        }
    }
}

impl Side {
    /// What the path machines do with a relayed ping no handshake took: a pong back through
    /// the relay.
    fn path_machine_pong(&self, datagram: &[u8]) -> Transmit {
        let header = geneve::parse(datagram).expect("geneve");
        let frame = disco::parse_packet(&datagram[geneve::HEADER_LEN..]).expect("disco");
        let shared = disco::shared_box(&self.private, &frame.sender);
        let Ok(Message::Ping(ping)) = disco::open(&shared, &frame) else {
            panic!("only pings are left to the path machines here");
        };
        let pong = Message::Pong(disco::Pong {
            tx_id: ping.tx_id,
            src: addr(RELAY),
        });
        let mut packet = header.to_bytes().expect("header").to_vec();
        packet.extend(disco::seal_with(&shared, &self.disco, &pong));
        Transmit {
            to: addr(RELAY),
            packet,
        }
    }
}

struct World {
    now: Instant,
    relay_node: NodePublic,
    relay: RelayServer,
    sides: [Side; 2],
    /// Allocation requests the relay saw.
    alloc_requests: usize,
    udp_to_relay: usize,
}

impl World {
    fn new() -> World {
        let now = Instant::now();
        let relay_node = NodePrivate::generate().public();
        let mut relay = RelayServer::new(now);
        relay.set_addr_ports(vec![addr(RELAY)]);
        World {
            now,
            relay_node,
            relay,
            sides: [
                Side::new("192.0.2.1:41641", relay_node),
                Side::new("192.0.2.2:41641", relay_node),
            ],
            alloc_requests: 0,
            udp_to_relay: 0,
        }
    }

    /// The relay's endpoint for the two sides (as their allocation would get it).
    fn pair_endpoint(&mut self) -> UdpRelayEndpoint {
        let request = disco::AllocateRequest {
            client_disco: [self.sides[0].disco, self.sides[1].disco],
            generation: 1,
        };
        self.relay.allocate(self.now, &request).expect("allocated")
    }

    /// Delivers every step until none is left.
    fn run(&mut self) {
        for _ in 0..50 {
            let mut moved = false;
            for i in 0..2 {
                while let Some(step) = self.sides[i].manager.poll() {
                    moved = true;
                    self.deliver(i, step);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("steps kept coming");
    }

    fn deliver(&mut self, i: usize, step: Step) {
        let (now, other) = (self.now, 1 - i);
        match step {
            Step::Derp {
                to,
                msg: Message::AllocateUdpRelayEndpointRequest(request),
            } => {
                assert_eq!(to, self.relay_node);
                self.alloc_requests += 1;
                let endpoint = self.relay.allocate(now, &request).expect("allocated");
                let response = AllocateResponse {
                    generation: request.generation,
                    endpoint,
                };
                let relay_node = self.relay_node;
                self.sides[i]
                    .manager
                    .on_alloc_response(now, relay_node, &response, |_| None);
            }
            Step::Derp {
                to,
                msg: Message::CallMeMaybeVia(endpoint),
            } => {
                assert_eq!(to, self.sides[other].node);
                let (node, disco) = (self.sides[i].node, self.sides[i].disco);
                self.sides[other]
                    .manager
                    .on_call_me_maybe_via(now, node, disco, endpoint, None);
            }
            Step::Derp { msg, .. } => panic!("unexpected DERP message {msg:?}"),
            Step::Udp(t) => {
                assert_eq!(t.to, addr(RELAY));
                self.udp_to_relay += 1;
                let from = self.sides[i].from;
                let delivered = match self.relay.handle_packet(now, from, &t.packet) {
                    Action::Reply { to, packet } => Some((to, packet)),
                    Action::Forward(to) => Some((to, t.packet)),
                    _ => None,
                };
                if let Some((to, packet)) = delivered {
                    let target = if to == self.sides[0].from { 0 } else { 1 };
                    let side = &mut self.sides[target];
                    if side.manager.handle_geneve(now, addr(RELAY), &packet) == Handled::NotMine {
                        side.not_mine += 1;
                        let pong = side.path_machine_pong(&packet);
                        self.deliver(target, Step::Udp(pong));
                    }
                }
            }
            Step::Ready { peer, path } => self.sides[i].ready.push((peer, path)),
            Step::Failed { peer, reason } => self.sides[i].failed.push((peer, reason)),
        }
    }
}

#[test]
fn an_allocation_becomes_a_relay_path_on_both_sides() {
    let mut w = World::new();
    let (b_node, b_disco) = (w.sides[1].node, w.sides[1].disco);
    w.sides[0].manager.discover(w.now, b_node, b_disco);
    w.run();
    assert_eq!(w.alloc_requests, 1);
    for (i, side) in w.sides.iter().enumerate() {
        let other = w.sides[1 - i].node;
        let [(peer, path)] = side.ready.as_slice() else {
            panic!("side {i}: {:?} / {:?}", side.ready, side.failed);
        };
        assert_eq!(*peer, other);
        assert_eq!(
            path.addr,
            RelayAddr {
                via: addr(RELAY),
                vni: 1
            }
        );
        assert_eq!(path.server_disco, w.relay.disco_public());
        assert!(side.failed.is_empty());
        assert!(
            side.not_mine <= 1,
            "side {i}: {} pings after its handshake",
            side.not_mine
        );
        assert_eq!(side.manager.pending(), (0, 0), "side {i}: work finished");
    }
    // Only the side that allocated knows the relay's node.
    assert_eq!(w.sides[0].ready[0].1.relay_node, Some(w.relay_node));
    assert_eq!(w.sides[1].ready[0].1.relay_node, None);
    let status = w.relay.status(w.now, 40000);
    assert!(status.sessions[0].legs.iter().all(|l| l.bound.is_some()));
}

#[test]
fn an_unanswered_allocation_is_sent_twice_then_fails() {
    let mut w = World::new();
    let (b_node, b_disco) = (w.sides[1].node, w.sides[1].disco);
    let a = &mut w.sides[0].manager;
    a.discover(w.now, b_node, b_disco);
    let sent = |m: &mut RelayManager| std::iter::from_fn(|| m.poll()).collect::<Vec<_>>();
    assert_eq!(sent(a).len(), 1);
    // A second discovery while the first runs asks nobody again.
    a.discover(w.now, b_node, b_disco);
    assert!(sent(a).is_empty());
    assert_eq!(a.poll_timeout(), Some(w.now + Duration::from_secs(3)));
    a.handle_timeout(w.now + Duration::from_secs(3));
    assert!(matches!(
        sent(a).as_slice(),
        [Step::Derp {
            msg: Message::AllocateUdpRelayEndpointRequest(_),
            ..
        }]
    ));
    a.handle_timeout(w.now + Duration::from_secs(9));
    assert!(sent(a).is_empty());
    a.handle_timeout(w.now + Duration::from_secs(10));
    assert_eq!(
        sent(a),
        vec![Step::Failed {
            peer: b_node,
            reason: RelayReason::AllocationFailed
        }]
    );
    assert_eq!(a.poll_timeout(), None);
}

#[test]
fn responses_from_the_wrong_node_or_generation_are_dropped_and_counted() {
    let mut w = World::new();
    let (b_node, b_disco) = (w.sides[1].node, w.sides[1].disco);
    let a = &mut w.sides[0].manager;
    a.discover(w.now, b_node, b_disco);
    let Some(Step::Derp {
        msg: Message::AllocateUdpRelayEndpointRequest(request),
        ..
    }) = a.poll()
    else {
        panic!("an allocation request");
    };
    let endpoint = w.relay.allocate(w.now, &request).expect("allocated");
    let good = AllocateResponse {
        generation: request.generation,
        endpoint,
    };
    let stranger = NodePrivate::generate().public();
    a.on_alloc_response(w.now, stranger, &good, |_| None);
    let stale = AllocateResponse {
        generation: request.generation + 1,
        ..good.clone()
    };
    a.on_alloc_response(w.now, w.relay_node, &stale, |_| None);
    assert!(a.poll().is_none(), "nothing bound from a bad response");
    assert_eq!(a.drops().unsolicited_response, 2);
    a.on_alloc_response(w.now, w.relay_node, &good, |_| None);
    assert!(matches!(
        a.poll(),
        Some(Step::Derp {
            msg: Message::CallMeMaybeVia(_),
            ..
        })
    ));
}

#[test]
fn endpoints_are_deduplicated_by_lamport_id_and_the_relay_in_use_is_not_rebound() {
    let mut w = World::new();
    let (a_node, a_disco) = (w.sides[0].node, w.sides[0].disco);
    let endpoint = w.pair_endpoint();
    let b = &mut w.sides[1].manager;
    let binds = |m: &mut RelayManager| {
        std::iter::from_fn(|| m.poll())
            .filter(|s| matches!(s, Step::Udp(_)))
            .count()
    };
    b.on_call_me_maybe_via(w.now, a_node, a_disco, endpoint.clone(), None);
    assert_eq!(binds(b), 1);
    // The same endpoint again (A's CallMeMaybeVia and our own allocation both bring it).
    b.on_call_me_maybe_via(w.now, a_node, a_disco, endpoint.clone(), None);
    assert_eq!(binds(b), 0);
    // A newer allocation on that relay replaces the handshake.
    let newer = UdpRelayEndpoint {
        lamport_id: endpoint.lamport_id + 1,
        ..endpoint.clone()
    };
    b.on_call_me_maybe_via(w.now, a_node, a_disco, newer.clone(), None);
    assert_eq!(binds(b), 1);
    assert_eq!(b.pending(), (0, 1));
    // The relay server our trusted path already uses is not bound again.
    let mut c = RelayManager::new(DiscoPrivate::generate(), a_node);
    let in_use = Some((endpoint.server_disco, true));
    c.on_call_me_maybe_via(w.now, a_node, a_disco, newer, in_use);
    assert_eq!(binds(&mut c), 0);
}

#[test]
fn stray_and_malformed_geneve_is_counted_and_relayed_disco_is_left_to_the_paths() {
    let mut w = World::new();
    let a = &mut w.sides[0].manager;
    assert_eq!(
        a.handle_geneve(w.now, addr(RELAY), b"short"),
        Handled::Consumed
    );
    let header = geneve::Header {
        version: 0,
        protocol: geneve::PROTOCOL_DISCO,
        control: true,
        vni: geneve::Vni::new(7),
    };
    let stranger = DiscoPrivate::generate();
    let ping = Message::Ping(disco::Ping {
        tx_id: disco::TxId([3; 12]),
        node_key: None,
        padding: 0,
    });
    let mut control = header.to_bytes().expect("header").to_vec();
    control.extend(disco::seal(&stranger, &w.sides[0].disco, &ping));
    assert_eq!(
        a.handle_geneve(w.now, addr(RELAY), &control),
        Handled::Consumed
    );
    let mut data = geneve::Header {
        control: false,
        ..header
    }
    .to_bytes()
    .expect("header")
    .to_vec();
    data.extend(disco::seal(&stranger, &w.sides[0].disco, &ping));
    assert_eq!(a.handle_geneve(w.now, addr(RELAY), &data), Handled::NotMine);
    let drops = a.drops();
    assert_eq!((drops.malformed, drops.unknown_control), (1, 1));
    assert!(a.poll().is_none(), "nothing is answered");
}

#[test]
fn an_unusable_endpoint_does_not_cancel_a_running_handshake() {
    let mut w = World::new();
    let (a_node, a_disco) = (w.sides[0].node, w.sides[0].disco);
    let endpoint = w.pair_endpoint();
    let b = &mut w.sides[1].manager;
    b.on_call_me_maybe_via(w.now, a_node, a_disco, endpoint.clone(), None);
    assert_eq!(b.pending(), (0, 1));
    while b.poll().is_some() {}
    for bad in [
        UdpRelayEndpoint {
            lamport_id: endpoint.lamport_id + 1,
            addr_ports: Vec::new(),
            ..endpoint.clone()
        },
        UdpRelayEndpoint {
            lamport_id: endpoint.lamport_id + 1,
            vni: 0,
            ..endpoint.clone()
        },
    ] {
        b.on_call_me_maybe_via(w.now, a_node, a_disco, bad, None);
        assert_eq!(b.pending(), (0, 1), "the running handshake stays");
        assert!(b.poll().is_none());
    }
    // When it times out, one Failed.
    b.handle_timeout(w.now + Duration::from_secs(31));
    let steps: Vec<Step> = std::iter::from_fn(|| b.poll()).collect();
    assert_eq!(
        steps,
        vec![Step::Failed {
            peer: a_node,
            reason: RelayReason::BindTimeout
        }]
    );
}

#[test]
fn shared_keys_are_kept_per_disco_key_and_bounded() {
    let mut m = RelayManager::new(DiscoPrivate::generate(), NodePrivate::generate().public());
    let keys: Vec<DiscoPublic> = (0..MAX_BOXES + 10)
        .map(|_| DiscoPrivate::generate().public())
        .collect();
    m.prime(&keys[..3]);
    m.prime(&keys[..3]);
    assert_eq!(m.boxes.len(), 3, "one per key");
    m.prime(&keys);
    assert!(m.boxes.len() <= MAX_BOXES, "{}", m.boxes.len());
    // A clone shares nothing mutable: its work is its own.
    let mut c = m.clone();
    c.set_candidates([NodePrivate::generate().public()].into());
    assert!(m.candidates().is_empty());
}
