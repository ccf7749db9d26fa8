//! The ops mode of the `disco_parse` target (see its module doc for what is checked).
//!
//! Ops, each an op byte then its fields (missing bytes read as zero):
//! 0 plaintext over UDP, 1 plaintext over DERP, 2 built message, 3 raw bytes, 4 Pong echoing our
//! last Ping to a peer, 5 time passes, 6 outgoing traffic / CLI ping / send via DERP,
//! 7 new local network facts.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tern::disco::{
    self, AllocateRequest, AllocateResponse, BindBody, Message, Ping, Pong, TxId, UdpRelayEndpoint,
};
use tern::keys::{DiscoPrivate, DiscoPublic, NodePublic};
use tern::naclbox::SharedBox;
use tern::paths::{Dest, Event, LocalNet, PeerInfo, PeerTable};

use super::input::Input;

const MAX_OPS: usize = 64;

struct Keys {
    local: DiscoPrivate,
    local_public: DiscoPublic,
    peers: [DiscoPublic; 2],
    /// Each peer's box with us.
    boxes: [SharedBox; 2],
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let local = DiscoPrivate::from_bytes([0x44; 32]);
        let local_public = local.public();
        let private = [0x11, 0x22].map(|b| DiscoPrivate::from_bytes([b; 32]));
        Keys {
            peers: [0, 1].map(|i| private[i].public()),
            boxes: [0, 1].map(|i| disco::shared_box(&private[i], &local_public)),
            local,
            local_public,
        }
    })
}

fn node(i: usize) -> NodePublic {
    NodePublic::from_bytes([i as u8 + 1; 32])
}

fn peer_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, i as u8 + 1], 41641))
}

/// The peers' netmap addresses, a stranger, or a fuzzer-chosen IPv4 address.
fn addr(input: &mut Input) -> SocketAddr {
    match input.u8() % 4 {
        0 => peer_addr(0),
        1 => peer_addr(1),
        2 => SocketAddr::from(([203, 0, 113, 9], 9999)),
        _ => SocketAddr::from((Ipv4Addr::from(input.u32()), input.u16())),
    }
}

fn local_net(udp: Option<bool>, varies: Option<bool>) -> LocalNet {
    LocalNet {
        node_key: NodePublic::from_bytes([0x99; 32]),
        endpoints: vec![SocketAddr::from(([203, 0, 113, 1], 41641))],
        udp_working: udp,
        mapping_varies: varies,
    }
}

fn seal_plain(i: usize, plaintext: &[u8]) -> Vec<u8> {
    let k = keys();
    let mut out = disco::MAGIC.to_vec();
    out.extend_from_slice(k.peers[i].as_bytes());
    out.extend_from_slice(&k.boxes[i].seal(plaintext));
    out
}

fn key(input: &mut Input, i: usize) -> DiscoPublic {
    let k = keys();
    match input.u8() % 4 {
        0 => k.peers[i],
        1 => k.local_public,
        2 => k.peers[1 - i],
        _ => DiscoPublic::from_bytes(input.array()),
    }
}

fn endpoint(input: &mut Input, i: usize) -> UdpRelayEndpoint {
    let n = 1 + input.u8() as usize % 2;
    UdpRelayEndpoint {
        server_disco: key(input, i),
        client_disco: [key(input, i), key(input, i)],
        lamport_id: input.u32() as u64,
        vni: input.u32(),
        bind_lifetime: Duration::from_secs(input.u8() as u64),
        steady_state_lifetime: Duration::from_secs(input.u16() as u64),
        addr_ports: (0..n).map(|_| addr(input)).collect(),
    }
}

/// A well-formed message from peer `i`, built from fuzzer fields.
fn message(input: &mut Input, i: usize, last_ping: Option<TxId>) -> Message {
    let bind = |input: &mut Input| BindBody {
        vni: input.u32(),
        generation: input.u32(),
        remote_key: key(input, i),
        challenge: input.array(),
    };
    match input.u8() % 9 {
        0 => Message::Ping(Ping {
            tx_id: TxId(input.array()),
            node_key: input.bool().then(|| node(i)),
            padding: input.u8() as usize % 64,
        }),
        1 => Message::Pong(Pong {
            tx_id: match last_ping {
                Some(tx) if input.bool() => tx,
                _ => TxId(input.array()),
            },
            src: addr(input),
        }),
        2 => Message::CallMeMaybe((0..input.u8() % 4).map(|_| addr(input)).collect()),
        3 => Message::BindUdpRelayEndpoint(bind(input)),
        4 => Message::BindUdpRelayEndpointChallenge(bind(input)),
        5 => Message::BindUdpRelayEndpointAnswer(bind(input)),
        6 => Message::CallMeMaybeVia(endpoint(input, i)),
        7 => Message::AllocateUdpRelayEndpointRequest(AllocateRequest {
            client_disco: [key(input, i), key(input, i)],
            generation: input.u32(),
        }),
        _ => Message::AllocateUdpRelayEndpointResponse(AllocateResponse {
            generation: input.u32(),
            endpoint: endpoint(input, i),
        }),
    }
}

