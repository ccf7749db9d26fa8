//! Two peer tables talking through in-memory queues on a simulated clock.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::consts::*;
use super::*;
use crate::keys::NodePrivate;

const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

/// A minimal IPv4/UDP packet (checksums are not checked by WireGuard).
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
    p.extend_from_slice(&[
        ((8 + payload.len()) >> 8) as u8,
        (8 + payload.len()) as u8,
        0,
        0,
    ]);
    p.extend_from_slice(payload);
    p
}

/// One node: its peer table, what reached its TUN, and datagrams in flight to it.
struct Node {
    peers: WgPeers,
    tun: Vec<Vec<u8>>,
    inbox: VecDeque<Vec<u8>>,
    timer_wakeups: usize,
}

struct Net {
    a: Node,
    b: Node,
    now: Instant,
    out: Vec<u8>,
    /// Datagrams carried in total (handshakes, keepalives, data).
    carried: usize,
}

impl Net {
    fn new() -> Self {
        let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
        let mut a = WgPeers::new(ka.clone());
        let mut b = WgPeers::new(kb.clone());
        a.upsert(kb.public(), &["100.64.0.2/32".parse().unwrap()])
            .unwrap();
        b.upsert(ka.public(), &["100.64.0.1/32".parse().unwrap()])
            .unwrap();
        let node = |peers| Node {
            peers,
            tun: Vec::new(),
            inbox: VecDeque::new(),
            timer_wakeups: 0,
        };
        Net {
            a: node(a),
            b: node(b),
            now: Instant::now(),
            out: vec![0u8; 2048],
            carried: 0,
        }
    }

    fn nodes(&mut self, a_sends: bool) -> (&mut Node, &mut Node) {
        if a_sends {
            (&mut self.a, &mut self.b)
        } else {
            (&mut self.b, &mut self.a)
        }
    }

    /// The TUN of A (a_sends) or B hands `packet` to WireGuard.
    fn send(&mut self, a_sends: bool, packet: &[u8]) -> WgOutput {
        let now = self.now;
        let mut out = std::mem::take(&mut self.out);
        let (from, to) = self.nodes(a_sends);
        let (_, res) = from.peers.encapsulate(now, packet, &mut out);
        if let WgOutput::ToNetwork(n) = res {
            to.inbox.push_back(out[..n].to_vec());
        }
        self.out = out;
        self.pump();
        res
    }

    /// Delivers datagrams until both inboxes are empty.
    fn pump(&mut self) {
        let now = self.now;
        let mut out = std::mem::take(&mut self.out);
        for _ in 0..1000 {
            let mut moved = false;
            for a_receives in [true, false] {
                let (to, from) = if a_receives {
                    (&mut self.a, &mut self.b)
                } else {
                    (&mut self.b, &mut self.a)
                };
                while let Some(d) = to.inbox.pop_front() {
                    moved = true;
                    self.carried += 1;
                    let (id, res) = to.peers.decapsulate(now, &d, &mut out);
                    match res {
                        WgOutput::ToNetwork(n) => {
                            from.inbox.push_back(out[..n].to_vec());
                            let id = id.unwrap();
                            to.peers
                                .drain(now, id, &mut out, |b| from.inbox.push_back(b.to_vec()));
                        }
                        WgOutput::ToTunnel(n) => to.tun.push(out[..n].to_vec()),
                        _ => {}
                    }
                }
            }
            if !moved {
                break;
            }
        }
        self.out = out;
    }

    /// Sleeps like the I/O tasks would: jump to each timer deadline up to `until`, run timers.
    fn idle_until(&mut self, until: Instant) {
        let mut out = std::mem::take(&mut self.out);
        loop {
            let next = [self.a.peers.next_deadline(), self.b.peers.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next.filter(|t| *t <= until) else {
                break;
            };
            self.now = self.now.max(next);
            let now = self.now;
            for a_runs in [true, false] {
                let (node, other) = self.nodes(a_runs);
                if node.peers.next_deadline().is_some_and(|t| t <= now) {
                    node.timer_wakeups += 1;
                    node.peers
                        .update_timers(now, &mut out, |_, b| other.inbox.push_back(b.to_vec()));
                }
            }
            self.out = std::mem::take(&mut out);
            self.pump();
            out = std::mem::take(&mut self.out);
            assert!(
                self.a.timer_wakeups + self.b.timer_wakeups < 10_000,
                "timer loop does not settle"
            );
        }
        self.now = until;
        self.out = out;
    }

    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        self.idle_until(until);
    }

