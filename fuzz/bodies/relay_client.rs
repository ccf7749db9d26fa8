//! Structured fuzzing of the relay client (`relay::manager::RelayManager` on
//! `relay::client::{Allocation, Handshake}`) with real sealed disco messages.
//!
//! Fixed keys: ours (O), the peer's (P), the relay server's (S) and a second relay server's (S2).
//! One manager with one candidate relay node (R) and one peer. The input is a sequence of ops
//! (see `run`): discovery, allocation responses (from R or a wrong node, right or wrong
//! generation, fuzzer endpoint fields), CallMeMaybeVia with a fuzzer endpoint, Geneve datagrams
//! from fuzzer-chosen addresses (raw bytes, or a header with fuzzer control bit, VNI and protocol
//! followed by a disco packet sealed to us by S, S2, P or O: fuzzer plaintext, a Challenge or
//! Ping built from fuzzer fields, or a Pong echoing one of our relayed Pings), and time
//! (`handle_timeout`). `poll()` is drained after every op.
//!
//! A model of the manager (the allocation, each handshake's state, pings and deadline) predicts
//! every step of every op, and each step is also checked on its own:
//! * every `Step::Udp` is Geneve disco sealed by us and opens with the key it is meant for; a Bind
//!   goes only to an address of an endpoint given in that op (accepted allocation response or
//!   CallMeMaybeVia); an Answer, Ping or Pong only to the source of a datagram of that op that
//!   was sealed by the handshake's relay server (Challenge) or by the peer (Ping). So every
//!   destination is an endpoint address or the source of an authenticated datagram (the client,
//!   like Go's, answers a relay's Challenge and a peer's relayed Ping where they came from; see
//!   the README);
//! * an Answer only for Geneve control sealed by the endpoint's server key carrying a Challenge
//!   for that endpoint's VNI and our peer, echoing its cookie;
//! * `Step::Ready` only in an op that delivered a Pong sealed by the peer, echoing a Ping we sent
//!   through that relay address for that VNI, and only for an endpoint we were given (its server
//!   key, VNI, and relay node when we allocated it);
//! * an allocation response that is not for the live request (wrong node, generation or pair,
//!   or none live) produces no step at all and grows `drops.unsolicited_response`; an accepted
//!   one produces exactly one CallMeMaybeVia to the peer with that endpoint;
//! * raw (unsealed) bytes never produce a step; `Handled::NotMine` only for Geneve data;
//! * counters only grow (and equal the model's); `pending()` equals the model and stays
//!   bounded (allocations ≤ candidates other than the peer, handshakes ≤ distinct server keys
//!   given); `poll_timeout()` equals the model's and `handle_timeout` before it does nothing;
//!   `Failed` only once no work is left for the peer.
//!
//! Input: ops until the input ends, each an op byte then its fields; missing bytes read as zero.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tern::disco::{self, AllocateResponse, BindBody, Message, Ping, Pong, TxId, UdpRelayEndpoint};
use tern::keys::{DiscoPrivate, DiscoPublic, NodePublic};
use tern::naclbox::SharedBox;
use tern::paths::{RelayAddr, RelayPath, RelayReason};
use tern::relay::client::{ALLOC_RETRY_AFTER, ALLOC_TIMEOUT, MAX_HANDSHAKE_LIFETIME, MAX_PINGS};
use tern::relay::geneve::{self, Header, Vni, PROTOCOL_DISCO, VNI_MAX};
use tern::relay::manager::{Handled, ManagerDrops, RelayManager, Step};

use super::input::Input;

const MAX_OPS: usize = 48;

/// Key indices: the relay server, a second relay server, the peer, ourselves.
const S: usize = 0;
const S2: usize = 1;
const P: usize = 2;
const O: usize = 3;

struct Keys {
    ours: DiscoPrivate,
    /// S, S2, P, O.
    public: [DiscoPublic; 4],
    /// Our box with each of them (the same key seals their messages to us).
    boxes: [SharedBox; 4],
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let private = [0x55, 0x66, 0x22, 0x44].map(|b| DiscoPrivate::from_bytes([b; 32]));
        let public = [0, 1, 2, 3].map(|i| private[i].public());
        Keys {
            boxes: [0, 1, 2, 3].map(|i| disco::shared_box(&private[O], &public[i])),
            ours: private[O].clone(),
            public,
        }
    })
}

