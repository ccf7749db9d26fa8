//! Structured fuzzing of the peer relay server (`RelayServer`) with real sealed disco messages.
//!
//! Random keys per run made every input stop at the box check; here the server key and three
//! client disco keys are fixed, and the input is a sequence of ops. The target seals what the
//! ops describe (well-formed Bind/Answer from fuzzer fields, or fuzzer-chosen plaintext) with the
//! client's real key, so the bind handshake, `on_bind`, `on_answer`, forwarding and expiry run.
//! A model of the endpoints (what is allocated, bound, last seen, which cookies were issued)
//! checks every action:
//! * nothing is forwarded unless both legs are bound, from a bound leg, to the other leg;
//! * an Answer binds only with a cookie the server issued for that leg, generation and address
//!   (a mutated cookie never binds); a well-formed Bind is always challenged while its source has
//!   Challenge budget (the per-source token bucket is modelled) and never beyond it, and an
//!   Answer with the issued cookie inside the MAC rotation window always binds;
//! * every reply goes back to the sender, is no larger than the request, and is a Challenge
//!   sealed to that client; unauthenticated bytes never get a reply;
//! * allocation results and errors are as predicted; `expire` removes exactly the endpoints the
//!   model says are stale; `status()` agrees with the model (sessions, bound legs, counters,
//!   drops).
//!
//! Input: ops until the input ends, each an op byte then its fields (see `run`); missing bytes
//! read as zero.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tern::disco::{self, AllocateRequest, BindBody, Message, UdpRelayEndpoint};
use tern::keys::{DiscoPrivate, DiscoPublic};
use tern::naclbox::SharedBox;
use tern::relay::geneve::{self, Header, Vni, PROTOCOL_DISCO, PROTOCOL_WIREGUARD};
use tern::relay::server::{
    Action, AllocError, RelayServer, BIND_LIFETIME, CHALLENGES_PER_SECOND, CHALLENGE_BURST,
    MAC_ROTATION, STEADY_STATE_LIFETIME,
};

use super::input::Input;

const MAX_OPS: usize = 64;

/// Fixed keys, derived once: X25519 is the expensive part of every run.
struct Keys {
    server: DiscoPrivate,
    server_public: DiscoPublic,
    clients: [DiscoPublic; 3],
    /// Each client's box with the server.
    boxes: [SharedBox; 3],
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let server = DiscoPrivate::from_bytes([0x55; 32]);
        let server_public = server.public();
        let private = [0x11, 0x22, 0x33].map(|b| DiscoPrivate::from_bytes([b; 32]));
        Keys {
            clients: [0, 1, 2].map(|i| private[i].public()),
            boxes: [0, 1, 2].map(|i| disco::shared_box(&private[i], &server_public)),
            server,
            server_public,
        }
    })
}

/// Two client addresses, a stranger and an IPv6 one.
fn addr(slot: u8) -> SocketAddr {
    match slot % 4 {
        0 => SocketAddr::from(([192, 0, 2, 1], 1001)),
        1 => SocketAddr::from(([192, 0, 2, 2], 1002)),
        2 => SocketAddr::from(([203, 0, 113, 9], 9999)),
        _ => SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 1003)),
    }
}

#[derive(Clone, Default)]
struct Leg {
    bound: Option<SocketAddr>,
    last_seen: Option<Instant>,
    in_progress: u32,
}

#[derive(Clone)]
struct Endpoint {
    pair: [DiscoPublic; 2],
    allocated_at: Instant,
    legs: [Leg; 2],
}

impl Endpoint {
    fn open(&self) -> bool {
        self.legs.iter().all(|l| l.bound.is_some())
    }

    /// The server's rule (bind lifetime before both legs are bound, then steady state).
    fn expired(&self, now: Instant) -> bool {
        if !self.open() {
            return now.saturating_duration_since(self.allocated_at) > BIND_LIFETIME;
        }
        self.legs.iter().any(|l| {
            l.last_seen
                .is_none_or(|t| now.saturating_duration_since(t) > STEADY_STATE_LIFETIME)
        })
    }
}

