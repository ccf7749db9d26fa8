use super::*;
use crate::disco::Ping;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A relay client as the server sees it: its disco key and the address it sends from.
struct Client {
    disco: DiscoPrivate,
    from: SocketAddr,
}

impl Client {
    fn new(from: &str) -> Client {
        Client {
            disco: DiscoPrivate::generate(),
            from: addr(from),
        }
    }

    fn public(&self) -> DiscoPublic {
        self.disco.public()
    }

    /// A Geneve control frame carrying `msg` sealed to the server.
    fn control(&self, server: &DiscoPublic, vni: u32, msg: &Message) -> Vec<u8> {
        control_frame(vni, &disco::seal(&self.disco, server, msg))
    }

    fn bind(&self, server: &DiscoPublic, vni: u32, gen: u32, other: DiscoPublic) -> Vec<u8> {
        let msg = Message::BindUdpRelayEndpoint(BindBody {
            vni,
            generation: gen,
            remote_key: other,
            challenge: [0; 32],
        });
        self.control(server, vni, &msg)
    }

    /// Opens the server's Challenge and returns its body.
    fn open_challenge(&self, server: &DiscoPublic, packet: &[u8], vni: u32) -> BindBody {
        let header = geneve::parse(packet).expect("geneve header");
        assert!(header.control);
        assert_eq!(header.protocol, PROTOCOL_DISCO);
        assert_eq!(header.vni.get(), vni);
        let frame = disco::parse_packet(&packet[geneve::HEADER_LEN..]).expect("disco frame");
        assert_eq!(frame.sender, *server);
        match disco::open(&disco::shared_box(&self.disco, server), &frame).expect("opens") {
            Message::BindUdpRelayEndpointChallenge(body) => body,
            other => panic!("not a challenge: {other:?}"),
        }
    }

    fn answer(&self, server: &DiscoPublic, challenge: &BindBody) -> Vec<u8> {
        self.control(
            server,
            challenge.vni,
            &Message::BindUdpRelayEndpointAnswer(challenge.clone()),
        )
    }
}

fn request(a: &Client, b: &Client, generation: u32) -> AllocateRequest {
    AllocateRequest {
        client_disco: [a.public(), b.public()],
        generation,
    }
}

fn ready_server(now: Instant) -> RelayServer {
    let mut s = RelayServer::new(now);
    s.set_addr_ports(vec![addr("198.51.100.7:40000")]);
    s
}

/// Bind + Challenge + Answer for one leg; returns what the Answer did.
fn handshake(s: &mut RelayServer, now: Instant, me: &Client, other: &Client, vni: u32) -> Action {
    let server = s.disco_public();
    let bind = me.bind(&server, vni, 7, other.public());
    let Action::Reply { to, packet } = s.handle_packet(now, me.from, &bind) else {
        panic!("bind not challenged");
    };
    assert_eq!(to, me.from);
    let challenge = me.open_challenge(&server, &packet, vni);
    s.handle_packet(now, me.from, &me.answer(&server, &challenge))
}

fn data(vni: u32, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        version: 0,
        protocol: geneve::PROTOCOL_WIREGUARD,
        control: false,
        vni: Vni::new(vni),
    };
    let mut out = header.to_bytes().expect("header").to_vec();
    out.extend_from_slice(payload);
    out
}

#[test]
fn allocation_needs_an_address_and_is_stable_per_unordered_pair() {
    let t0 = Instant::now();
    let (a, b, c) = (
        Client::new("192.0.2.1:1"),
        Client::new("192.0.2.2:2"),
        Client::new("192.0.2.3:3"),
    );
    let mut s = RelayServer::new(t0);
    assert_eq!(
        s.allocate(t0, &request(&a, &b, 1)),
        Err(AllocError::NotReady)
    );
    s.set_addr_ports(vec![
        addr("198.51.100.7:40000"),
        addr("[2001:db8::7]:40000"),
    ]);
    let ep = s.allocate(t0, &request(&a, &b, 1)).expect("allocated");
    assert_eq!((ep.vni, ep.lamport_id), (1, 1));
    assert_eq!(ep.server_disco, s.disco_public());
    assert!(
        ep.client_disco[0].as_bytes() < ep.client_disco[1].as_bytes(),
        "sorted pair"
    );
    assert_eq!(ep.bind_lifetime, Duration::from_secs(30));
    assert_eq!(ep.steady_state_lifetime, Duration::from_secs(300));
    assert_eq!(ep.addr_ports.len(), 2);
    // The same pair in the other order gets the same endpoint, with the current addresses.
    s.set_addr_ports(vec![addr("198.51.100.8:40000")]);
    let again = s.allocate(t0, &request(&b, &a, 9)).expect("allocated");
    assert_eq!((again.vni, again.lamport_id), (1, 1));
    assert_eq!(again.addr_ports, vec![addr("198.51.100.8:40000")]);
    let other = s.allocate(t0, &request(&a, &c, 2)).expect("allocated");
    assert_eq!((other.vni, other.lamport_id), (2, 2));
    // Refusals: the server's own key, the same client twice.
    let clash = AllocateRequest {
        client_disco: [a.public(), s.disco_public()],
        generation: 3,
    };
    assert_eq!(s.allocate(t0, &clash), Err(AllocError::ServerKeyClash));
    let same = AllocateRequest {
        client_disco: [a.public(), a.public()],
        generation: 4,
    };
    assert_eq!(s.allocate(t0, &same), Err(AllocError::SameClient));
    assert_eq!(s.status(t0, 40000).allocations, 3);
}

