use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn quality(a: &str, latency_ms: u64) -> AddrQuality {
    AddrQuality {
        addr: addr(a),
        vni: None,
        latency: Duration::from_millis(latency_ms),
        wire_mtu: DEFAULT_WIRE_MTU,
    }
}

// ----- betterAddr ---------------------------------------------------------------------------

#[test]
fn better_addr_rules() {
    let b = quality("203.0.113.1:1", 200);
    // 190 ms vs 200 ms: 5 points, better.
    assert!(better_addr(&quality("203.0.113.2:1", 190), Some(&b)));
    // 199 ms vs 200 ms: < 1 % better is not enough (hysteresis).
    assert!(!better_addr(&quality("203.0.113.2:1", 199), Some(&b)));
    // 198 ms: 1 point: still not enough.
    assert!(!better_addr(&quality("203.0.113.2:1", 198), Some(&b)));
    // 197 ms: 2 points: better.
    assert!(better_addr(&quality("203.0.113.2:1", 197), Some(&b)));
    // Slower is never better without a bonus.
    assert!(!better_addr(&quality("203.0.113.2:1", 250), Some(&b)));
    // Private address at equal latency gets +20.
    assert!(better_addr(&quality("192.168.1.2:1", 200), Some(&b)));
    // IPv6 at equal latency gets +10.
    assert!(better_addr(&quality("[2001:db8::1]:1", 200), Some(&b)));
    // Private but 25 % slower loses (20 < 25 points for b).
    assert!(!better_addr(
        &quality("10.0.0.2:1", 200),
        Some(&quality("203.0.113.1:1", 150))
    ));
    // Loopback +50, link-local +30.
    assert!(better_addr(
        &quality("127.0.0.1:1", 200),
        Some(&quality("10.0.0.1:1", 200))
    ));
    assert!(better_addr(
        &quality("169.254.1.1:1", 200),
        Some(&quality("10.0.0.1:1", 200))
    ));
    assert!(better_addr(
        &quality("[fe80::1]:1", 200),
        Some(&quality("[fd00::1]:1", 200))
    ));
    // Anything beats nothing.
    assert!(better_addr(&b, None));
    // Same address: only a larger MTU is better.
    let mut bigger = b;
    bigger.wire_mtu = 1500;
    bigger.latency = Duration::from_millis(900);
    assert!(better_addr(&bigger, Some(&b)));
    assert!(!better_addr(&quality("203.0.113.1:1", 1), Some(&b)));
    // Direct beats relay regardless of latency; relay never beats direct.
    let mut relay = quality("198.51.100.9:7", 1);
    relay.vni = Some(7);
    assert!(better_addr(&b, Some(&relay)));
    assert!(!better_addr(&relay, Some(&b)));
}

// ----- single-peer unit tests ---------------------------------------------------------------

fn local(node: u8, eps: &[&str]) -> LocalNet {
    LocalNet {
        node_key: NodePublic::from_bytes([node; 32]),
        endpoints: eps.iter().map(|e| addr(e)).collect(),
        udp_working: Some(true),
        mapping_varies: Some(false),
    }
}

fn info(node: u8, home: Option<u16>, eps: &[&str]) -> PeerInfo {
    PeerInfo {
        node_key: NodePublic::from_bytes([node; 32]),
        disco_key: DiscoPublic::from_bytes([node + 100; 32]),
        home_derp: home,
        endpoints: eps.iter().map(|e| addr(e)).collect(),
        mapping_varies: Some(false),
        udp_working: Some(true),
        relay_capable: true,
    }
}

fn drain(peer: &mut Peer) -> Vec<Transmit> {
    std::iter::from_fn(|| peer.poll_transmit()).collect()
}

fn ping(tx: u8) -> Message {
    Message::Ping(Ping {
        tx_id: TxId([tx; 12]),
        node_key: Some(NodePublic::from_bytes([2; 32])),
        padding: 0,
    })
}

#[test]
fn ping_over_derp_is_answered_over_derp_with_magic_src() {
    let now = Instant::now();
    let mut p = Peer::new(now, local(1, &[]), info(2, Some(2), &[]));
    p.handle_disco(now, PathSource::Derp { region: 9 }, ping(1));
    let out = drain(&mut p);
    assert_eq!(
        out,
        vec![Transmit {
            dest: Dest::Derp(9),
            msg: Message::Pong(Pong {
                tx_id: TxId([1; 12]),
                src: addr("127.3.3.40:9"),
            }),
        }]
    );
    // No endpoint learned from DERP.
    assert!(p.candidates().is_empty());
}