    fn stats(&self, of_a: bool) -> WgStats {
        let n = if of_a { &self.a } else { &self.b };
        n.peers.session(0).unwrap().stats()
    }
}

/// A ping/pong exchange; returns whether both packets arrived intact.
fn exchange(net: &mut Net, tag: &str) {
    let ping = udp4(A_IP, B_IP, format!("ping {tag}").as_bytes());
    net.send(true, &ping);
    assert_eq!(net.b.tun.last(), Some(&ping), "B did not get {tag}");
    let pong = udp4(B_IP, A_IP, format!("pong {tag}").as_bytes());
    net.send(false, &pong);
    assert_eq!(net.a.tun.last(), Some(&pong), "A did not get {tag}");
}

#[test]
fn handshake_then_data_both_ways() {
    let mut net = Net::new();
    // The first packet is queued behind the handshake and delivered when it completes.
    let first = udp4(A_IP, B_IP, b"first");
    assert!(matches!(net.send(true, &first), WgOutput::ToNetwork(148)));
    assert_eq!(net.b.tun, vec![first]);
    assert!(net.a.peers.session(0).unwrap().is_established(net.now));
    exchange(&mut net, "1");
    assert_eq!(net.stats(true).handshakes_completed, 1);
    assert_eq!(net.stats(false).rx_packets, 2);
}

#[test]
fn a_late_peer_answers_an_early_initiator_at_once() {
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let mut a = WgPeers::new(ka.clone());
    let mut b = WgPeers::new(kb.clone());
    a.upsert(kb.public(), &["100.64.0.2/32".parse().unwrap()])
        .unwrap();
    let now = Instant::now();
    let mut out = vec![0u8; 2048];
    // A knows B and sends; B does not know A yet: the initiation names A but finds no peer.
    let first = udp4(A_IP, B_IP, b"early");
    let (_, res) = a.encapsulate(now, &first, &mut out);
    let WgOutput::ToNetwork(n) = res else {
        panic!("expected a handshake initiation, got {res:?}")
    };
    let init = out[..n].to_vec();
    assert_eq!(b.identify(&init), None);
    assert_eq!(b.initiator_key(&init), Some(ka.public()));
    assert_eq!(b.initiator_key(&udp4(A_IP, B_IP, b"not wg")), None);
    // B learns A from its netmap and starts a handshake itself, at once.
    let id = b
        .upsert(ka.public(), &["100.64.0.1/32".parse().unwrap()])
        .unwrap();
    let res = b.initiate_handshake(now, id, &mut out);
    let WgOutput::ToNetwork(n) = res else {
        panic!("expected B's initiation, got {res:?}")
    };
    // A answers, B completes; A's queued packet follows the new session.
    let b_init = out[..n].to_vec();
    let (_, res) = a.decapsulate(now, &b_init, &mut out);
    let WgOutput::ToNetwork(n) = res else {
        panic!("expected A's response, got {res:?}")
    };
    let response = out[..n].to_vec();
    // B confirms the session with a keepalive; only then may A, the responder, send its queue.
    let (_, res) = b.decapsulate(now, &response, &mut out);
    let WgOutput::ToNetwork(n) = res else {
        panic!("expected B's keepalive, got {res:?}")
    };
    let keepalive = out[..n].to_vec();
    let (_, res) = a.decapsulate(now, &keepalive, &mut out);
    assert_eq!(res, WgOutput::Done);
    let mut queued = Vec::new();
    a.drain(now, 0, &mut out, |p| queued.push(p.to_vec()));
    let mut delivered = Vec::new();
    for datagram in queued {
        if let (_, WgOutput::ToTunnel(n)) = b.decapsulate(now, &datagram, &mut out) {
            delivered.push(out[..n].to_vec());
        }
    }
    assert_eq!(delivered, vec![first]);
    // With a session (or an initiation under way), nothing more is started.
    assert_eq!(b.initiate_handshake(now, id, &mut out), WgOutput::Done);
    assert_eq!(b.retry_handshake_now(now, id, &mut out), WgOutput::Done);
}