/// A Challenge the server sent.
#[derive(Clone)]
struct Issued {
    vni: u32,
    leg: usize,
    from: SocketAddr,
    body: BindBody,
    at: Instant,
}

#[derive(Clone)]
struct Model {
    now: Instant,
    endpoints: BTreeMap<u32, Endpoint>,
    issued: Vec<Issued>,
    allocations: u64,
    forwarded_packets: u64,
    forwarded_bytes: u64,
    drops: u64,
    /// The Challenge budget per source address: tokens and when they were last refilled.
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl Model {
    /// The server's Challenge budget for `from` now: a token bucket per source (the address;
    /// all of its ports share one), refilled at `CHALLENGES_PER_SECOND` up to
    /// `CHALLENGE_BURST`. The server consults it for every well-formed Bind on a leg and
    /// challenges only with a token, so the model refills it at those moments, with the same
    /// arithmetic (our four addresses are distinct IPv4 addresses and one IPv6 /64).
    fn refill(&mut self, from: SocketAddr) -> &mut f64 {
        let now = self.now;
        let (tokens, last) = self
            .buckets
            .entry(from.ip())
            .or_insert((CHALLENGE_BURST, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * CHALLENGES_PER_SECOND;
        *tokens = (*tokens + refill).min(CHALLENGE_BURST);
        *last = now;
        tokens
    }

    /// Whether `from` has a Challenge token left (without taking it).
    fn has_token(&self, from: SocketAddr) -> bool {
        self.buckets.get(&from.ip()).is_none_or(|(tokens, last)| {
            let refill =
                self.now.saturating_duration_since(*last).as_secs_f64() * CHALLENGES_PER_SECOND;
            (tokens + refill).min(CHALLENGE_BURST) >= 1.0
        })
    }

    /// A live VNI chosen by the fuzzer, or (high selector values) one that is not live.
    fn vni(&self, sel: u8) -> u32 {
        let live: Vec<u32> = self.endpoints.keys().copied().collect();
        if sel < 0xf0 && !live.is_empty() {
            live[sel as usize % live.len()]
        } else {
            0x1000 + sel as u32
        }
    }

    /// Which leg of `vni` client `c` is, and the other leg's key.
    fn leg_of(&self, vni: u32, c: usize) -> Option<(usize, DiscoPublic)> {
        let ep = self.endpoints.get(&vni)?;
        let me = keys().clients[c];
        let i = ep.pair.iter().position(|k| *k == me)?;
        Some((i, ep.pair[1 - i]))
    }
}

/// What sent a packet, for checking the server's answer.
enum Sender {
    /// Sealed by client `c` (its message, if the plaintext parses).
    Client(usize, Option<Message>),
    /// Bytes no client sealed.
    Unauthenticated,
}

fn control_frame(vni: u32, sealed: &[u8]) -> Vec<u8> {
    frame(vni, true, PROTOCOL_DISCO, sealed)
}

fn frame(vni: u32, control: bool, protocol: u16, body: &[u8]) -> Vec<u8> {
    let header = Header {
        version: 0,
        protocol,
        control,
        vni: Vni::new(vni),
    };
    // The model's VNIs are all below 2^24, so the header encodes.
    let mut out = header.to_bytes().map(|h| h.to_vec()).unwrap_or_default();
    out.extend_from_slice(body);
    out
}

/// A disco packet from client `c` carrying `plaintext` (any bytes) sealed to the server.
fn seal_plain(c: usize, plaintext: &[u8]) -> Vec<u8> {
    let k = keys();
    let mut out = disco::MAGIC.to_vec();
    out.extend_from_slice(k.clients[c].as_bytes());
    out.extend_from_slice(&k.boxes[c].seal(plaintext));
    out
}

fn sorted(pair: [DiscoPublic; 2]) -> [DiscoPublic; 2] {
    let [a, b] = pair;
    if a.as_bytes() <= b.as_bytes() {
        [a, b]
    } else {
        [b, a]
    }
}

/// What every input starts from, built once per process and cloned per input: the server
/// (`with_disco` derives its public key: one X25519) with an endpoint allocated at `t0` for each
/// of the three pairs of clients (a new endpoint costs two X25519, one box per client, which
/// dominated the run time), and the model of it. The pairs are allocated in the order (0, 1),
/// (0, 2), (1, 2): VNIs 1, 2 and 3, so VNI selector 0 names the pair (0, 1) the seeds allocate
/// first. Allocations in the input get the live endpoint back (checked as before) until
/// `expire` removes it; new endpoints after that are served by [`ALLOCATED`] or the server.
struct Prototype {
    server: RelayServer,
    model: Model,
    addrs: Vec<SocketAddr>,
}

fn prototype() -> &'static Prototype {
    static PROTO: OnceLock<Prototype> = OnceLock::new();
    PROTO.get_or_init(|| {
        let k = keys();
        let t0 = Instant::now();
        let mut server = RelayServer::with_disco(k.server.clone(), t0);
        let addrs = vec![SocketAddr::from(([198, 51, 100, 7], 40000))];
        server.set_addr_ports(addrs.clone());
        let mut model = Model {
            now: t0,
            endpoints: BTreeMap::new(),
            issued: Vec::new(),
            allocations: 0,
            forwarded_packets: 0,
            forwarded_bytes: 0,
            drops: 0,
            buckets: HashMap::new(),
        };
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            let request = AllocateRequest {
                client_disco: [k.clients[a], k.clients[b]],
                generation: 1,
            };
            allocate(&mut server, &mut model, &request, &addrs, None);
        }
        let vnis: Vec<u32> = model.endpoints.keys().copied().collect();
        assert_eq!(vnis, [1, 2, 3]);
        expire(&mut server, &mut model);
        Prototype {
            server,
            model,
            addrs,
        }
    })
}

/// Cached server states at most (then the cache starts over).
const MAX_CACHED: usize = 32768;

/// The server after an allocation, its answer, and the cookies the model had seen before it.
type Allocated = (
    RelayServer,
    Result<UdpRelayEndpoint, AllocError>,
    Vec<Issued>,
);

thread_local! {
    /// New endpoints (a pair allocated again after `expire` removed its endpoint) still cost the
    /// server two X25519 each. The run up to an op is a function of the input bytes read so
    /// far, but for randomness: the MAC keys the server draws when it rotates them, and the
    /// cookies derived from them, which the model keeps in `issued` (sealing nonces leave no
    /// trace in either; whether a cookie binds does not depend on the key's value). So the
    /// server's state after such an allocation, its answer and the model's cookies are kept,
    /// keyed by the input bytes read so far (this allocation's included); an input that gets
    /// there again continues from clones of them, as if it had drawn the same keys, and checks
    /// the kept answer against the model exactly as a live answer. Past `MAX_CACHED` states
    /// the cache starts over.
    static ALLOCATED: RefCell<HashMap<Vec<u8>, Allocated>> = RefCell::new(HashMap::new());
}

/// `server.allocate(m.now, request)`, or its kept result for the run named by `key`.
fn allocate_cached(
    server: &mut RelayServer,
    m: &mut Model,
    request: &AllocateRequest,
    key: &[u8],
) -> Result<UdpRelayEndpoint, AllocError> {
    ALLOCATED.with_borrow_mut(|cache| {
        if let Some((state, result, issued)) = cache.get(key) {
            *server = state.clone();
            m.issued.clone_from(issued);
            return result.clone();
        }
        let result = server.allocate(m.now, request);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        let kept = (server.clone(), result.clone(), m.issued.clone());
        cache.insert(key.to_vec(), kept);
        result
    })
}

pub fn run(data: &[u8]) {
    let k = keys();
    let proto = prototype();
    let mut server = proto.server.clone();
    let mut m = proto.model.clone();
    let addrs = &proto.addrs;
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            // Allocate for two of {client 0, 1, 2, the server's own key}.
            0 => {
                let sel = input.u8();
                let generation = input.u32();
                let pick = |s: u8| match s % 4 {
                    3 => k.server_public,
                    c => k.clients[c as usize],
                };
                let request = AllocateRequest {
                    client_disco: [pick(sel), pick(sel >> 2)],
                    generation,
                };
                let read = &data[..data.len() - input.remaining()];
                allocate(&mut server, &mut m, &request, addrs, Some(read));
            }
            // A well-formed Bind from client `c`.
            1 => {
                let c = (input.u8() % 3) as usize;
                let from = addr(input.u8());
                let vni = m.vni(input.u8());
                let generation = input.u32();
                let flags = input.u8();
                let leg = m.leg_of(vni, c);
                let remote = match leg {
                    Some((_, other)) if flags & 1 == 0 => other,
                    _ => k.clients[(c + 1 + (flags as usize >> 1) % 2) % 3],
                };
                let bind = BindBody {
                    vni,
                    generation,
                    remote_key: remote,
                    challenge: [0; 32],
                };
                let msg = Message::BindUdpRelayEndpoint(bind);
                let mut plain = disco::to_vec(&msg);
                // Trailing bytes are ignored by the parser but make the request larger.
                plain.extend(std::iter::repeat_n(0, (flags >> 4) as usize));
                let packet = control_frame(vni, &seal_plain(c, &plain));
                let budget = m.has_token(from);
                let action = send(
                    &mut server,
                    &mut m,
                    from,
                    &packet,
                    Sender::Client(c, Some(msg)),
                );
                let valid = matches!(leg, Some((_, other)) if other == remote) && generation != 0;
                if valid && budget {
                    assert!(
                        matches!(action, Action::Reply { .. }),
                        "valid bind: {action:?}"
                    );
                }
            }
            // An Answer from client `c` echoing an issued cookie, possibly altered.
            2 => {
                let c = (input.u8() % 3) as usize;
                let from = addr(input.u8());
                let which = input.u8() as usize;
                let pos = input.u8() as usize % 32;
                let flip = input.u8();
                let Some(issued) = m.issued.get(which % m.issued.len().max(1)) else {
                    continue;
                };
                let vni = issued.vni;
                let mut body = issued.body.clone();
                body.challenge[pos] ^= flip;
                let must_bind = flip == 0
                    && from == issued.from
                    && m.now.saturating_duration_since(issued.at) < MAC_ROTATION
                    && m.leg_of(vni, c).map(|(i, _)| i) == Some(issued.leg)
                    && m.endpoints
                        .get(&vni)
                        .map(|ep| ep.legs[issued.leg].in_progress)
                        == Some(body.generation);
                let msg = Message::BindUdpRelayEndpointAnswer(body);
                let packet =
                    control_frame(vni, &disco::seal_with(&k.boxes[c], &k.clients[c], &msg));
                let action = send(
                    &mut server,
                    &mut m,
                    from,
                    &packet,
                    Sender::Client(c, Some(msg)),
                );
                if must_bind {
                    assert_eq!(action, Action::Accepted, "answer with the issued cookie");
                }
            }
            // Fuzzer-chosen plaintext sealed by client `c`, in a control frame.
            3 => {
                let c = (input.u8() % 3) as usize;
                let from = addr(input.u8());
                let vni = m.vni(input.u8());
                let plain = input.bytes();
                let msg = disco::parse(plain).ok();
                let packet = control_frame(vni, &seal_plain(c, plain));
                send(&mut server, &mut m, from, &packet, Sender::Client(c, msg));
            }
            // Raw bytes, as sent or behind a Geneve header for a (live) VNI.
            4 => {
                let from = addr(input.u8());
                let shape = input.u8();
                let vni = m.vni(input.u8());
                let bytes = input.bytes();
                let packet = match shape % 4 {
                    0 => bytes.to_vec(),
                    1 => control_frame(vni, bytes),
                    2 => frame(vni, false, PROTOCOL_WIREGUARD, bytes),
                    _ => frame(vni, true, input.u16(), bytes),
                };
                send(&mut server, &mut m, from, &packet, Sender::Unauthenticated);
            }
            // Geneve data (a WireGuard packet) from an address.
            5 => {
                let from = addr(input.u8());
                let vni = m.vni(input.u8());
                let len = input.u8() as usize;
                let packet = frame(vni, false, PROTOCOL_WIREGUARD, &vec![0x04; len]);
                let action = send(&mut server, &mut m, from, &packet, Sender::Unauthenticated);
                let legs = m
                    .endpoints
                    .get(&vni)
                    .map(|ep| [ep.legs[0].bound, ep.legs[1].bound]);
                if let Some([Some(a), Some(b)]) = legs {
                    if from == a || from == b {
                        let to = if from == a { b } else { a };
                        assert_eq!(action, Action::Forward(to), "data between bound legs");
                    }
                }
            }
            // Time passes (up to ~11 minutes per op, in 10 ms steps).
            6 => m.now += Duration::from_millis(input.u16() as u64 * 10),
            _ => expire(&mut server, &mut m),
        }
    }
    expire(&mut server, &mut m);
}