fn key(i: usize) -> DiscoPublic {
    keys().public[i]
}

const OUR_NODE: NodePublic = NodePublic::from_bytes([0x99; 32]);
const PEER: NodePublic = NodePublic::from_bytes([0x02; 32]);
const RELAY: NodePublic = NodePublic::from_bytes([0x07; 32]);
const STRANGER: NodePublic = NodePublic::from_bytes([0x0e; 32]);

/// The relay addresses endpoints name, or (3) any IPv4 address.
fn addr(input: &mut Input) -> SocketAddr {
    match input.u8() % 4 {
        0 => SocketAddr::from(([198, 51, 100, 7], 40000)),
        1 => SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7], 40000)),
        2 => SocketAddr::from(([198, 51, 100, 8], 40001)),
        _ => SocketAddr::from((Ipv4Addr::from(input.u32()), input.u16())),
    }
}

/// Small VNIs 1-4 (what endpoints use), or any 32-bit value.
fn vni(input: &mut Input) -> u32 {
    match input.u8() {
        s @ 0..0xf0 => 1 + s as u32 % 4,
        _ => input.u32(),
    }
}

fn endpoint(input: &mut Input) -> UdpRelayEndpoint {
    let server_disco = key(input.u8() as usize % 4);
    let client_disco = match input.u8() % 4 {
        0 => [key(O), key(P)],
        1 => [key(P), key(O)],
        2 => [key(O), key(S)],
        _ => [key(P), key(P)],
    };
    let lamport_id = input.u16() as u64;
    let vni = vni(input);
    let bind_lifetime = Duration::from_secs(input.u8() as u64);
    let steady_state_lifetime = Duration::from_secs(input.u16() as u64);
    let n = input.u8() % 4;
    UdpRelayEndpoint {
        server_disco,
        client_disco,
        lamport_id,
        vni,
        bind_lifetime,
        steady_state_lifetime,
        addr_ports: (0..n).map(|_| addr(input)).collect(),
    }
}

/// The relay server the peer's path uses now, and whether that path is trusted.
fn current(input: &mut Input) -> Option<(DiscoPublic, bool)> {
    match input.u8() % 4 {
        0 => None,
        1 => Some((key(S), true)),
        2 => Some((key(S), false)),
        _ => Some((key(S2), true)),
    }
}

/// The model's allocation (at most one: one candidate, one peer).
#[derive(Clone)]
struct MAlloc {
    generation: u32,
    started: Instant,
    next_send: Option<Instant>,
}

/// The model's handshake.
#[derive(Clone)]
struct MBind {
    server: usize,
    lamport: u64,
    vni: u32,
    addrs: Vec<SocketAddr>,
    relay_node: Option<NodePublic>,
    deadline: Instant,
    /// Where the Answer went (None: Bind sent).
    via: Option<SocketAddr>,
    pings: Vec<(TxId, Instant)>,
}

/// What one op should produce.
#[derive(Default)]
struct Expect {
    alloc_requests: usize,
    call_me_maybe_via: Option<UdpRelayEndpoint>,
    /// Server key, endpoint for which Binds go out.
    binds: Option<(usize, UdpRelayEndpoint)>,
    /// Answer to (server, to, body).
    answer: Option<(usize, SocketAddr, BindBody)>,
    /// A Ping through (vni, to), for the model's handshake at this index.
    ping: Option<(u32, SocketAddr, usize)>,
    pong: Option<(u32, SocketAddr, TxId)>,
    ready: Option<(RelayPath, Instant)>,
    failed: Vec<RelayReason>,
}

struct Model {
    now: Instant,
    alloc: Option<MAlloc>,
    alloc_gen: u32,
    last_gen: u32,
    binds: Vec<MBind>,
    drops: ManagerDrops,
    /// Server keys and addresses of every endpoint we were given.
    servers_given: BTreeSet<usize>,
    addrs_given: BTreeSet<SocketAddr>,
    /// The manager's counters after the previous op.
    last_drops: ManagerDrops,
}