#[test]
fn ping_over_udp_is_answered_once_and_teaches_a_candidate() {
    let now = Instant::now();
    let mut p = Peer::new(now, local(1, &[]), info(2, Some(2), &[]));
    let src = addr("198.51.100.7:4000");
    p.handle_disco(now, PathSource::Udp(src), ping(1));
    let out = drain(&mut p);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dest, Dest::Direct(src));
    assert!(matches!(&out[0].msg, Message::Pong(Pong { src: s, .. }) if *s == src));
    assert_eq!(p.poll_event(), Some(Event::AddrForPeer(src)));
    // The same TxID again (seen twice): not answered again.
    p.handle_disco(now, PathSource::Udp(src), ping(1));
    assert!(drain(&mut p).is_empty());
    let c = p.candidates();
    assert_eq!(c.len(), 1);
    assert!(c[0].from_ping && !c[0].from_netmap);
    // Learned candidates expire 45 s after the last ping.
    p.on_outgoing(now + Duration::from_secs(46));
    assert!(p.candidates().is_empty());
}

#[test]
fn ping_over_udp_while_sending_untrusted_is_pinged_back_at_once() {
    let t0 = Instant::now();
    let src = addr("198.51.100.7:4000");
    let mut p = Peer::new(t0, local(1, &[]), info(2, Some(2), &["198.51.100.7:4000"]));
    // Traffic starts: a discovery ping to the netmap endpoint (and a CallMeMaybe) go out.
    p.on_outgoing(t0);
    let first = drain(&mut p);
    assert!(first
        .iter()
        .any(|t| t.dest == Dest::Direct(src) && matches!(t.msg, Message::Ping(_))));
    // 10 ms later the peer's ping arrives from that address: pong, and our ping again.
    let t1 = t0 + Duration::from_millis(10);
    p.handle_disco(t1, PathSource::Udp(src), ping(1));
    let out = drain(&mut p);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(out[0].msg, Message::Pong(_)));
    assert_eq!(out[1].dest, Dest::Direct(src));
    let Message::Ping(back) = &out[1].msg else {
        panic!("expected a ping back, got {:?}", out[1].msg)
    };
    // Its pong makes the path direct.
    p.handle_disco(
        t1 + Duration::from_millis(1),
        PathSource::Udp(src),
        Message::Pong(Pong {
            tx_id: back.tx_id,
            src: addr("203.0.113.1:41641"),
        }),
    );
    assert!(matches!(p.current_path(), Path::Direct { addr, .. } if addr == src));
    // Trusted now: a further ping is only answered.
    p.handle_disco(t1 + Duration::from_millis(2), PathSource::Udp(src), ping(2));
    let out = drain(&mut p);
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].msg, Message::Pong(_)));
}

#[test]
fn call_me_maybe_over_derp_pings_all_now_and_over_udp_is_ignored() {
    let t0 = Instant::now();
    let mut p = Peer::new(
        t0,
        local(1, &["192.0.2.1:1"]),
        info(2, Some(2), &["203.0.113.5:1"]),
    );
    p.on_outgoing(t0);
    let first = drain(&mut p);
    // One discovery ping to the netmap candidate, then our CallMeMaybe via the peer's home.
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[0].dest, Dest::Direct(addr("203.0.113.5:1")));
    assert_eq!(
        first[1],
        Transmit {
            dest: Dest::Derp(2),
            msg: Message::CallMeMaybe(vec![addr("192.0.2.1:1")]),
        }
    );
    // Within 5 s nothing is pinged again …
    let t1 = t0 + Duration::from_secs(1);
    p.on_outgoing(t1);
    assert!(drain(&mut p).is_empty());
    // … a CallMeMaybe over UDP changes nothing …
    let cmm = Message::CallMeMaybe(vec![addr("203.0.113.6:1")]);
    p.handle_disco(t1, PathSource::Udp(addr("203.0.113.6:1")), cmm.clone());
    assert!(drain(&mut p).is_empty());
    assert_eq!(p.candidates().len(), 1);
    // … but over DERP it adds candidates and pings every one at once, without a CallMeMaybe back.
    p.handle_disco(t1, PathSource::Derp { region: 2 }, cmm);
    let out = drain(&mut p);
    let dests: Vec<Dest> = out.iter().map(|t| t.dest).collect();
    assert_eq!(
        dests,
        vec![
            Dest::Direct(addr("203.0.113.5:1")),
            Dest::Direct(addr("203.0.113.6:1"))
        ]
    );
    assert!(out.iter().all(|t| matches!(t.msg, Message::Ping(_))));
    // A later CallMeMaybe without that endpoint removes it (the netmap one stays).
    p.handle_disco(
        t1,
        PathSource::Derp { region: 2 },
        Message::CallMeMaybe(vec![]),
    );
    let eps: Vec<SocketAddr> = p.candidates().iter().map(|c| c.addr).collect();
    assert_eq!(eps, vec![addr("203.0.113.5:1")]);
}