fn allocate(
    server: &mut RelayServer,
    m: &mut Model,
    request: &AllocateRequest,
    addrs: &[SocketAddr],
    read: Option<&[u8]>,
) {
    let k = keys();
    let pair = sorted(request.client_disco);
    // A new endpoint for two clients (refusals and live pairs cost nothing: no cache).
    let fresh = k.clients.contains(&pair[0])
        && k.clients.contains(&pair[1])
        && pair[0] != pair[1]
        && !m.endpoints.values().any(|e| e.pair == pair);
    let result = match read.filter(|_| fresh) {
        Some(key) => allocate_cached(server, m, request, key),
        None => server.allocate(m.now, request),
    };
    if pair.contains(&k.server_public) || pair[0] == pair[1] {
        assert!(result.is_err(), "allocation must be refused: {result:?}");
        return;
    }
    let ep = match result {
        Ok(ep) => ep,
        Err(e) => panic!("allocation refused: {e:?}"),
    };
    m.allocations += 1;
    assert_eq!(ep.client_disco, pair);
    assert_eq!(ep.server_disco, k.server_public);
    assert_eq!(ep.addr_ports, addrs);
    let existing = m
        .endpoints
        .iter()
        .find(|(_, e)| e.pair == pair)
        .map(|(v, _)| *v);
    match existing {
        Some(vni) => assert_eq!(ep.vni, vni, "same pair, same endpoint"),
        None => {
            assert!(!m.endpoints.contains_key(&ep.vni), "VNI reused while live");
            m.endpoints.insert(
                ep.vni,
                Endpoint {
                    pair,
                    allocated_at: m.now,
                    legs: Default::default(),
                },
            );
        }
    }
}

