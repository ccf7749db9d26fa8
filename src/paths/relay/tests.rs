//! The relay side of one peer's path machine: when discovery is asked for, how a relay path
//! is installed, kept, lost and beaten by a direct path, and the reasons status shows.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::disco::{Message, Ping, Pong, TxId};
use crate::paths::{LocalNet, Path, PathReason, PathSource, PeerInfo, SendPlan, Transmit};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

const RELAY: &str = "198.51.100.9:40000";
const PEER_EP: &str = "203.0.113.2:41641";

fn relay_addr() -> RelayAddr {
    RelayAddr {
        via: addr(RELAY),
        vni: 7,
    }
}

fn relay_path(latency_ms: u64) -> RelayPath {
    RelayPath {
        addr: relay_addr(),
        server_disco: DiscoPublic::from_bytes([77; 32]),
        relay_node: Some(NodePublic::from_bytes([9; 32])),
        latency: Duration::from_millis(latency_ms),
    }
}

/// A peer behind a hard NAT (its endpoint never answers) with relay candidates.
fn peer(now: Instant) -> Peer {
    let local = LocalNet {
        node_key: NodePublic::from_bytes([1; 32]),
        endpoints: vec![addr("192.0.2.1:41641")],
        udp_working: Some(true),
        mapping_varies: Some(true),
    };
    let info = PeerInfo {
        node_key: NodePublic::from_bytes([2; 32]),
        disco_key: DiscoPublic::from_bytes([102; 32]),
        home_derp: Some(900),
        endpoints: vec![addr(PEER_EP)],
        mapping_varies: Some(true),
        udp_working: Some(true),
        relay_capable: true,
    };
    let mut p = Peer::new(now, local, info);
    p.set_relay_candidates(now, true);
    p
}

fn events(p: &mut Peer) -> Vec<Event> {
    std::iter::from_fn(|| p.poll_event()).collect()
}

fn drain(p: &mut Peer) -> Vec<Transmit> {
    std::iter::from_fn(|| p.poll_transmit()).collect()
}

fn wants_relay(p: &mut Peer) -> bool {
    events(p).contains(&Event::WantRelayPaths)
}

/// The relayed heartbeat pings among `out`.
fn relay_pings(out: &[Transmit]) -> Vec<TxId> {
    out.iter()
        .filter(|t| t.dest == Dest::Relay(relay_addr()))
        .filter_map(|t| match &t.msg {
            Message::Ping(ping) => Some(ping.tx_id),
            _ => None,
        })
        .collect()
}

#[test]
fn discovery_is_asked_for_at_most_every_30s_and_only_when_it_can_help() {
    let t0 = Instant::now();
    let mut p = peer(t0);
    assert!(!wants_relay(&mut p), "no traffic, no discovery");
    p.on_outgoing(t0);
    assert!(wants_relay(&mut p), "the first send asks at once");
    p.on_outgoing(t0 + Duration::from_secs(29));
    assert!(!wants_relay(&mut p));
    p.on_outgoing(t0 + DISCOVER_RELAY_INTERVAL);
    assert!(wants_relay(&mut p));

    // No candidate, or a peer too old for relays: never.
    let mut lonely = peer(t0);
    lonely.set_relay_candidates(t0, false);
    lonely.on_outgoing(t0);
    assert!(!wants_relay(&mut lonely));
    assert_eq!(lonely.relay_reason(t0), Some(RelayReason::NoRelayGranted));
    let mut old = peer(t0);
    old.info.relay_capable = false;
    old.on_outgoing(t0);
    assert!(!wants_relay(&mut old));
    assert_eq!(old.relay_reason(t0), Some(RelayReason::PeerNotRelayCapable));
}

#[test]
fn a_disabled_relay_client_asks_no_relay_and_says_why() {
    let t0 = Instant::now();
    let mut p = peer(t0);
    p.set_relay_client_disabled(t0, true);
    p.on_outgoing(t0);
    assert!(!wants_relay(&mut p), "disable-relay-client: no discovery");
    assert_eq!(p.relay_reason(t0), Some(RelayReason::ClientDisabled));
    assert_eq!(
        RelayReason::ClientDisabled.as_str(),
        "relay-client-disabled"
    );
    // Control lifts the attribute: the next send asks again.
    let t1 = t0 + Duration::from_secs(1);
    p.set_relay_client_disabled(t1, false);
    p.on_outgoing(t1);
    assert!(wants_relay(&mut p));
    assert_eq!(p.relay_reason(t1), Some(RelayReason::Discovering));
}