#[test]
fn bind_challenge_answer_binds_each_leg_and_then_data_is_forwarded() {
    let t0 = Instant::now();
    let (a, b) = (
        Client::new("192.0.2.1:1111"),
        Client::new("[2001:db8::2]:2222"),
    );
    let mut s = ready_server(t0);
    let vni = s.allocate(t0, &request(&a, &b, 1)).expect("allocated").vni;
    // Before both legs are bound nothing is forwarded.
    assert_eq!(handshake(&mut s, t0, &a, &b, vni), Action::Accepted);
    assert_eq!(
        s.handle_packet(t0, a.from, &data(vni, b"x")),
        Action::Drop("not_bound")
    );
    assert_eq!(s.status(t0, 1).sessions[0].state, "connecting");
    assert_eq!(handshake(&mut s, t0, &b, &a, vni), Action::Accepted);
    let status = s.status(t0, 40000);
    assert_eq!(status.sessions[0].state, "open");
    // Both directions, across address families, unchanged; counters count the whole datagram.
    let packet = data(vni, &[9u8; 100]);
    assert_eq!(
        s.handle_packet(t0, a.from, &packet),
        Action::Forward(b.from)
    );
    assert_eq!(
        s.handle_packet(t0, b.from, &packet),
        Action::Forward(a.from)
    );
    // A relayed disco packet (C=0, disco protocol) is data too.
    let ping = Message::Ping(Ping {
        tx_id: disco::TxId([1; 12]),
        node_key: None,
        padding: 0,
    });
    let mut relayed = data(vni, &[]);
    relayed[2..4].copy_from_slice(&PROTOCOL_DISCO.to_be_bytes());
    relayed.extend_from_slice(&disco::seal(&a.disco, &b.public(), &ping));
    assert_eq!(
        s.handle_packet(t0, a.from, &relayed),
        Action::Forward(b.from)
    );
    // Anyone else with the right VNI is dropped.
    assert_eq!(
        s.handle_packet(t0, addr("203.0.113.9:1"), &packet),
        Action::Drop("unknown_source")
    );
    let status = s.status(t0, 40000);
    assert_eq!(status.forwarded_packets, 3);
    assert_eq!(status.forwarded_bytes, 2 * 108 + relayed.len() as u64);
    let leg_a = status.sessions[0]
        .legs
        .iter()
        .find(|l| l.disco_key == a.public().to_string())
        .expect("leg a");
    assert_eq!(leg_a.bound.as_deref(), Some("192.0.2.1:1111"));
    assert_eq!(leg_a.packets_rx, 2);
    assert_eq!(status.drops.get("unknown_source"), Some(&1));
    assert_eq!(status.drops.get("not_bound"), Some(&1));
}