#[test]
fn a_peer_without_candidates_is_invited_to_ping_us_every_10_s_at_most() {
    let t0 = Instant::now();
    let ours = addr("192.0.2.1:1");
    let mut p = Peer::new(t0, local(1, &["192.0.2.1:1"]), info(2, Some(2), &[]));
    let invitation = Transmit {
        dest: Dest::Derp(2),
        msg: Message::CallMeMaybe(vec![ours]),
    };
    // A CLI ping goes via DERP and brings our endpoints along.
    p.cli_ping(t0);
    let out = drain(&mut p);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(out[0].msg, Message::Ping(_)) && out[0].dest == Dest::Derp(2));
    assert_eq!(out[1], invitation);
    // Pings and traffic within 10 s send no second invitation …
    for secs in [1, 5, 9] {
        let t = t0 + Duration::from_secs(secs);
        p.cli_ping(t);
        p.on_outgoing(t);
        assert!(!drain(&mut p).contains(&invitation), "at {secs} s");
    }
    // … traffic after 10 s does.
    let t10 = t0 + INVITE_INTERVAL;
    p.on_outgoing(t10);
    assert_eq!(drain(&mut p), vec![invitation]);
    // The peer's ping over UDP makes a candidate: from then on Go's rules apply, and our
    // ping back goes to the address the ping came from.
    let theirs = addr("203.0.113.7:9");
    p.handle_disco(t10, PathSource::Udp(theirs), ping(1));
    let out = drain(&mut p);
    assert!(
        out.iter().all(|t| t.dest == Dest::Direct(theirs)),
        "{out:?}"
    );
    assert_eq!(out.len(), 2, "pong and ping back: {out:?}");
    // Without endpoints of our own there is nothing to invite to.
    let mut q = Peer::new(t0, local(1, &[]), info(2, Some(2), &[]));
    q.cli_ping(t0);
    q.on_outgoing(t0);
    assert!(drain(&mut q)
        .iter()
        .all(|t| !matches!(t.msg, Message::CallMeMaybe(_))));
}

#[test]
fn stale_own_endpoints_are_refreshed_before_call_me_maybe() {
    let t0 = Instant::now();
    let mut p = Peer::new(
        t0,
        local(1, &["192.0.2.1:1"]),
        info(2, Some(2), &["203.0.113.5:1"]),
    );
    let late = t0 + Duration::from_secs(30);
    p.on_outgoing(late);
    let out = drain(&mut p);
    assert_eq!(out.len(), 1, "only the ping: the CallMeMaybe waits");
    let events: Vec<Event> = std::iter::from_fn(|| p.poll_event()).collect();
    assert!(events.contains(&Event::NeedEndpointRefresh), "{events:?}");
    p.set_local(late, local(1, &["192.0.2.1:2"]));
    assert_eq!(
        drain(&mut p),
        vec![Transmit {
            dest: Dest::Derp(2),
            msg: Message::CallMeMaybe(vec![addr("192.0.2.1:2")]),
        }]
    );
}

#[test]
fn pong_makes_the_pinged_address_best_and_trusted_for_6_5_s() {
    let t0 = Instant::now();
    let cand = addr("203.0.113.5:1");
    let mut p = Peer::new(
        t0,
        local(1, &["192.0.2.1:1"]),
        info(2, Some(2), &["203.0.113.5:1"]),
    );
    assert_eq!(
        p.on_outgoing(t0),
        SendPlan {
            udp: None,
            derp: Some(2),
            relay: None
        }
    );
    let tx = match &drain(&mut p)[0].msg {
        Message::Ping(ping) => ping.tx_id,
        other => panic!("{other:?}"),
    };
    let t1 = t0 + Duration::from_millis(20);
    // The pong's source differs (a NAT rewrote it): the pinged address is still adopted.
    let pong = Message::Pong(Pong {
        tx_id: tx,
        src: addr("192.0.2.1:1"),
    });
    p.handle_disco(t1, PathSource::Udp(addr("203.0.113.5:9")), pong.clone());
    assert_eq!(
        p.current_path(),
        Path::Direct {
            addr: cand,
            latency: Duration::from_millis(20)
        }
    );
    assert_eq!(p.path_reason(), PathReason::Direct);
    assert_eq!(
        p.send_plan(t1),
        SendPlan {
            udp: Some(cand),
            derp: None,
            relay: None
        }
    );
    // A replayed pong (TxID consumed) changes nothing.
    p.handle_disco(t1, PathSource::Udp(cand), pong);
    // Without heartbeats answered, trust lapses after 6.5 s: both paths again.
    let deadline = p.poll_timeout().unwrap();
    assert!(deadline.0 <= t1 + TRUST_UDP_ADDR_DURATION);
    let t2 = t1 + TRUST_UDP_ADDR_DURATION;
    p.handle_timeout(t2);
    assert_eq!(
        p.send_plan(t2),
        SendPlan {
            udp: Some(cand),
            derp: Some(2),
            relay: None
        }
    );
    assert_eq!(p.current_path(), Path::Derp { region: 2 });
    assert_eq!(p.path_reason(), PathReason::DirectLost);
}