#[test]
fn a_ready_relay_carries_traffic_alone_and_heartbeats_keep_it() {
    let t0 = Instant::now();
    let mut p = peer(t0);
    p.on_outgoing(t0);
    events(&mut p);
    assert_eq!(p.relay_reason(t0), Some(RelayReason::Discovering));
    assert!(p.relay_ready(t0, relay_path(12)));
    assert_eq!(
        p.send_plan(t0),
        SendPlan {
            udp: None,
            derp: None,
            relay: Some(relay_addr())
        }
    );
    assert!(matches!(p.current_path(), Path::PeerRelay { relay, .. } if relay == relay_addr()));
    assert_eq!(p.path_reason(), PathReason::PeerRelay);
    assert_eq!(p.relay_reason(t0), None);
    // Heartbeats every 3 s go through the relay; each pong extends trust by 5 s.
    let mut now = t0;
    for _ in 0..10 {
        now += Duration::from_secs(3);
        p.on_outgoing(now);
        p.handle_timeout(now);
        let tx = *relay_pings(&drain(&mut p))
            .last()
            .expect("a relayed heartbeat");
        let pong = Message::Pong(Pong {
            tx_id: tx,
            src: addr("192.0.2.1:41641"),
        });
        p.handle_disco(now, PathSource::Relay(relay_addr()), pong);
        assert!(p.relay_trusted(now + RELAY_TRUST_DURATION - Duration::from_millis(1)));
    }
    assert!(matches!(p.current_path(), Path::PeerRelay { .. }));
    // Rediscovery while the relay works: only every 60 s.
    events(&mut p);
    p.on_outgoing(t0 + Duration::from_secs(31));
    assert!(!wants_relay(&mut p));
}

#[test]
fn a_silent_relay_falls_back_to_derp_within_5s_then_is_given_up() {
    let t0 = Instant::now();
    let mut p = peer(t0);
    p.on_outgoing(t0);
    p.relay_ready(t0, relay_path(12));
    drain(&mut p);
    // No pongs any more: at 5 s DERP joins the relay in the send plan.
    let lapse = t0 + RELAY_TRUST_DURATION;
    p.handle_timeout(lapse);
    assert_eq!(
        p.send_plan(lapse),
        SendPlan {
            udp: None,
            derp: Some(900),
            relay: Some(relay_addr())
        }
    );
    assert!(matches!(p.current_path(), Path::Derp { region: 900 }));
    // The heartbeat ping through the relay times out: the relay is given up.
    let mut now = lapse;
    while p.relay_path().is_some() && now < t0 + Duration::from_secs(20) {
        now += Duration::from_millis(500);
        p.on_outgoing(now);
        p.handle_timeout(now);
    }
    assert_eq!(p.relay_path(), None, "given up by {:?}", now - t0);
    assert_eq!(p.path_reason(), PathReason::RelayLost);
    assert_eq!(p.relay_reason(now), Some(RelayReason::Unreachable));
    assert_eq!(p.send_plan(now).relay, None);
    let history: Vec<PathReason> = p.history().map(|c| c.reason).collect();
    assert!(history.contains(&PathReason::PeerRelay), "{history:?}");
    assert_eq!(history.last(), Some(&PathReason::RelayLost));
}

#[test]
fn a_direct_pong_beats_the_relay_and_a_trusted_direct_path_refuses_one() {
    let t0 = Instant::now();
    let mut p = peer(t0);
    p.on_outgoing(t0);
    let direct_ping = drain(&mut p)
        .into_iter()
        .find_map(|t| match (t.dest, t.msg) {
            (Dest::Direct(to), Message::Ping(ping)) if to == addr(PEER_EP) => Some(ping.tx_id),
            _ => None,
        })
        .expect("a discovery ping to the peer's endpoint");
    p.relay_ready(t0, relay_path(12));
    let pong = Message::Pong(Pong {
        tx_id: direct_ping,
        src: addr("192.0.2.1:41641"),
    });
    let now = t0 + Duration::from_millis(40);
    p.handle_disco(now, PathSource::Udp(addr(PEER_EP)), pong);
    assert!(matches!(p.current_path(), Path::Direct { .. }));
    assert_eq!(p.relay_path(), None, "direct replaces the relay");
    assert!(
        !p.relay_ready(now, relay_path(1)),
        "not while direct is trusted"
    );
    assert_eq!(p.relay_reason(now), None);
}

#[test]
fn relayed_pings_are_always_answered_through_the_relay() {
    let t0 = Instant::now();
    let mut p = peer(t0);
    let ping = Message::Ping(Ping {
        tx_id: TxId([5; 12]),
        node_key: None,
        padding: 0,
    });
    p.handle_disco(t0, PathSource::Relay(relay_addr()), ping);
    assert_eq!(
        drain(&mut p),
        vec![Transmit {
            dest: Dest::Relay(relay_addr()),
            msg: Message::Pong(Pong {
                tx_id: TxId([5; 12]),
                src: addr(RELAY),
            }),
        }]
    );
    assert!(p.candidates().iter().all(|c| c.addr != addr(RELAY)));
}

#[test]
fn failures_are_remembered_until_a_relay_works() {
    let t0 = Instant::now();
    let mut p = peer(t0);
    p.on_outgoing(t0);
    p.relay_failed(t0, RelayReason::AllocationFailed);
    assert_eq!(p.relay_reason(t0), Some(RelayReason::AllocationFailed));
    p.relay_failed(t0, RelayReason::BindTimeout);
    assert_eq!(p.relay_reason(t0), Some(RelayReason::BindTimeout));
    p.relay_ready(t0, relay_path(5));
    assert_eq!(p.relay_reason(t0), None);
    // A late failure of another attempt does not hide a working relay.
    p.relay_failed(t0, RelayReason::AllocationFailed);
    assert_eq!(p.relay_reason(t0), None);
}