impl Model {
    fn poll_timeout(&self) -> Option<Instant> {
        let alloc = self.alloc.as_ref().map(|a| {
            let end = a.started + ALLOC_TIMEOUT;
            a.next_send.unwrap_or(end).min(end)
        });
        let binds = self.binds.iter().map(|b| b.deadline);
        alloc.into_iter().chain(binds).min()
    }

    /// `handle_timeout` at `self.now`.
    fn timeout(&mut self, e: &mut Expect) {
        let now = self.now;
        let mut gave_up = false;
        if let Some(a) = &mut self.alloc {
            if now.saturating_duration_since(a.started) >= ALLOC_TIMEOUT {
                gave_up = true;
            } else if let Some(due) = a.next_send.filter(|t| *t <= now) {
                e.alloc_requests += 1;
                let retry = a.started + ALLOC_RETRY_AFTER;
                a.next_send = (due < retry).then_some(retry);
                if let Some(t) = a.next_send.filter(|t| *t <= now) {
                    e.alloc_requests += 1;
                    a.next_send = (t < retry).then_some(retry);
                }
            }
        }
        if gave_up {
            self.alloc = None;
            if self.binds.is_empty() {
                e.failed.push(RelayReason::AllocationFailed);
            }
        }
        let before = self.binds.len();
        self.binds.retain(|b| now < b.deadline);
        // One Failed per peer, however many of its handshakes timed out at once.
        if self.binds.len() < before && self.alloc.is_none() && self.binds.is_empty() {
            e.failed.push(RelayReason::BindTimeout);
        }
    }

    /// `new_endpoint`: dedup by server key and LamportID, skip the trusted relay in use, bind.
    fn give(
        &mut self,
        ep: &UdpRelayEndpoint,
        relay_node: Option<NodePublic>,
        current: Option<(DiscoPublic, bool)>,
        e: &mut Expect,
    ) {
        let server = (0..4)
            .find(|&i| key(i) == ep.server_disco)
            .expect("a fixed key");
        self.servers_given.insert(server);
        self.addrs_given.extend(ep.addr_ports.iter().copied());
        if ep.addr_ports.is_empty() || !(1..=VNI_MAX).contains(&ep.vni) {
            return;
        }
        if let Some(i) = self.binds.iter().position(|b| b.server == server) {
            if self.binds[i].lamport >= ep.lamport_id {
                return;
            }
            self.binds.remove(i);
        }
        if current == Some((ep.server_disco, true)) {
            return;
        }
        let lifetime = ep.bind_lifetime.min(MAX_HANDSHAKE_LIFETIME);
        let lifetime = if lifetime.is_zero() {
            MAX_HANDSHAKE_LIFETIME
        } else {
            lifetime
        };
        self.binds.push(MBind {
            server,
            lamport: ep.lamport_id,
            vni: ep.vni,
            addrs: ep.addr_ports.clone(),
            relay_node,
            deadline: self.now + lifetime,
            via: None,
            pings: Vec::new(),
        });
        e.binds = Some((server, ep.clone()));
    }
}

/// A Geneve datagram the op sends: who sealed it (None: raw bytes) and what it carries.
struct Sent {
    from: SocketAddr,
    sealer: Option<usize>,
    msg: Option<Message>,
}