/// Sends one datagram and checks the action against the model, then updates the model.
fn send(
    server: &mut RelayServer,
    m: &mut Model,
    from: SocketAddr,
    packet: &[u8],
    sender: Sender,
) -> Action {
    let action = server.handle_packet(m.now, from, packet);
    let header = geneve::parse(packet).ok();
    let vni = header.map(|h| h.vni.get()).unwrap_or_default();
    match &action {
        Action::Forward(to) => {
            assert!(header.is_some_and(|h| !h.control), "only data is forwarded");
            let ep = m.endpoints.get_mut(&vni).expect("forwarded on a live VNI");
            let (Some(a), Some(b)) = (ep.legs[0].bound, ep.legs[1].bound) else {
                panic!("forwarded before both legs were bound");
            };
            let (i, other) = if from == a { (0, b) } else { (1, a) };
            assert!(from == a || from == b, "forwarded from a stranger");
            assert_eq!(*to, other, "forwarded to the wrong leg");
            ep.legs[i].last_seen = Some(m.now);
            m.forwarded_packets += 1;
            m.forwarded_bytes += packet.len() as u64;
        }
        Action::Reply { to, packet: reply } => {
            assert_eq!(*to, from, "reply to the sender only");
            assert!(reply.len() <= packet.len(), "reply larger than the request");
            let Sender::Client(c, Some(Message::BindUdpRelayEndpoint(bind))) = &sender else {
                panic!("reply to something that is not a sealed Bind");
            };
            let (leg, other) = m.leg_of(vni, *c).expect("bind from a client of the VNI");
            let tokens = m.refill(from);
            assert!(*tokens >= 1.0, "challenged beyond the source's budget");
            *tokens -= 1.0;
            let challenge = open_challenge(*c, vni, reply);
            assert_eq!(
                (challenge.vni, challenge.generation, challenge.remote_key),
                (vni, bind.generation, other)
            );
            if let Some(ep) = m.endpoints.get_mut(&vni) {
                ep.legs[leg].in_progress = bind.generation;
            }
            m.issued.push(Issued {
                vni,
                leg,
                from,
                body: challenge,
                at: m.now,
            });
            // Old cookies stay useful to the fuzzer as "wrong cookie" material; cap the list.
            if m.issued.len() > 16 {
                m.issued.remove(0);
            }
        }
        Action::Accepted => {
            let Sender::Client(c, Some(Message::BindUdpRelayEndpointAnswer(answer))) = &sender
            else {
                panic!("accepted something that is not a sealed Answer");
            };
            let (leg, _) = m.leg_of(vni, *c).expect("answer from a client of the VNI");
            let issued = m
                .issued
                .iter()
                .any(|i| i.vni == vni && i.leg == leg && i.from == from && i.body == *answer);
            assert!(issued, "bound with a cookie the server did not issue here");
            let ep = m.endpoints.get_mut(&vni).expect("live VNI");
            assert_eq!(ep.legs[leg].in_progress, answer.generation);
            ep.legs[leg] = Leg {
                bound: Some(from),
                last_seen: Some(m.now),
                in_progress: 0,
            };
        }
        Action::Stun => assert!(tern::stun::is(packet)),
        Action::Drop(reason) => {
            if *reason == "bind_rate_limited" {
                let Sender::Client(c, Some(Message::BindUdpRelayEndpoint(_))) = &sender else {
                    panic!("rate-limited something that is not a sealed Bind");
                };
                assert!(m.leg_of(vni, *c).is_some(), "rate-limited a Bind off a leg");
                assert!(*m.refill(from) < 1.0, "rate-limited within the budget");
            }
            m.drops += 1;
        }
    }
    action
}