#[test]
fn answers_must_come_from_the_challenged_address_with_the_cookie_once() {
    let t0 = Instant::now();
    let (a, b) = (Client::new("192.0.2.1:1111"), Client::new("192.0.2.2:2222"));
    let mut s = ready_server(t0);
    let server = s.disco_public();
    let vni = s.allocate(t0, &request(&a, &b, 1)).expect("allocated").vni;
    let Action::Reply { packet, .. } =
        s.handle_packet(t0, a.from, &a.bind(&server, vni, 5, b.public()))
    else {
        panic!("bind not challenged");
    };
    let challenge = a.open_challenge(&server, &packet, vni);
    assert_eq!((challenge.vni, challenge.generation), (vni, 5));
    assert_eq!(challenge.remote_key, b.public());
    let answer = a.answer(&server, &challenge);
    // From another address the cookie does not match.
    assert_eq!(
        s.handle_packet(t0, addr("192.0.2.1:9999"), &answer),
        Action::Drop("bad_answer")
    );
    // A tampered cookie does not either.
    let mut forged = challenge.clone();
    forged.challenge[0] ^= 1;
    assert_eq!(
        s.handle_packet(t0, a.from, &a.answer(&server, &forged)),
        Action::Drop("bad_answer")
    );
    assert_eq!(s.handle_packet(t0, a.from, &answer), Action::Accepted);
    // Replayed: no generation is in progress any more.
    assert_eq!(
        s.handle_packet(t0, a.from, &answer),
        Action::Drop("bad_answer")
    );
    // Binds with the wrong remote key or generation 0 get no challenge.
    for bad in [
        a.bind(&server, vni, 6, a.public()),
        a.bind(&server, vni, 0, b.public()),
        a.bind(&server, vni + 1, 6, b.public()),
    ] {
        assert!(matches!(s.handle_packet(t0, a.from, &bad), Action::Drop(_)));
    }
    // A stranger's Bind for this VNI, and a Bind not sealed to the server, are dropped.
    let stranger = Client::new("192.0.2.5:5");
    assert_eq!(
        s.handle_packet(
            t0,
            stranger.from,
            &stranger.bind(&server, vni, 1, b.public())
        ),
        Action::Drop("unknown_client")
    );
    let wrong_key = DiscoPrivate::generate().public();
    assert_eq!(
        s.handle_packet(t0, a.from, &a.bind(&wrong_key, vni, 8, b.public())),
        Action::Drop("bad_box")
    );
}

#[test]
fn a_cookie_survives_one_key_rotation_but_not_two() {
    let t0 = Instant::now();
    let (a, b) = (Client::new("192.0.2.1:1111"), Client::new("192.0.2.2:2222"));
    let mut s = ready_server(t0);
    let server = s.disco_public();
    let vni = s.allocate(t0, &request(&a, &b, 1)).expect("allocated").vni;
    let challenged = |s: &mut RelayServer, now: Instant, gen: u32| {
        let Action::Reply { packet, .. } =
            s.handle_packet(now, a.from, &a.bind(&server, vni, gen, b.public()))
        else {
            panic!("bind not challenged");
        };
        a.open_challenge(&server, &packet, vni)
    };
    let c1 = challenged(&mut s, t0, 3);
    let t1 = t0 + MAC_ROTATION;
    assert_eq!(
        s.handle_packet(t1, a.from, &a.answer(&server, &c1)),
        Action::Accepted
    );
    let c2 = challenged(&mut s, t1, 4);
    let t3 = t1 + MAC_ROTATION * 2;
    // Two rotations later (the Bind itself triggers the first) the old key is gone.
    let _ = challenged(&mut s, t1 + MAC_ROTATION, 4);
    assert_eq!(
        s.handle_packet(t3, a.from, &a.answer(&server, &c2)),
        Action::Drop("bad_answer")
    );
}

#[test]
fn unbound_endpoints_expire_after_30_s_and_silent_sessions_after_5_min() {
    let t0 = Instant::now();
    let (a, b, c) = (
        Client::new("192.0.2.1:1"),
        Client::new("192.0.2.2:2"),
        Client::new("192.0.2.3:3"),
    );
    let mut s = ready_server(t0);
    let open = s.allocate(t0, &request(&a, &b, 1)).expect("allocated").vni;
    let half = s.allocate(t0, &request(&a, &c, 2)).expect("allocated").vni;
    handshake(&mut s, t0, &a, &b, open);
    handshake(&mut s, t0, &b, &a, open);
    handshake(&mut s, t0, &a, &c, half);
    assert_eq!(s.expire(t0 + BIND_LIFETIME), 0);
    assert_eq!(s.expire(t0 + BIND_LIFETIME + Duration::from_secs(1)), 1);
    assert_eq!(
        s.handle_packet(t0, c.from, &data(half, b"x")),
        Action::Drop("unknown_vni")
    );
    // Traffic from one leg only: the other leg's silence ends the session.
    let t4 = t0 + Duration::from_secs(240);
    assert_eq!(
        s.handle_packet(t4, a.from, &data(open, b"x")),
        Action::Forward(b.from)
    );
    assert_eq!(s.expire(t0 + STEADY_STATE_LIFETIME), 0);
    assert_eq!(
        s.expire(t0 + STEADY_STATE_LIFETIME + Duration::from_secs(1)),
        1
    );
    // The pair can allocate again: a new VNI from the sequence, a new LamportID.
    let again = s.allocate(t4, &request(&a, &b, 3)).expect("allocated");
    assert_eq!((again.vni, again.lamport_id), (3, 3));
}