pub fn run(data: &[u8]) {
    let k = keys();
    let t0 = Instant::now();
    // One manager with the four shared keys computed, cloned per input (X25519 dominated).
    static PROTOTYPE: OnceLock<RelayManager> = OnceLock::new();
    let mut manager = PROTOTYPE
        .get_or_init(|| {
            let mut m = RelayManager::new(k.ours.clone(), OUR_NODE);
            m.set_candidates([RELAY].into());
            m.prime(&k.public);
            m
        })
        .clone();
    let mut m = Model {
        now: t0,
        alloc: None,
        alloc_gen: 0,
        last_gen: 0,
        binds: Vec::new(),
        drops: ManagerDrops::default(),
        servers_given: BTreeSet::new(),
        addrs_given: BTreeSet::new(),
        last_drops: ManagerDrops::default(),
    };
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let mut e = Expect::default();
        let mut sent = None;
        let mut given = None;
        let op = input.u8() % 6;
        match op {
            // Discovery for the peer, or for the relay node itself (which is no relay to ask).
            0 => {
                let peer = if input.bool() { RELAY } else { PEER };
                if peer == PEER && m.alloc.is_none() {
                    m.alloc_gen = m.alloc_gen.wrapping_add(1).max(1);
                    m.last_gen = m.alloc_gen;
                    m.alloc = Some(MAlloc {
                        generation: m.alloc_gen,
                        started: m.now,
                        next_send: Some(m.now),
                    });
                }
                m.timeout(&mut e);
                manager.discover(m.now, peer, key(P));
            }
            // An allocation response over DERP.
            1 => {
                let from = [RELAY, PEER, STRANGER][input.u8() as usize % 3];
                let generation = match input.u8() % 3 {
                    0 => m.last_gen,
                    1 => m.last_gen.wrapping_add(1),
                    _ => input.u32(),
                };
                let endpoint = endpoint(&mut input);
                let current = current(&mut input);
                let response = AllocateResponse {
                    generation,
                    endpoint,
                };
                let mut pair = response.endpoint.client_disco;
                pair.sort();
                let mut ours = [key(O), key(P)];
                ours.sort();
                let accepted = m.alloc.as_ref().is_some_and(|a| a.generation == generation)
                    && from == RELAY
                    && pair == ours
                    && !response.endpoint.addr_ports.is_empty();
                if accepted {
                    m.alloc = None;
                    e.call_me_maybe_via = Some(response.endpoint.clone());
                    m.give(&response.endpoint, Some(RELAY), current, &mut e);
                    given = Some(response.endpoint.clone());
                } else {
                    m.drops.unsolicited_response += 1;
                }
                manager.on_alloc_response(m.now, from, &response, |peer| {
                    assert_eq!(*peer, PEER, "current path asked for another node");
                    current
                });
            }
            // The peer's CallMeMaybeVia.
            2 => {
                let endpoint = endpoint(&mut input);
                let current = current(&mut input);
                m.give(&endpoint, None, current, &mut e);
                given = Some(endpoint.clone());
                manager.on_call_me_maybe_via(m.now, PEER, key(P), endpoint, current);
            }
            // A Geneve header and a disco packet sealed by one of the fixed keys.
            3 => {
                let from = addr(&mut input);
                let flags = input.u8();
                let control = flags & 1 == 1;
                let protocol = if flags & 2 == 2 {
                    input.u16()
                } else {
                    PROTOCOL_DISCO
                };
                let vni = vni(&mut input) & VNI_MAX;
                let sealer = input.u8() as usize % 4;
                let plain = match input.u8() % 4 {
                    0 => input.bytes().to_vec(),
                    // A Pong echoing one of our relayed Pings (possibly altered).
                    1 => {
                        let pings: Vec<TxId> = m
                            .binds
                            .iter()
                            .flat_map(|b| b.pings.iter().map(|p| p.0))
                            .collect();
                        let which = input.u8() as usize;
                        let flip = input.u8();
                        let mut tx = pings
                            .get(which % pings.len().max(1))
                            .copied()
                            .unwrap_or(TxId([0; 12]));
                        tx.0[which % 12] ^= flip;
                        let src = addr(&mut input);
                        disco::to_vec(&Message::Pong(Pong { tx_id: tx, src }))
                    }
                    2 => {
                        let body = BindBody {
                            vni: vni.wrapping_add(input.u8() as u32),
                            generation: input.u32(),
                            remote_key: key((input.u8() as usize % 4) ^ P),
                            challenge: input.array(),
                        };
                        disco::to_vec(&Message::BindUdpRelayEndpointChallenge(body))
                    }
                    _ => disco::to_vec(&Message::Ping(Ping {
                        tx_id: TxId(input.array()),
                        node_key: input.bool().then_some(PEER),
                        padding: input.u8() as usize % 32,
                    })),
                };
                let header = Header {
                    version: 0,
                    protocol,
                    control,
                    vni: Vni::new(vni),
                };
                let mut packet = header.to_bytes().expect("a 24-bit VNI").to_vec();
                packet.extend_from_slice(&disco::MAGIC);
                packet.extend_from_slice(key(sealer).as_bytes());
                packet.extend_from_slice(&k.boxes[sealer].seal(&plain));
                let s = Sent {
                    from,
                    sealer: Some(sealer),
                    msg: disco::parse(&plain).ok(),
                };
                geneve_op(&mut manager, &mut m, &mut e, &s, &packet);
                sent = Some(s);
            }
            // Raw bytes as a datagram.
            4 => {
                let from = addr(&mut input);
                let bytes = input.bytes().to_vec();
                let s = Sent {
                    from,
                    sealer: None,
                    msg: None,
                };
                geneve_op(&mut manager, &mut m, &mut e, &s, &bytes);
                sent = Some(s);
            }
            // Time passes (up to ~11 minutes, in 10 ms steps).
            _ => {
                let due = manager.poll_timeout();
                assert_eq!(due, m.poll_timeout(), "poll_timeout");
                m.now += Duration::from_millis(input.u16() as u64 * 10);
                m.timeout(&mut e);
                manager.handle_timeout(m.now);
                if due.is_none_or(|t| m.now < t) {
                    assert!(
                        manager.poll().is_none(),
                        "handle_timeout did something before poll_timeout"
                    );
                }
            }
        }
        check(&mut manager, &mut m, e, op, sent.as_ref(), given.as_ref());
    }
}