#[test]
fn a_pending_handshake_is_retransmitted_on_demand_only() {
    let mut net = Net::new();
    let mut out = vec![0u8; 2048];
    // Nothing pending: nothing to retry.
    assert_eq!(
        net.a.peers.retry_handshake_now(net.now, 0, &mut out),
        WgOutput::Done
    );
    // A's first initiation is lost (B is not there yet).
    let (_, res) = net
        .a
        .peers
        .encapsulate(net.now, &udp4(A_IP, B_IP, b"lost"), &mut out);
    assert!(matches!(res, WgOutput::ToNetwork(148)));
    // B comes up; A retries at once rather than after 5 s, and the queued packet arrives.
    net.now += Duration::from_millis(300);
    let res = net.a.peers.retry_handshake_now(net.now, 0, &mut out);
    let WgOutput::ToNetwork(n) = res else {
        panic!("expected a retransmitted initiation, got {res:?}")
    };
    net.b.inbox.push_back(out[..n].to_vec());
    net.pump();
    assert_eq!(net.b.tun, vec![udp4(A_IP, B_IP, b"lost")]);
    assert_eq!(net.stats(true).handshakes_sent, 2);
}

#[test]
fn idle_tunnel_comes_back_after_reject_after_time() {
    let mut net = Net::new();
    exchange(&mut net, "before");
    let wakeups_before = net.a.timer_wakeups + net.b.timer_wakeups;
    // Ten simulated minutes, far past REJECT_AFTER_TIME and REKEY_ATTEMPT_TIME.
    net.advance(Duration::from_secs(600));
    assert!(!net.a.peers.session(0).unwrap().is_established(net.now));
    assert!(!net.b.peers.session(0).unwrap().is_established(net.now));
    // Idle means no timers left: the I/O task can sleep forever.
    assert_eq!(net.a.peers.next_deadline(), None);
    assert_eq!(net.b.peers.next_deadline(), None);
    let wakeups = net.a.timer_wakeups + net.b.timer_wakeups - wakeups_before;
    assert!(wakeups <= 6, "idle tunnel woke {wakeups} times");
    exchange(&mut net, "after");
    assert_eq!(net.stats(true).handshakes_completed, 2);
}

#[test]
fn responder_can_restart_an_idle_tunnel() {
    let mut net = Net::new();
    exchange(&mut net, "before");
    net.advance(REJECT_AFTER_TIME + Duration::from_secs(1));
    let pong = udp4(B_IP, A_IP, b"unprompted");
    net.send(false, &pong);
    assert_eq!(net.a.tun.last(), Some(&pong));
}

#[test]
fn passive_keepalive_answers_one_way_data() {
    let mut net = Net::new();
    net.send(true, &udp4(A_IP, B_IP, b"one way"));
    let carried = net.carried;
    net.advance(KEEPALIVE_TIMEOUT + Duration::from_millis(1));
    // B owed A a keepalive: exactly one more datagram, and A's "unanswered" timer is cleared.
    assert_eq!(net.carried, carried + 1);
    assert_eq!(net.stats(true).handshakes_sent, 1);
    net.advance(Duration::from_secs(30));
    assert_eq!(
        net.stats(true).handshakes_sent,
        1,
        "no spurious rehandshake"
    );
}

#[test]
fn unanswered_data_triggers_a_new_handshake() {
    let mut net = Net::new();
    exchange(&mut net, "0");
    // Lose everything A sends from now on.
    net.send(true, &udp4(A_IP, B_IP, b"lost"));
    net.b.tun.clear();
    net.advance(Duration::from_secs(1));
    let sent = net.stats(true).handshakes_sent;
    // Drop B's keepalive too: clear B's inbox/outbox by advancing with a broken link.
    let start = net.now;
    let mut out = vec![0u8; 2048];
    let mut initiations = 0;
    let mut now = start;
    while now < start + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + Duration::from_secs(1) {
        now += Duration::from_millis(250);
        net.a.peers.update_timers(now, &mut out, |_, b| {
            if b[0] == 1 {
                initiations += 1;
            }
        });
    }
    assert!(
        initiations >= 1,
        "A never re-handshook after unanswered data"
    );
    assert!(net.stats(true).handshakes_sent > sent);
}