#[derive(Clone)]
struct State {
    table: PeerTable,
    now: Instant,
    handled: u64,
    /// The last Ping we sent to each peer, and where.
    last_ping: [Option<(TxId, Dest)>; 2],
    /// The last ping tx each peer sent from each UDP source (a repeat is not answered again).
    ping_seen: HashMap<(usize, SocketAddr), TxId>,
}

/// What one delivered packet was, to check the table's answer.
struct Sent {
    peer: Option<usize>,
    msg: Option<Message>,
    derp: Option<(u16, NodePublic)>,
    src: Option<SocketAddr>,
}

/// The starting state: the table with both peers set and its first output drained and checked.
/// Built once per process and cloned per input: `PeerTable::new` and `set_peers` cost three
/// X25519 operations (our public key, one box per peer), which dominated the run time.
fn prototype() -> &'static State {
    static PROTO: OnceLock<State> = OnceLock::new();
    PROTO.get_or_init(|| {
        let k = keys();
        let t0 = Instant::now();
        let mut table = PeerTable::new(k.local.clone(), local_net(Some(true), Some(false)));
        let peers = (0..2)
            .map(|i| PeerInfo {
                node_key: node(i),
                disco_key: k.peers[i],
                home_derp: Some(i as u16 + 1),
                endpoints: vec![peer_addr(i)],
                mapping_varies: Some(false),
                udp_working: Some(true),
                relay_capable: true,
            })
            .collect();
        table.set_peers(t0, peers);
        let mut st = State {
            table,
            now: t0,
            handled: 0,
            last_ping: [None, None],
            ping_seen: HashMap::new(),
        };
        drain(&mut st, None);
        st
    })
}

pub fn run(data: &[u8]) {
    let k = keys();
    let mut st = prototype().clone();
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let i = (input.u8() % 2) as usize;
        match op % 8 {
            0..=2 => {
                let (packet, msg) = if op % 8 == 2 {
                    let msg = message(&mut input, i, st.last_ping[i].map(|p| p.0));
                    (disco::seal_with(&k.boxes[i], &k.peers[i], &msg), Some(msg))
                } else {
                    let plain = input.bytes();
                    (seal_plain(i, plain), disco::parse(plain).ok())
                };
                let via_derp = op % 8 == 1 || input.bool();
                deliver(&mut st, &mut input, Some(i), msg, &packet, via_derp);
            }
            3 => {
                let via_derp = input.bool();
                let bytes = input.bytes().to_vec();
                deliver(&mut st, &mut input, None, None, &bytes, via_derp);
            }
            4 => {
                let Some((tx_id, dest)) = st.last_ping[i] else {
                    continue;
                };
                let src = if input.bool() {
                    addr(&mut input)
                } else {
                    local_net(None, None).endpoints[0]
                };
                let msg = Message::Pong(Pong { tx_id, src });
                let packet = disco::seal_with(&k.boxes[i], &k.peers[i], &msg);
                match dest {
                    Dest::Direct(to) => {
                        let before = st.table.counters().accepted;
                        let got = st.table.handle_udp(st.now, to, &packet);
                        st.handled += 1;
                        assert_eq!(got, Ok(node(i)), "our peer's pong");
                        assert_eq!(st.table.counters().accepted, before + 1);
                        drain(&mut st, None);
                    }
                    Dest::Derp(_) => {
                        deliver(&mut st, &mut input, Some(i), Some(msg), &packet, true);
                    }
                    Dest::Relay(relay) => {
                        let got = st.table.handle_relay(st.now, relay, &packet);
                        st.handled += 1;
                        assert_eq!(got, Ok(node(i)), "our peer's pong through the relay");
                        drain(&mut st, None);
                    }
                }
            }
            5 => {
                st.now += Duration::from_millis(input.u16() as u64 * 4);
                st.table.handle_timeout(st.now);
                drain(&mut st, None);
            }
            6 => {
                match input.u8() % 3 {
                    0 => assert!(st.table.on_outgoing(st.now, &node(i)).is_some()),
                    1 => assert!(st.table.cli_ping(st.now, &node(i)).is_some()),
                    _ => {
                        let msg = message(&mut input, i, None);
                        assert!(st.table.send_via_derp(&node(i), msg), "peers have a home");
                    }
                }
                drain(&mut st, None);
            }
            _ => {
                let flags = input.u8();
                let tri = |b: u8| [None, Some(false), Some(true)][b as usize % 3];
                st.table
                    .set_local(st.now, local_net(tri(flags), tri(flags >> 2)));
                drain(&mut st, None);
            }
        }
    }
    let c = st.table.counters();
    let total = c.accepted + c.not_disco + c.unknown_sender + c.derp_sender_mismatch;
    assert_eq!(
        total + c.bad_box + c.malformed,
        st.handled,
        "counters add up"
    );
}