/// The Challenge in `reply`, opened as client `c` would.
fn open_challenge(c: usize, vni: u32, reply: &[u8]) -> BindBody {
    let k = keys();
    let header = geneve::parse(reply).expect("reply has a Geneve header");
    assert!(header.control && header.protocol == PROTOCOL_DISCO && header.vni.get() == vni);
    let body = reply.get(geneve::HEADER_LEN..).unwrap_or_default();
    let packet = disco::parse_packet(body).expect("reply is a disco packet");
    assert_eq!(packet.sender, k.server_public);
    match disco::open(&k.boxes[c], &packet) {
        Ok(Message::BindUdpRelayEndpointChallenge(body)) => body,
        other => panic!("reply is not a Challenge for the client: {other:?}"),
    }
}

/// `expire` removes exactly what the model says is stale; then status must match the model.
fn expire(server: &mut RelayServer, m: &mut Model) {
    let stale: Vec<u32> = m
        .endpoints
        .iter()
        .filter(|(_, ep)| ep.expired(m.now))
        .map(|(v, _)| *v)
        .collect();
    assert_eq!(server.expire(m.now), stale.len(), "expired endpoints");
    for vni in stale {
        m.endpoints.remove(&vni);
    }
    let status = server.status(m.now, 40000);
    assert_eq!(status.allocations, m.allocations);
    assert_eq!(status.forwarded_packets, m.forwarded_packets);
    assert_eq!(status.forwarded_bytes, m.forwarded_bytes);
    assert_eq!(status.drops.values().sum::<u64>(), m.drops, "drop counters");
    let sessions: Vec<u32> = status.sessions.iter().map(|s| s.vni).collect();
    let live: Vec<u32> = m.endpoints.keys().copied().collect();
    assert_eq!(sessions, live, "live sessions");
    for s in &status.sessions {
        let ep = &m.endpoints[&s.vni];
        for (leg, model) in s.legs.iter().zip(&ep.legs) {
            assert_eq!(leg.bound, model.bound.map(|a| a.to_string()));
        }
        assert_eq!(s.state == "open", ep.open());
    }
}