#[test]
fn rekeys_under_steady_traffic_without_loss() {
    let mut net = Net::new();
    for i in 0..300 {
        exchange(&mut net, &i.to_string());
        net.advance(Duration::from_secs(1));
    }
    let completed = net.stats(true).handshakes_completed + net.stats(false).handshakes_completed;
    assert!(completed >= 3, "only {completed} handshakes in 5 minutes");
    assert_eq!(net.stats(false).malformed, 0);
    assert_eq!(net.stats(true).malformed, 0);
}

#[test]
fn packet_from_outside_allowed_ips_is_dropped() {
    let mut net = Net::new();
    exchange(&mut net, "0");
    let spoofed = udp4(Ipv4Addr::new(100, 64, 0, 99), A_IP, b"spoof");
    let mut out = vec![0u8; 2048];
    let now = net.now;
    let res = net
        .b
        .peers
        .session_mut(0)
        .unwrap()
        .encapsulate(now, &spoofed, &mut out);
    let WgOutput::ToNetwork(n) = res else {
        panic!("{res:?}")
    };
    let datagram = out[..n].to_vec();
    let (_, got) = net.a.peers.decapsulate(now, &datagram, &mut out);
    assert_eq!(got, WgOutput::Dropped(DropReason::NotAllowed));
}

#[test]
fn outbound_without_route_is_dropped() {
    let mut net = Net::new();
    let res = net.send(true, &udp4(A_IP, Ipv4Addr::new(100, 64, 0, 77), b"x"));
    assert_eq!(res, WgOutput::Dropped(DropReason::NoPeer));
}

#[test]
fn small_buffers_are_refused_not_panicking() {
    let mut net = Net::new();
    let mut tiny = [0u8; 16];
    let s = net.a.peers.session_mut(0).unwrap();
    let now = net.now;
    assert_eq!(
        s.encapsulate(now, &[0x45; 40], &mut tiny),
        WgOutput::Dropped(DropReason::BufferTooSmall)
    );
    assert_eq!(
        s.decapsulate(now, &[4; 64], &mut tiny),
        WgOutput::Dropped(DropReason::BufferTooSmall)
    );
    assert_eq!(
        s.update_timers(now, &mut tiny),
        WgOutput::Dropped(DropReason::BufferTooSmall)
    );
}

#[test]
fn malformed_datagrams_are_counted_and_dropped() {
    let mut net = Net::new();
    exchange(&mut net, "0");
    let mut out = vec![0u8; 2048];
    let now = net.now;
    // A real data packet, then mangled copies of it.
    let s = net.a.peers.session_mut(0).unwrap();
    let WgOutput::ToNetwork(n) = s.encapsulate(now, &udp4(A_IP, B_IP, b"x"), &mut out) else {
        panic!("no data packet")
    };
    let good = out[..n].to_vec();
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![4],
        good[..20].to_vec(),
        flipped,
        vec![1; 148],
        vec![2; 92],
        vec![3; 64],
        vec![9; 100],
    ];
    let b = net.b.peers.session_mut(0).unwrap();
    let before = b.stats().malformed;
    for c in &cases {
        let res = b.decapsulate(now, c, &mut out);
        assert!(matches!(res, WgOutput::Dropped(_)), "{c:?} gave {res:?}");
    }
    assert_eq!(b.stats().malformed - before, cases.len() as u64);
    // The replay of a good packet is dropped too; a fresh one still works.
    assert!(matches!(
        b.decapsulate(now, &good, &mut out),
        WgOutput::ToTunnel(_)
    ));
    assert!(matches!(
        b.decapsulate(now, &good, &mut out),
        WgOutput::Dropped(_)
    ));
    exchange(&mut net, "still works");
}

proptest! {
    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), kind in 0u8..6) {
        let mut net = Net::new();
        let mut d = data;
        if let Some(b) = d.first_mut() { *b = kind; }
        let mut out = vec![0u8; 2048];
        let now = net.now;
        let (_, res) = net.b.peers.decapsulate(now, &d, &mut out);
        prop_assert!(!matches!(res, WgOutput::ToTunnel(_)));
    }
}