/// Hands `packet` (sealed by peer `peer`, if any) to the table over UDP or DERP and checks the
/// result and what the table does with it.
fn deliver(
    st: &mut State,
    input: &mut Input,
    peer: Option<usize>,
    msg: Option<Message>,
    packet: &[u8],
    via_derp: bool,
) {
    let before = st.table.counters();
    let (result, sent) = if via_derp {
        let region = 1 + input.u8() as u16 % 4;
        // Usually the sealing peer's node key; sometimes the other one (an impostor).
        let src_node = match peer {
            Some(i) if !input.bool() => node(i),
            Some(i) => node(1 - i),
            None => node(input.u8() as usize % 2),
        };
        let r = st.table.handle_derp(st.now, region, src_node, packet);
        let sent = Sent {
            peer,
            msg,
            derp: Some((region, src_node)),
            src: None,
        };
        (r, sent)
    } else {
        let src = addr(input);
        let r = st.table.handle_udp(st.now, src, packet);
        let sent = Sent {
            peer,
            msg,
            derp: None,
            src: Some(src),
        };
        (r, sent)
    };
    st.handled += 1;
    let after = st.table.counters();
    match (&result, sent.peer) {
        (Ok(n), Some(i)) => {
            assert_eq!(*n, node(i), "accepted as the peer that sealed it");
            assert!(
                sent.msg.is_some(),
                "accepted a plaintext that does not parse"
            );
            assert_eq!(after.accepted, before.accepted + 1);
            if let Some((_, src_node)) = sent.derp {
                assert_eq!(src_node, node(i), "DERP impostor accepted");
            }
        }
        (Ok(_), None) => panic!("bytes no peer sealed were accepted"),
        (Err(e), _) => {
            assert_eq!(after.accepted, before.accepted, "{e}");
            if let (Some(i), Some(_)) = (sent.peer, &sent.msg) {
                // A parseable message sealed by a peer fails only as a DERP impostor.
                assert!(
                    matches!(sent.derp, Some((_, n)) if n != node(i)),
                    "peer's message refused: {e}"
                );
            }
            // Nothing unauthenticated produces output.
            assert!(st.table.poll_transmit().is_none(), "transmit after a drop");
            assert!(st.table.poll_event().is_none(), "event after a drop");
            return;
        }
    }
    drain(st, Some(&sent));
}

/// Drains and checks the table's output; `sent` is the packet just accepted, if any.
fn drain(st: &mut State, sent: Option<&Sent>) {
    let k = keys();
    let mut pongs = Vec::new();
    while let Some(out) = st.table.poll_transmit() {
        let i = (0..2)
            .find(|&i| node(i) == out.peer)
            .expect("sent to a peer");
        let header = disco::parse_packet(&out.packet).expect("a disco packet");
        assert_eq!(header.sender, k.local_public);
        let msg = disco::open(&k.boxes[i], &header).expect("sealed to the peer");
        match msg {
            Message::Ping(p) => st.last_ping[i] = Some((p.tx_id, out.dest)),
            Message::Pong(p) => pongs.push((i, out.dest, p)),
            _ => {}
        }
    }
    let mut alloc_events = 0;
    while let Some(ev) = st.table.poll_event() {
        match ev.event {
            Event::AddrForPeer(a) => assert_eq!(st.table.peer_for_addr(&a), Some(ev.peer)),
            Event::RelayAllocRequest(_) => alloc_events += 1,
            _ => {}
        }
    }
    let Some(sent) = sent else {
        return;
    };
    let i = sent.peer.expect("only accepted packets are checked");
    match &sent.msg {
        Some(Message::Ping(ping)) => {
            let answered = |dest: Dest, src: Option<SocketAddr>| {
                pongs.iter().any(|(j, d, p)| {
                    *j == i && *d == dest && p.tx_id == ping.tx_id && src.is_none_or(|s| p.src == s)
                })
            };
            match (sent.derp, sent.src) {
                (Some((region, _)), _) => {
                    assert!(
                        answered(Dest::Derp(region), None),
                        "ping over DERP unanswered"
                    )
                }
                (None, Some(src)) => {
                    if st.ping_seen.insert((i, src), ping.tx_id) != Some(ping.tx_id) {
                        assert!(
                            answered(Dest::Direct(src), Some(src)),
                            "UDP ping unanswered"
                        );
                    }
                }
                (None, None) => {}
            }
        }
        Some(Message::AllocateUdpRelayEndpointRequest(r)) => {
            let expected = sent.derp.is_some() && r.client_disco.contains(&k.peers[i]);
            assert_eq!(
                alloc_events,
                usize::from(expected),
                "allocation request event"
            );
        }
        _ => assert_eq!(alloc_events, 0),
    }
}