#[test]
fn pong_via_derp_never_changes_the_path() {
    let t0 = Instant::now();
    let mut p = Peer::new(t0, local(1, &[]), info(2, Some(2), &["203.0.113.5:1"]));
    p.on_outgoing(t0);
    let tx = match &drain(&mut p)[0].msg {
        Message::Ping(ping) => ping.tx_id,
        other => panic!("{other:?}"),
    };
    let pong = Message::Pong(Pong {
        tx_id: tx,
        src: addr("127.3.3.40:2"),
    });
    p.handle_disco(t0, PathSource::Derp { region: 2 }, pong);
    assert!(p.best_addr().is_none());
    assert_eq!(p.current_path(), Path::Derp { region: 2 });
}

#[test]
fn disco_key_change_resets_path_state_but_keeps_candidates() {
    let t0 = Instant::now();
    let cand = addr("203.0.113.5:1");
    let mut p = Peer::new(t0, local(1, &[]), info(2, Some(2), &["203.0.113.5:1"]));
    p.on_outgoing(t0);
    let tx = match &drain(&mut p)[0].msg {
        Message::Ping(ping) => ping.tx_id,
        other => panic!("{other:?}"),
    };
    p.handle_disco(
        t0,
        PathSource::Udp(cand),
        Message::Pong(Pong {
            tx_id: tx,
            src: cand,
        }),
    );
    assert_eq!(p.path_reason(), PathReason::Direct);
    let mut restarted = info(2, Some(2), &["203.0.113.5:1"]);
    restarted.disco_key = DiscoPublic::from_bytes([77; 32]);
    p.update_info(t0, restarted);
    assert!(p.best_addr().is_none());
    assert_eq!(p.current_path(), Path::Derp { region: 2 });
    assert_eq!(p.path_reason(), PathReason::Idle);
    assert_eq!(p.candidates().len(), 1);
    assert_eq!(p.poll_timeout(), None, "timers cancelled");
}

#[test]
fn no_derp_and_no_direct_is_no_path() {
    let t0 = Instant::now();
    let mut p = Peer::new(t0, local(1, &[]), info(2, None, &[]));
    assert_eq!(p.on_outgoing(t0), SendPlan::default());
    assert_eq!(p.current_path(), Path::None);
    assert_eq!(p.path_reason(), PathReason::NoDerpRegion);
    // Hearing the peer over some region gives a route back.
    p.handle_disco(t0, PathSource::Derp { region: 4 }, ping(3));
    assert_eq!(p.send_plan(t0).derp, Some(4));
}

#[test]
fn cli_ping_goes_via_derp_and_candidates_then_only_the_trusted_path() {
    let t0 = Instant::now();
    let cand = addr("203.0.113.5:1");
    let mut p = Peer::new(
        t0,
        local(1, &["192.0.2.1:1"]),
        info(2, Some(2), &["203.0.113.5:1"]),
    );
    let txs = p.cli_ping(t0);
    let out = drain(&mut p);
    let dests: Vec<Dest> = out.iter().map(|t| t.dest).collect();
    // Pings via DERP and to the candidate, and our CallMeMaybe at once (Go: at the heartbeat).
    assert_eq!(
        dests,
        vec![Dest::Derp(2), Dest::Direct(cand), Dest::Derp(2)]
    );
    assert_eq!(out[2].msg, Message::CallMeMaybe(vec![addr("192.0.2.1:1")]));
    assert_eq!(txs.len(), 2);
    // A second ping within 5 s brings no second CallMeMaybe.
    let _ = p.cli_ping(t0 + Duration::from_secs(1));
    let again = drain(&mut p);
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(again.iter().all(|t| matches!(t.msg, Message::Ping(_))));
    // The DERP reply is reported but changes nothing.
    let t1 = t0 + Duration::from_millis(50);
    let derp_pong = Message::Pong(Pong {
        tx_id: txs[0],
        src: addr("127.3.3.40:2"),
    });
    p.handle_disco(t1, PathSource::Derp { region: 2 }, derp_pong);
    let pongs: Vec<Event> = std::iter::from_fn(|| p.poll_event())
        .filter(|e| matches!(e, Event::Pong { .. }))
        .collect();
    assert_eq!(
        pongs,
        vec![Event::Pong {
            tx_id: txs[0],
            via: PathSource::Derp { region: 2 },
            latency: Duration::from_millis(50),
            src: addr("127.3.3.40:2"),
            cli: true,
        }]
    );
    assert_eq!(p.current_path(), Path::Derp { region: 2 });
    // The UDP reply upgrades the path.
    let t2 = t0 + Duration::from_millis(60);
    p.handle_disco(
        t2,
        PathSource::Udp(cand),
        Message::Pong(Pong {
            tx_id: txs[1],
            src: cand,
        }),
    );
    assert!(matches!(p.current_path(), Path::Direct { addr, .. } if addr == cand));
    // With a trusted path, a CLI ping goes to that address only.
    let _ = drain(&mut p);
    let txs = p.cli_ping(t2);
    assert_eq!(txs.len(), 1);
    assert_eq!(drain(&mut p)[0].dest, Dest::Direct(cand));
    // CLI pings do not hold back discovery: right after one, traffic still pings the candidate.
    let mut q = Peer::new(t0, local(1, &[]), info(2, Some(2), &["203.0.113.5:1"]));
    q.cli_ping(t0);
    let _ = drain(&mut q);
    q.on_outgoing(t0 + Duration::from_millis(1));
    assert!(drain(&mut q).iter().any(|t| t.dest == Dest::Direct(cand)));
}