#[test]
fn vnis_are_sequential_wrap_and_skip_live_ones() {
    let t0 = Instant::now();
    let mut s = ready_server(t0);
    let clients: Vec<Client> = (0..3)
        .map(|i| Client::new(&format!("192.0.2.{i}:1")))
        .collect();
    s.next_vni = VNI_MAX;
    let first = s
        .allocate(t0, &request(&clients[0], &clients[1], 1))
        .expect("allocated");
    assert_eq!(first.vni, VNI_MAX);
    let second = s
        .allocate(t0, &request(&clients[0], &clients[2], 2))
        .expect("allocated");
    assert_eq!(second.vni, 1, "wraps to 1, never 0");
    s.next_vni = VNI_MAX;
    let third = s
        .allocate(t0, &request(&clients[1], &clients[2], 3))
        .expect("allocated");
    assert_eq!(third.vni, 2, "skips the VNIs in use");
}

#[test]
fn stun_is_handed_over_and_garbage_is_counted_never_a_panic() {
    let t0 = Instant::now();
    let mut s = ready_server(t0);
    let mut stun = Vec::new();
    crate::stun::encode_request(crate::stun::TxId([3; 12]), &mut stun);
    // A binding *response* type (0x0101) is what address discovery gets back.
    stun[1] = 0x01;
    assert_eq!(
        s.handle_packet(t0, addr("192.0.2.1:3478"), &stun),
        Action::Stun
    );
    let from = addr("192.0.2.9:9");
    assert_eq!(s.handle_packet(t0, from, &[0u8; 3]), Action::Drop("short"));
    assert_eq!(
        s.handle_packet(t0, from, &data(77, b"x")),
        Action::Drop("unknown_vni")
    );
    for seed in 0u8..=255 {
        let len = usize::from(seed) % 200;
        let junk: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
            .collect();
        let _ = s.handle_packet(t0, from, &junk);
    }
    let a = Client::new("192.0.2.1:1");
    let b = Client::new("192.0.2.2:2");
    let vni = s.allocate(t0, &request(&a, &b, 1)).expect("allocated").vni;
    // A control frame that is not disco, or a truncated one, for a live VNI.
    let mut bad = data(vni, b"not disco at all");
    bad[1] = 0x80;
    bad[2..4].copy_from_slice(&PROTOCOL_DISCO.to_be_bytes());
    assert_eq!(s.handle_packet(t0, from, &bad), Action::Drop("bad_control"));
    let drops = s.status(t0, 1).drops;
    assert!(drops.values().sum::<u64>() >= 3, "{drops:?}");
}

/// Binds from one source are challenged up to the burst, then at the refill rate; another
/// source has its own budget. Drops are counted as `bind_rate_limited`.
#[test]
fn replayed_binds_get_at_most_burst_plus_rate_challenges() {
    let t0 = Instant::now();
    let (a, b) = (Client::new("192.0.2.1:1"), Client::new("192.0.2.2:2"));
    let mut s = ready_server(t0);
    let ep = s.allocate(t0, &request(&a, &b, 1)).expect("allocated");
    let server = s.disco_public();
    let bind = a.bind(&server, ep.vni, 7, b.public());
    let challenged = |s: &mut RelayServer, at: Instant, from: SocketAddr, n: usize| {
        (0..n)
            .filter(|_| matches!(s.handle_packet(at, from, &bind), Action::Reply { .. }))
            .count()
    };
    assert_eq!(
        challenged(&mut s, t0, a.from, 100),
        CHALLENGE_BURST as usize
    );
    // Another port of the same address shares the budget; another address does not.
    assert_eq!(challenged(&mut s, t0, addr("192.0.2.1:999"), 10), 0);
    assert_eq!(challenged(&mut s, t0, addr("192.0.2.9:1"), 5), 5);
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(
        challenged(&mut s, t1, a.from, 100),
        CHALLENGES_PER_SECOND as usize
    );
    let limited = s.status(t1, 0).drops.get("bind_rate_limited").copied();
    assert_eq!(limited, Some(80 + 10 + 90));
}

/// Spoofed sources cannot grow the table past its bound; idle sources are forgotten.
#[test]
fn the_bind_limiter_table_is_bounded_and_expires() {
    use super::bind_limit::{BindLimiter, MAX_SOURCES};
    let t0 = Instant::now();
    let mut limiter = BindLimiter::default();
    for i in 0..(MAX_SOURCES as u32 + 100) {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let allowed = limiter.allow(t0, ip.into());
        assert_eq!(allowed, (i as usize) < MAX_SOURCES, "source {i}");
    }
    assert_eq!(limiter.len(), MAX_SOURCES);
    // Once their buckets have refilled, old sources make room for new ones.
    let later = t0 + Duration::from_secs(3);
    assert!(limiter.allow(later, "192.0.2.77".parse().unwrap()));
    assert_eq!(limiter.len(), 1);
    limiter.expire(later + Duration::from_secs(3));
    assert_eq!(limiter.len(), 0);
}