/// Hands `datagram` to the manager and works out, from the model, what it must do.
fn geneve_op(manager: &mut RelayManager, m: &mut Model, e: &mut Expect, s: &Sent, datagram: &[u8]) {
    let parsed = geneve::parse(datagram).ok().and_then(|h| {
        let frame = disco::parse_packet(datagram.get(geneve::HEADER_LEN..)?).ok()?;
        Some((h, frame.sender))
    });
    let handled = manager.handle_geneve(m.now, s.from, datagram);
    let Some((header, sender)) = parsed else {
        m.drops.malformed += 1;
        assert_eq!(handled, Handled::Consumed, "malformed");
        return;
    };
    let vni = header.vni.get();
    let found = m.binds.iter().position(|b| {
        let expected = if header.control {
            key(b.server)
        } else {
            key(P)
        };
        b.vni == vni && expected == sender
    });
    let Some(i) = found else {
        if header.control {
            m.drops.unknown_control += 1;
            assert_eq!(handled, Handled::Consumed, "unknown control");
        } else {
            assert_eq!(handled, Handled::NotMine, "data for no handshake");
        }
        return;
    };
    assert_eq!(handled, Handled::Consumed, "a handshake's datagram");
    // Only what the expected key sealed opens; raw bytes never do.
    let expected = if header.control { m.binds[i].server } else { P };
    if header.protocol != PROTOCOL_DISCO || s.sealer != Some(expected) {
        return;
    }
    let b = &mut m.binds[i];
    match (header.control, &s.msg) {
        (true, Some(Message::BindUdpRelayEndpointChallenge(body)))
            if b.via.is_none() && body.vni == b.vni && body.remote_key == key(P) =>
        {
            b.via = Some(s.from);
            e.answer = Some((b.server, s.from, body.clone()));
            if b.pings.len() < MAX_PINGS {
                e.ping = Some((b.vni, s.from, i));
            }
        }
        (false, Some(Message::Ping(ping))) => {
            e.pong = Some((b.vni, s.from, ping.tx_id));
            if b.via == Some(s.from) && b.pings.len() < MAX_PINGS {
                e.ping = Some((b.vni, s.from, i));
            }
        }
        (false, Some(Message::Pong(pong))) => {
            let sent = b.pings.iter().find(|p| p.0 == pong.tx_id).map(|p| p.1);
            if let (Some(at), Some(via)) = (sent, b.via) {
                if via == s.from {
                    let path = RelayPath {
                        addr: RelayAddr { via, vni: b.vni },
                        server_disco: key(b.server),
                        relay_node: b.relay_node,
                        latency: m.now.saturating_duration_since(at),
                    };
                    e.ready = Some((path, at));
                    m.binds.remove(i);
                }
            }
        }
        _ => {}
    }
}