proptest! {
    #[test]
    fn garbage_of_exact_wireguard_sizes_never_panics(
        kind in 1u8..5,
        fill in proptest::collection::vec(any::<u8>(), 148),
        extra in 0usize..200,
    ) {
        let mut net = Net::new();
        exchange(&mut net, "0");
        let len = match kind { 1 => 148, 2 => 92, 3 => 64, _ => 32 + extra.min(116) };
        let mut d = fill[..len.min(148)].to_vec();
        d[0] = kind;
        d[1..4].fill(0);
        let mut out = vec![0u8; 2048];
        let now = net.now;
        let (_, res) = net.b.peers.decapsulate(now, &d, &mut out);
        prop_assert!(!matches!(res, WgOutput::ToTunnel(_)));
        // The session still works afterwards.
        exchange(&mut net, "after garbage");
    }
}

#[test]
fn peer_table_routes_to_the_right_peer_and_forgets_removed_ones() {
    let me = NodePrivate::generate();
    let mut peers = WgPeers::new(me);
    let (k1, k2) = (
        NodePrivate::generate().public(),
        NodePrivate::generate().public(),
    );
    let id1 = peers
        .upsert(
            k1,
            &[
                "100.64.0.1/32".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
        )
        .unwrap();
    let id2 = peers
        .upsert(
            k2,
            &[
                "100.64.0.2/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
        )
        .unwrap();
    let ip = |s: &str| s.parse().unwrap();
    assert_eq!(peers.route(ip("10.1.2.3")), Some(id2));
    assert_eq!(peers.route(ip("10.2.2.3")), Some(id1));
    assert_eq!(peers.id_of(&k2), Some(id2));
    assert_eq!(peers.key_of(id1), Some(&k1));
    // Updating AllowedIPs replaces them.
    peers
        .upsert(k2, &["100.64.0.2/32".parse().unwrap()])
        .unwrap();
    assert_eq!(peers.route(ip("10.1.2.3")), Some(id1));
    peers.remove(&k1);
    assert_eq!(peers.route(ip("10.1.2.3")), None);
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers.upsert(crate::keys::NodePublic::zero(), &[]),
        Err(WgError::ZeroKey)
    );
    // A freed slot is reused for the next peer.
    let k3 = NodePrivate::generate().public();
    assert_eq!(peers.upsert(k3, &[]).unwrap(), id1);
}

#[test]
fn draining_a_big_queued_packet_into_a_small_buffer_is_refused() {
    let mut net = Net::new();
    let now = net.now;
    let mut big_out = vec![0u8; 2048];
    let big = udp4(A_IP, B_IP, &[7u8; 1400]);
    let a = net.a.peers.session_mut(0).unwrap();
    let WgOutput::ToNetwork(n) = a.encapsulate(now, &big, &mut big_out) else {
        panic!("no initiation")
    };
    let init = big_out[..n].to_vec();
    let (_, WgOutput::ToNetwork(m)) = net.b.peers.decapsulate(now, &init, &mut big_out) else {
        panic!("no response")
    };
    let response = big_out[..m].to_vec();
    let a = net.a.peers.session_mut(0).unwrap();
    assert!(matches!(
        a.decapsulate(now, &response, &mut big_out),
        WgOutput::ToNetwork(_)
    ));
    let mut small = vec![0u8; 200];
    assert_eq!(
        a.drain(now, &mut small),
        WgOutput::Dropped(DropReason::BufferTooSmall)
    );
    let WgOutput::ToNetwork(k) = a.drain(now, &mut big_out) else {
        panic!("queued packet lost")
    };
    assert_eq!(k, big.len() + DATA_OVERHEAD);
    assert_eq!(a.drain(now, &mut big_out), WgOutput::Done);
}

#[test]
fn peers_hold_crypto_state_only_once_used_and_until_reset() {
    let mut net = Net::new();
    let dormant = |node: &Node| node.peers.session(0).expect("session").is_dormant();
    assert!(dormant(&net.a) && dormant(&net.b), "no traffic yet");
    exchange(&mut net, "first");
    assert!(!dormant(&net.a) && !dormant(&net.b));
    // Keys expire after REJECT_AFTER_TIME without traffic: the state is dropped, not kept.
    net.advance(REJECT_AFTER_TIME * 2);
    assert!(
        dormant(&net.a) && dormant(&net.b),
        "expired sessions free their state"
    );
    exchange(&mut net, "again");
    assert!(!dormant(&net.a));
}