// ----- two machines on a simulated network --------------------------------------------------

const DIRECT_DELAY: Duration = Duration::from_millis(10);
const DERP_DELAY: Duration = Duration::from_millis(40);
const TRAFFIC_EVERY: Duration = Duration::from_millis(500);

/// One simulated machine: its view of the other machine and its NAT.
struct Node {
    peer: Peer,
    local: LocalNet,
    /// The address its NAT maps it to (what it advertises).
    public: SocketAddr,
    /// Destinations it has sent to: its NAT lets only those in (address-dependent filtering).
    opened: BTreeSet<SocketAddr>,
    traffic: bool,
    pings_in: u64,
    pings_answered: u64,
    discovery_pings_out: u64,
    call_me_maybes_out: u64,
    changes: Vec<PathChange>,
}

struct Delivery {
    at: Instant,
    to: usize,
    from: PathSource,
    msg: Message,
}

struct Sim {
    t0: Instant,
    now: Instant,
    nodes: Vec<Node>,
    queue: Vec<Delivery>,
    /// Hard NAT / firewall: every direct datagram is lost.
    direct_blocked: bool,
    next_traffic: Instant,
}

const A: usize = 0;
const B: usize = 1;
const HOME: [u16; 2] = [1, 2];
const PUBLIC: [&str; 2] = ["203.0.113.10:41641", "198.51.100.20:41641"];
/// Private LAN addresses the other side cannot reach (advertised like Go does).
const LAN: [&str; 2] = ["10.1.0.10:41641", "10.2.0.20:41641"];