/// A Geneve datagram we sent, opened: header, the key it is sealed to, the message.
fn open_ours(packet: &[u8]) -> (Header, usize, Message) {
    let k = keys();
    let header = geneve::parse(packet).expect("Geneve");
    assert_eq!((header.version, header.protocol), (0, PROTOCOL_DISCO));
    let frame = disco::parse_packet(&packet[geneve::HEADER_LEN..]).expect("disco");
    assert_eq!(frame.sender, key(O), "sealed by us");
    // Control goes to a relay server (any fixed key may serve as one), data to the peer.
    let to: &[usize] = if header.control { &[S, S2, P, O] } else { &[P] };
    for &i in to {
        if let Ok(msg) = disco::open(&k.boxes[i], &frame) {
            return (header, i, msg);
        }
    }
    panic!("a datagram no key opens");
}

/// Drains the manager and compares every step with the op's expectation and the properties.
fn check(
    manager: &mut RelayManager,
    m: &mut Model,
    mut e: Expect,
    op: u8,
    sent: Option<&Sent>,
    given: Option<&UdpRelayEndpoint>,
) {
    let drops = manager.drops();
    assert_eq!(drops, m.drops, "drop counters");
    // Counters only grow (implied by the model too, asserted on its own).
    let last = m.last_drops;
    assert!(
        drops.unsolicited_response >= last.unsolicited_response
            && drops.unknown_control >= last.unknown_control
            && drops.malformed >= last.malformed,
        "a counter went down"
    );
    m.last_drops = drops;
    // Where a datagram may go: an address of an endpoint we were given, or the source of this
    // op's datagram if it was sealed by one of the fixed keys (what it must be sealed by is
    // checked per message below).
    let authenticated_source = sent.and_then(|s| s.sealer.map(|_| s.from));
    let mut binds = Vec::new();
    let mut pings = Vec::new();
    let mut failed = Vec::new();
    let mut answered = false;
    let mut ponged = false;
    let mut ready = false;
    let mut requests = 0;
    let mut cmmv = false;
    while let Some(step) = manager.poll() {
        if sent.is_some_and(|s| s.sealer.is_none()) {
            panic!("raw bytes produced {step:?}");
        }
        match step {
            Step::Derp {
                to,
                msg: Message::AllocateUdpRelayEndpointRequest(request),
            } => {
                assert_eq!(to, RELAY);
                let mut pair = [key(O), key(P)];
                pair.sort();
                assert_eq!(request.client_disco, pair);
                assert_eq!(request.generation, m.last_gen, "the live generation");
                requests += 1;
            }
            Step::Derp {
                to,
                msg: Message::CallMeMaybeVia(endpoint),
            } => {
                assert_eq!(to, PEER);
                assert!(!cmmv, "one CallMeMaybeVia per response");
                let expected = e.call_me_maybe_via.take();
                assert_eq!(
                    Some(endpoint),
                    expected,
                    "CallMeMaybeVia for the accepted response"
                );
                cmmv = true;
            }
            Step::Derp { msg, .. } => panic!("unexpected DERP message {msg:?}"),
            Step::Udp(t) => {
                assert!(
                    m.addrs_given.contains(&t.to) || Some(t.to) == authenticated_source,
                    "datagram to {} (no endpoint address, no authenticated source)",
                    t.to
                );
                let (header, server, msg) = open_ours(&t.packet);
                let vni = header.vni.get();
                match (header.control, msg) {
                    (true, Message::BindUdpRelayEndpoint(body)) => {
                        let ep = given.expect("a Bind only for an endpoint given now");
                        let (s, expected) =
                            e.binds.as_ref().expect("a Bind the model does not expect");
                        assert_eq!(
                            (server, &ep),
                            (*s, &expected),
                            "Bind for the given endpoint"
                        );
                        assert!(ep.addr_ports.contains(&t.to), "Bind to {}", t.to);
                        assert_eq!(
                            (body.vni, vni, body.remote_key, body.challenge),
                            (ep.vni, ep.vni, key(P), [0; 32])
                        );
                        binds.push(t.to);
                    }
                    (true, Message::BindUdpRelayEndpointAnswer(body)) => {
                        assert!(!answered, "one Answer per op");
                        let s = sent.expect("an Answer only to a datagram");
                        let Some(Message::BindUdpRelayEndpointChallenge(ch)) = &s.msg else {
                            panic!("an Answer to something that is not a Challenge");
                        };
                        let (srv, to, expected) = e
                            .answer
                            .take()
                            .expect("an Answer the model does not expect");
                        assert_eq!(
                            s.sealer,
                            Some(server),
                            "Answer to a Challenge not sealed by its server"
                        );
                        assert_eq!((srv, to), (server, s.from));
                        assert_eq!(t.to, s.from, "Answer to the Challenge's source");
                        assert_eq!(body.challenge, ch.challenge, "cookie echoed");
                        assert_eq!(body.challenge, expected.challenge);
                        assert_eq!((body.vni, vni, body.remote_key), (ch.vni, ch.vni, key(P)));
                        answered = true;
                    }
                    (false, Message::Ping(ping)) => {
                        assert_eq!(server, P);
                        assert_eq!(ping.node_key, Some(OUR_NODE));
                        let s = sent.expect("a relayed Ping only after a datagram");
                        assert_eq!(t.to, s.from, "Ping to the authenticated source");
                        let (v, to, i) = e.ping.take().expect("a Ping the model does not expect");
                        assert_eq!((vni, t.to), (v, to), "Ping through the handshake's relay");
                        pings.push((i, ping.tx_id));
                    }
                    (false, Message::Pong(pong)) => {
                        let s = sent.expect("a Pong only to a datagram");
                        let Some(Message::Ping(ping)) = &s.msg else {
                            panic!("a Pong to something that is not a Ping");
                        };
                        assert_eq!(s.sealer, Some(P), "Pong to a Ping not sealed by the peer");
                        assert_eq!((t.to, pong.src, pong.tx_id), (s.from, s.from, ping.tx_id));
                        assert_eq!(e.pong.take(), Some((vni, s.from, ping.tx_id)));
                        assert!(!ponged);
                        ponged = true;
                    }
                    (control, msg) => panic!("unexpected datagram (control {control}): {msg:?}"),
                }
            }
            Step::Ready { peer, path } => {
                assert_eq!(peer, PEER);
                assert!(!ready, "one Ready per op");
                let s = sent.expect("Ready only after a datagram");
                assert_eq!(s.sealer, Some(P), "Ready without a Pong sealed by the peer");
                assert!(
                    matches!(s.msg, Some(Message::Pong(_))),
                    "Ready without a Pong"
                );
                let (expected, _) = e.ready.take().expect("a Ready the model does not expect");
                assert_eq!(path, expected, "Ready for the handshake the Pong answered");
                assert_eq!(path.addr.via, s.from);
                ready = true;
            }
            Step::Failed { peer, reason } => {
                assert_eq!(peer, PEER);
                assert!(matches!(op, 0 | 5), "Failed outside a timeout");
                failed.push(reason);
            }
        }
    }
    assert_eq!(requests, e.alloc_requests, "allocation requests");
    assert!(e.call_me_maybe_via.is_none(), "CallMeMaybeVia missing");
    let expected_binds = e.binds.map(|(_, ep)| ep.addr_ports).unwrap_or_default();
    assert_eq!(binds, expected_binds, "one Bind per relay address");
    assert!(e.answer.is_none(), "Answer missing");
    assert!(e.pong.is_none(), "Pong missing");
    assert!(e.ready.is_none(), "Ready missing");
    assert!(e.ping.is_none(), "Ping missing");
    assert_eq!(failed, e.failed, "Failed steps");
    // The Ping's transaction belongs to the handshake it went through.
    for (i, tx) in pings {
        m.binds[i].pings.push((tx, m.now));
    }
    let (allocs, handshakes) = manager.pending();
    assert_eq!(
        (allocs, handshakes),
        (usize::from(m.alloc.is_some()), m.binds.len()),
        "pending work"
    );
    assert!(allocs <= 1, "allocations beyond the candidates");
    assert!(
        handshakes <= m.servers_given.len(),
        "more handshakes than relay servers"
    );
    if !failed.is_empty() {
        assert_eq!((allocs, handshakes), (0, 0), "Failed while work is left");
    }
    assert_eq!(manager.poll_timeout(), m.poll_timeout(), "poll_timeout");
}