impl Sim {
    /// Two machines that know each other from the netmap, with `advertise[i]` saying whether
    /// machine i's endpoints are in the netmap, and hard-NAT facts per machine.
    fn new(advertise: [bool; 2], hard: [bool; 2]) -> Sim {
        let t0 = Instant::now();
        let nodes = (0..2)
            .map(|i| {
                let other = 1 - i;
                let local = LocalNet {
                    node_key: NodePublic::from_bytes([i as u8 + 1; 32]),
                    endpoints: vec![addr(PUBLIC[i]), addr(LAN[i])],
                    udp_working: Some(true),
                    mapping_varies: Some(hard[i]),
                };
                let peer_info = PeerInfo {
                    node_key: NodePublic::from_bytes([other as u8 + 1; 32]),
                    disco_key: DiscoPublic::from_bytes([other as u8 + 11; 32]),
                    home_derp: Some(HOME[other]),
                    endpoints: if advertise[other] {
                        vec![addr(PUBLIC[other]), addr(LAN[other])]
                    } else {
                        vec![]
                    },
                    mapping_varies: Some(hard[other]),
                    udp_working: Some(true),
                    relay_capable: true,
                };
                Node {
                    peer: Peer::new(t0, local.clone(), peer_info),
                    local,
                    public: addr(PUBLIC[i]),
                    opened: BTreeSet::new(),
                    traffic: true,
                    pings_in: 0,
                    pings_answered: 0,
                    discovery_pings_out: 0,
                    call_me_maybes_out: 0,
                    changes: Vec::new(),
                }
            })
            .collect();
        Sim {
            t0,
            now: t0,
            nodes,
            queue: Vec::new(),
            direct_blocked: false,
            next_traffic: t0,
        }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn elapsed(&self) -> f64 {
        (self.now - self.t0).as_secs_f64()
    }

    /// Runs the simulated clock to `secs` after start.
    fn run_until(&mut self, secs: f64) {
        let end = self.at(secs);
        for _ in 0..2_000_000 {
            let next = self.next_deadline();
            match next {
                Some(t) if t <= end => self.now = self.now.max(t),
                _ => {
                    self.now = end;
                    return;
                }
            }
            self.step();
        }
        panic!("simulation does not settle at t={:.3}s", self.elapsed());
    }

    fn next_deadline(&self) -> Option<Instant> {
        let deliveries = self.queue.iter().map(|d| d.at);
        let timers = self
            .nodes
            .iter()
            .filter_map(|n| n.peer.poll_timeout().map(|(t, _)| t));
        let traffic = self
            .nodes
            .iter()
            .any(|n| n.traffic)
            .then_some(self.next_traffic);
        deliveries.chain(timers).chain(traffic).min()
    }

    fn step(&mut self) {
        let now = self.now;
        self.queue.sort_by_key(|d| d.at);
        while self.queue.first().is_some_and(|d| d.at <= now) {
            let d = self.queue.remove(0);
            self.deliver(d);
        }
        for i in 0..2 {
            if self.nodes[i]
                .peer
                .poll_timeout()
                .is_some_and(|(t, _)| t <= now)
            {
                self.nodes[i].peer.handle_timeout(now);
                self.flush(i);
            }
        }
        if self.next_traffic <= now {
            for i in 0..2 {
                if self.nodes[i].traffic {
                    self.nodes[i].peer.on_outgoing(now);
                    self.flush(i);
                }
            }
            self.next_traffic = now + TRAFFIC_EVERY;
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let node = &mut self.nodes[d.to];
        if let PathSource::Udp(src) = d.from {
            if self.direct_blocked || !node.opened.contains(&src) {
                return; // lost in the network or dropped by the receiver's NAT
            }
        }
        let ping_tx = match &d.msg {
            Message::Ping(p) => Some(p.tx_id),
            _ => None,
        };
        node.peer.handle_disco(self.now, d.from, d.msg);
        let sent = self.flush(d.to);
        if let Some(tx) = ping_tx {
            let node = &mut self.nodes[d.to];
            node.pings_in += 1;
            let want_dest = match d.from {
                PathSource::Udp(src) => Dest::Direct(src),
                PathSource::Derp { region } => Dest::Derp(region),
                PathSource::Relay(relay) => Dest::Relay(relay),
            };
            let answered = sent.iter().any(|t| {
                t.dest == want_dest && matches!(&t.msg, Message::Pong(p) if p.tx_id == tx)
            });
            if answered {
                node.pings_answered += 1;
            }
        }
    }

    /// Routes everything machine `i` wants to send; handles its events. Returns what was sent.
    fn flush(&mut self, i: usize) -> Vec<Transmit> {
        let other = 1 - i;
        let mut sent = Vec::new();
        while let Some(t) = self.nodes[i].peer.poll_transmit() {
            match t.dest {
                Dest::Direct(to) => {
                    self.nodes[i].opened.insert(to);
                    if matches!(t.msg, Message::Ping(_)) {
                        self.nodes[i].discovery_pings_out += 1;
                    }
                    if to == self.nodes[other].public {
                        self.queue.push(Delivery {
                            at: self.now + DIRECT_DELAY,
                            to: other,
                            from: PathSource::Udp(self.nodes[i].public),
                            msg: t.msg.clone(),
                        });
                    }
                }
                Dest::Derp(region) => {
                    if matches!(t.msg, Message::CallMeMaybe(_)) {
                        self.nodes[i].call_me_maybes_out += 1;
                    }
                    self.queue.push(Delivery {
                        at: self.now + DERP_DELAY,
                        to: other,
                        from: PathSource::Derp { region },
                        msg: t.msg.clone(),
                    });
                }
                Dest::Relay(_) => panic!("no relays in this simulation"),
            }
            sent.push(t);
        }
        while let Some(e) = self.nodes[i].peer.poll_event() {
            match e {
                Event::NeedEndpointRefresh => {
                    // A quick re-STUN that finds the same endpoints.
                    let local = self.nodes[i].local.clone();
                    self.nodes[i].peer.set_local(self.now, local);
                    // Anything it released is routed on the next flush.
                }
                Event::PathChanged(c) => self.nodes[i].changes.push(c),
                Event::AddrForPeer(_)
                | Event::Pong { .. }
                | Event::RelayAllocRequest(_)
                | Event::WantRelayPaths
                | Event::CallMeMaybeVia(_)
                | Event::RelayAllocResponse(_) => {}
            }
        }
        if self.nodes[i].peer.transmits.is_empty() {
            sent
        } else {
            let mut more = self.flush(i);
            sent.append(&mut more);
            sent
        }
    }

    fn path(&self, i: usize) -> Path {
        self.nodes[i].peer.current_path()
    }

    fn reason(&self, i: usize) -> PathReason {
        self.nodes[i].peer.path_reason()
    }

    fn is_direct_to_other(&self, i: usize) -> bool {
        matches!(self.path(i), Path::Direct { addr, .. } if addr == self.nodes[1 - i].public)
    }

    fn assert_every_ping_answered(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            assert!(n.pings_in > 0, "machine {i} received no pings");
            assert_eq!(
                n.pings_in, n.pings_answered,
                "machine {i} left pings unanswered"
            );
        }
    }
}

#[test]
fn sim_converges_to_direct_when_pongs_arrive() {
    let mut sim = Sim::new([true, true], [false, false]);
    sim.run_until(0.001);
    assert_eq!(sim.path(A), Path::Derp { region: HOME[B] });
    sim.run_until(5.0);
    for i in [A, B] {
        assert!(sim.is_direct_to_other(i), "machine {i}: {:?}", sim.path(i));
        assert_eq!(sim.reason(i), PathReason::Direct);
        let plan = sim.nodes[i].peer.send_plan(sim.now);
        assert_eq!(plan.derp, None, "UDP only while trusted");
        assert_eq!(plan.udp, Some(sim.nodes[1 - i].public));
    }
    // History: DERP while discovering, then direct.
    let a = &sim.nodes[A].changes;
    assert_eq!(a.last().unwrap().reason, PathReason::Direct);
    assert!(a
        .iter()
        .any(|c| c.to == Path::Derp { region: HOME[B] } && c.reason == PathReason::Discovering));
    // Minutes later: still direct (heartbeats keep trust), no flapping, pings all answered.
    let changes_before = sim.nodes[A].changes.len();
    sim.run_until(300.0);
    assert!(sim.is_direct_to_other(A) && sim.is_direct_to_other(B));
    assert_eq!(
        sim.nodes[A].changes.len(),
        changes_before,
        "{:?}",
        sim.nodes[A].changes
    );
    sim.assert_every_ping_answered();
    let history: Vec<&PathChange> = sim.nodes[A].peer.history().collect();
    assert_eq!(history.len(), changes_before);
}

#[test]
fn sim_hard_nat_stays_on_derp_with_the_reason() {
    for (hard, want) in [
        ([true, true], PathReason::BothHardNat),
        ([false, true], PathReason::PeerHardNat),
        ([true, false], PathReason::LocalHardNat),
        ([false, false], PathReason::NoPongFromCandidates),
    ] {
        let mut sim = Sim::new([true, true], hard);
        sim.direct_blocked = true;
        sim.run_until(3.0);
        assert_eq!(
            sim.reason(A),
            PathReason::Discovering,
            "before any ping timed out"
        );
        sim.run_until(30.0);
        let (pings_30, cmm_30) = (
            sim.nodes[A].discovery_pings_out,
            sim.nodes[A].call_me_maybes_out,
        );
        sim.run_until(60.0);
        assert_eq!(sim.path(A), Path::Derp { region: HOME[B] }, "{hard:?}");
        assert_eq!(sim.reason(A), want, "{hard:?}");
        assert_eq!(
            sim.nodes[A].peer.send_plan(sim.now),
            SendPlan {
                udp: None,
                derp: Some(HOME[B]),
                relay: None
            }
        );
        // Discovery keeps running: own rounds every 5 s to both candidates, each with a
        // CallMeMaybe, plus a round (without CallMeMaybe) for each CallMeMaybe from the peer.
        let pings = sim.nodes[A].discovery_pings_out - pings_30;
        let cmms = sim.nodes[A].call_me_maybes_out - cmm_30;
        assert!((12..=26).contains(&pings), "{pings} pings in 30 s");
        assert!((5..=7).contains(&cmms), "{cmms} CallMeMaybes in 30 s");
        // Nothing reached the peer directly, so only DERP pings (none here) could be answered.
        assert_eq!(sim.nodes[B].pings_in, 0);
    }
}

#[test]
fn sim_falls_back_to_derp_when_direct_stops_answering_and_recovers() {
    let mut sim = Sim::new([true, true], [false, false]);
    sim.run_until(20.0);
    assert!(sim.is_direct_to_other(A));
    sim.direct_blocked = true;
    sim.run_until(20.0 + 3.0);
    assert!(
        sim.is_direct_to_other(A),
        "trust outlives one lost heartbeat"
    );
    sim.run_until(20.0 + 10.0);
    assert_eq!(sim.path(A), Path::Derp { region: HOME[B] });
    assert_eq!(sim.reason(A), PathReason::DirectLost);
    let plan = sim.nodes[A].peer.send_plan(sim.now);
    assert_eq!(plan.derp, Some(HOME[B]), "DERP carries traffic");
    assert_eq!(
        plan.udp,
        Some(sim.nodes[B].public),
        "and the old address is still tried"
    );
    // When direct works again, the next heartbeat or discovery pong restores it.
    sim.direct_blocked = false;
    sim.run_until(40.0);
    assert!(sim.is_direct_to_other(A) && sim.is_direct_to_other(B));
    let reasons: Vec<PathReason> = sim.nodes[A].changes.iter().map(|c| c.reason).collect();
    let tail = &reasons[reasons.len() - 3..];
    assert_eq!(
        tail,
        [
            PathReason::Direct,
            PathReason::DirectLost,
            PathReason::Direct
        ]
    );
    sim.assert_every_ping_answered();
}

#[test]
fn sim_idle_session_stops_timers_and_traffic_restarts_them() {
    let mut sim = Sim::new([true, true], [false, false]);
    sim.run_until(10.0);
    assert!(sim.is_direct_to_other(A));
    sim.nodes[A].traffic = false;
    sim.nodes[B].traffic = false;
    sim.run_until(70.0);
    let pings = sim.nodes[A].discovery_pings_out;
    for i in [A, B] {
        assert_eq!(
            sim.nodes[i].peer.poll_timeout(),
            None,
            "machine {i} has no timers when idle"
        );
        assert_eq!(sim.reason(i), PathReason::Idle);
    }
    sim.run_until(600.0);
    assert_eq!(
        sim.nodes[A].discovery_pings_out, pings,
        "nothing sent while idle"
    );
    sim.nodes[A].traffic = true;
    sim.nodes[B].traffic = true;
    sim.next_traffic = sim.now;
    sim.run_until(602.0);
    assert!(sim.is_direct_to_other(A) && sim.is_direct_to_other(B));
}

#[test]
fn sim_peer_without_endpoints_is_reached_through_its_pings() {
    // A's netmap has no endpoints for B; B knows A's. B's pings teach A where B is.
    let mut sim = Sim::new([true, false], [false, false]);
    sim.nodes[B].traffic = false;
    sim.run_until(2.0);
    assert_eq!(sim.reason(A), PathReason::NoEndpoints);
    assert_eq!(sim.path(A), Path::Derp { region: HOME[B] });
    // B starts sending: it pings A (dropped by A's NAT until A has sent to B) and sends a
    // CallMeMaybe; A learns B's address from B's first ping that gets through.
    sim.nodes[B].traffic = true;
    sim.run_until(15.0);
    assert!(
        sim.is_direct_to_other(A),
        "{:?} {:?}",
        sim.path(A),
        sim.reason(A)
    );
    assert!(
        sim.is_direct_to_other(B),
        "{:?} {:?}",
        sim.path(B),
        sim.reason(B)
    );
    sim.assert_every_ping_answered();
}

#[test]
fn sim_udp_blocked_is_reported() {
    let mut sim = Sim::new([true, true], [false, false]);
    sim.direct_blocked = true;
    let mut l = sim.nodes[A].local.clone();
    l.udp_working = Some(false);
    sim.nodes[A].local = l.clone();
    let now = sim.now;
    sim.nodes[A].peer.set_local(now, l);
    sim.run_until(20.0);
    assert_eq!(sim.path(A), Path::Derp { region: HOME[B] });
    assert_eq!(sim.reason(A), PathReason::UdpBlocked);
    assert_eq!(sim.reason(A).as_str(), "udp-blocked");
    // B learns from control that A's UDP does not work, and says so.
    assert_eq!(sim.reason(B), PathReason::NoPongFromCandidates);
    let mut a_info = sim.nodes[B].peer.info().clone();
    a_info.udp_working = Some(false);
    let now = sim.now;
    sim.nodes[B].peer.update_info(now, a_info);
    assert_eq!(sim.reason(B).as_str(), "peer-udp-blocked");
}

#[test]
fn relay_allocation_requests_are_passed_on_only_over_derp_with_the_senders_key() {
    use crate::disco::AllocateRequest;
    let t0 = Instant::now();
    let mut p = Peer::new(t0, local(1, &[]), info(2, Some(2), &[]));
    let theirs = p.info().disco_key;
    let other = DiscoPublic::from_bytes([77; 32]);
    let request = |pair: [DiscoPublic; 2]| {
        Message::AllocateUdpRelayEndpointRequest(AllocateRequest {
            client_disco: pair,
            generation: 5,
        })
    };
    let events = |p: &mut Peer| -> Vec<Event> {
        std::iter::from_fn(|| p.poll_event())
            .filter(|e| matches!(e, Event::RelayAllocRequest(_)))
            .collect()
    };
    p.handle_disco(
        t0,
        PathSource::Udp(addr("192.0.2.1:1")),
        request([theirs, other]),
    );
    assert!(events(&mut p).is_empty(), "over UDP: ignored");
    p.handle_disco(t0, PathSource::Derp { region: 2 }, request([other, other]));
    assert!(
        events(&mut p).is_empty(),
        "without the sender's key: ignored"
    );
    p.handle_disco(t0, PathSource::Derp { region: 2 }, request([other, theirs]));
    assert_eq!(events(&mut p).len(), 1);
    // The answer goes to the peer's home region.
    let answer = Message::CallMeMaybe(vec![]);
    assert!(p.send_via_derp(answer.clone()));
    assert_eq!(
        drain(&mut p),
        vec![Transmit {
            dest: Dest::Derp(2),
            msg: answer
        }]
    );
    let mut homeless = Peer::new(t0, local(1, &[]), info(3, None, &[]));
    assert!(!homeless.send_via_derp(Message::CallMeMaybe(vec![])));
}
