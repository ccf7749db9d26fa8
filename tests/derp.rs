//! tern DERP client ↔ tern DERP server on loopback, over plain HTTP and TLS (self-signed, pinned).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tern::derp::client::{self, ClientConfig, DerpClient, Event, TlsVerify, Transport};
use tern::derp::frame::{self, ClientInfo, Frame, PeerGoneReason};
use tern::derp::server::{self, Server, ServerConfig};
use tern::keys::{NodePrivate, NodePublic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `cond` until true; fails the test after `WAIT`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

struct Relay {
    server: Server,
    addr: SocketAddr,
    /// `Some(pin)` when serving TLS.
    pin: Option<[u8; 32]>,
}

async fn start_relay(tls: bool, tweak: impl FnOnce(&mut ServerConfig)) -> Relay {
    let mut config = ServerConfig::new(NodePrivate::generate());
    tweak(&mut config);
    let server = Server::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (acceptor, pin) = if tls {
        let (tls, der) = server::tls_self_signed("derp.test", &server.public_key()).unwrap();
        (
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
            Some(client::sha256(&der)),
        )
    } else {
        (None, None)
    };
    tokio::spawn(server.clone().serve(listener, acceptor));
    Relay { server, addr, pin }
}

impl Relay {
    fn config(&self, key: NodePrivate) -> ClientConfig {
        let transport = match self.pin {
            Some(pin) => Transport::Tls {
                server_name: "derp.test".into(),
                verify: TlsVerify::PinSha256(pin),
            },
            None => Transport::Plain,
        };
        ClientConfig {
            addr: self.addr,
            host: "derp.test".into(),
            transport,
            private_key: key,
            preferred: true,
        }
    }

    async fn client(&self) -> (DerpClient, NodePublic) {
        let key = NodePrivate::generate();
        let public = key.public();
        let client = within("connect", DerpClient::connect(&self.config(key)))
            .await
            .expect("connect");
        (client, public)
    }

    fn metric(&self, pick: impl Fn(&server::Metrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(self.server.metrics()).load(Ordering::Relaxed)
    }
}

/// Next event that is not a Pong/Health/etc. noise we do not wait for.
async fn next_event(c: &mut DerpClient) -> Event {
    within("event", c.recv()).await.expect("connection alive")
}

async fn next_packet(c: &mut DerpClient) -> (NodePublic, Bytes) {
    loop {
        if let Event::Packet { src, packet } = next_event(c).await {
            return (src, packet);
        }
    }
}

async fn exchange(relay: &Relay) {
    let (mut a, ka) = relay.client().await;
    let (mut b, kb) = relay.client().await;
    assert_eq!(a.server_key(), relay.server.public_key());
    assert_eq!(a.server_info().version, 2);
    a.send(kb, Bytes::from_static(b"hello b")).await.unwrap();
    assert_eq!(
        next_packet(&mut b).await,
        (ka, Bytes::from_static(b"hello b"))
    );
    b.send(ka, Bytes::from_static(b"hello a")).await.unwrap();
    assert_eq!(
        next_packet(&mut a).await,
        (kb, Bytes::from_static(b"hello a"))
    );
    let big = Bytes::from(vec![0xab; frame::MAX_PACKET_SIZE]);
    a.send(kb, big.clone()).await.unwrap();
    assert_eq!(next_packet(&mut b).await, (ka, big));
    assert_eq!(relay.metric(|m| &m.packets_forwarded_total), 3);
    // Over TLS 1.3 the tern client reads the meta certificate and uses fast start.
    let want_fast = if relay.pin.is_some() { 2 } else { 0 };
    assert_eq!(relay.metric(|m| &m.fast_starts_total), want_fast);
}

#[tokio::test]
async fn packets_route_by_node_key_over_plain_http() {
    exchange(&start_relay(false, |_| {}).await).await;
}

#[tokio::test]
async fn packets_route_by_node_key_over_tls_self_signed() {
    exchange(&start_relay(true, |_| {}).await).await;
}

#[tokio::test]
async fn tls_pin_mismatch_is_refused() {
    let relay = start_relay(true, |_| {}).await;
    let mut config = relay.config(NodePrivate::generate());
    config.transport = Transport::Tls {
        server_name: "derp.test".into(),
        verify: TlsVerify::PinSha256([0; 32]),
    };
    let err = within("connect", DerpClient::connect(&config))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, client::ClientError::Tls(_)), "{err}");
}

#[tokio::test]
async fn peer_gone_when_a_sender_leaves() {
    let relay = start_relay(false, |_| {}).await;
    let (a, ka) = relay.client().await;
    let (mut b, kb) = relay.client().await;
    let (mut c, _kc) = relay.client().await;
    // PeerGone goes to those that received packets from a: b, not c.
    a.send(kb, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(next_packet(&mut b).await.0, ka);
    drop(a);
    assert_eq!(
        next_event(&mut b).await,
        Event::PeerGone {
            peer: ka,
            reason: PeerGoneReason::Disconnected
        }
    );
    wait_until("a unregistered", || relay.server.client_count() == 2).await;
    c.ping([3; 8]).await.unwrap();
    assert_eq!(
        next_event(&mut c).await,
        Event::Pong { data: [3; 8] },
        "c must not get PeerGone"
    );
}

#[tokio::test]
async fn disco_to_unknown_key_gets_peer_gone_not_here() {
    let relay = start_relay(false, |_| {}).await;
    let (mut a, _) = relay.client().await;
    let nobody = NodePrivate::generate().public();
    let mut disco = b"TS\xf0\x9f\x92\xac".to_vec();
    disco.resize(100, 0);
    a.send(nobody, Bytes::from(disco)).await.unwrap();
    assert_eq!(
        next_event(&mut a).await,
        Event::PeerGone {
            peer: nobody,
            reason: PeerGoneReason::NotHere
        }
    );
    // Non-disco packets to unknown keys are dropped silently (but counted).
    a.send(nobody, Bytes::from_static(b"wireguard-ish"))
        .await
        .unwrap();
    wait_until("unknown-dest drops counted", || {
        relay.metric(|m| &m.packets_dropped_unknown_dest_total) == 2
    })
    .await;
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let relay = start_relay(false, |_| {}).await;
    let (mut a, _) = relay.client().await;
    a.ping(*b"12345678").await.unwrap();
    assert_eq!(next_event(&mut a).await, Event::Pong { data: *b"12345678" });
    assert_eq!(relay.metric(|m| &m.pings_total), 1);
}

#[tokio::test]
async fn newest_connection_of_a_duplicate_key_then_last_sender_receives() {
    let relay = start_relay(false, |_| {}).await;
    let (a, _ka) = relay.client().await;
    let dup_key = NodePrivate::generate();
    let k = dup_key.public();
    let mut first = DerpClient::connect(&relay.config(dup_key.clone()))
        .await
        .unwrap();
    let mut second = DerpClient::connect(&relay.config(dup_key)).await.unwrap();
    a.send(k, Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(next_packet(&mut second).await.1, Bytes::from_static(b"one"));
    // `first` speaks, so it becomes the active receiver.
    first.ping(*b"iamalive").await.unwrap();
    assert_eq!(
        next_event(&mut first).await,
        Event::Pong { data: *b"iamalive" }
    );
    a.send(k, Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(next_packet(&mut first).await.1, Bytes::from_static(b"two"));
    assert_eq!(relay.metric(|m| &m.duplicate_clients_total), 1);
    // The receiver leaves: a's next packet (same route as before) finds the one still here.
    drop(first);
    wait_until("first unregistered", || {
        relay.metric(|m| &m.clients_current) == 2
    })
    .await;
    a.send(k, Bytes::from_static(b"three")).await.unwrap();
    assert_eq!(
        next_packet(&mut second).await.1,
        Bytes::from_static(b"three")
    );
}

#[tokio::test]
async fn a_delivering_client_hands_packets_and_peer_gone_to_its_queue_tagged_with_its_region() {
    let relay = start_relay(true, |_| {}).await;
    let (a, ka) = relay.client().await;
    let key = NodePrivate::generate();
    let kb = key.public();
    let (tx, mut delivered) = tokio::sync::mpsc::channel(16);
    let deliver = client::DeliverTo { region: 7, tx };
    let mut b = within(
        "connect",
        DerpClient::connect_delivering(&relay.config(key), deliver, None),
    )
    .await
    .expect("connect");
    assert!(!b.delivered_any());
    // Bursts of 40 (fewer than the server's per-client queue, so the server drops none), then
    // the largest packet: all arrive, in order, in batches (each what one read brought).
    let mut sizes: Vec<usize> = (0..200).map(|i| 1 + (i * 331) % 1400).collect();
    sizes.push(frame::MAX_PACKET_SIZE);
    for (burst, chunk) in sizes.chunks(40).enumerate() {
        for (j, &size) in chunk.iter().enumerate() {
            let tag = (burst * 40 + j) as u8;
            a.send(kb, Bytes::from(vec![tag; size])).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < chunk.len() {
            match within("delivery", delivered.recv())
                .await
                .expect("queue open")
            {
                client::Delivery::Packets { region, packets } => {
                    assert_eq!(region, 7);
                    assert!(!packets.is_empty(), "no empty batches");
                    got.extend(packets.iter().cloned());
                }
                other => panic!("burst {burst}: got {other:?}"),
            }
        }
        assert_eq!(got.len(), chunk.len(), "burst {burst}: nothing extra");
        for (j, (&size, (src, packet))) in chunk.iter().zip(&got).enumerate() {
            let tag = (burst * 40 + j) as u8;
            assert_eq!(*src, ka);
            assert_eq!(packet.len(), size, "packet {tag}");
            assert!(packet.iter().all(|&b| b == tag), "packet {tag} intact");
        }
    }
    assert!(b.delivered_any());
    // Other events still come from recv().
    b.ping(*b"stillup!").await.unwrap();
    assert_eq!(next_event(&mut b).await, Event::Pong { data: *b"stillup!" });
    // a leaves: the server tells b, whom a sent to, and that goes to the queue too.
    drop(a);
    match within("peer gone", delivered.recv())
        .await
        .expect("queue open")
    {
        client::Delivery::PeerGone { region, peer } => assert_eq!((region, peer), (7, ka)),
        other => panic!("got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_writes_what_its_owner_queued_and_the_next_connection_takes_over_the_queue() {
    let relay = start_relay(true, |_| {}).await;
    let (mut a, ka) = relay.client().await;
    let key = NodePrivate::generate();
    let kb = key.public();
    let (queue_tx, queue_rx) = tokio::sync::mpsc::channel(64);
    let queue: client::SendQueue = Arc::new(tokio::sync::Mutex::new(queue_rx));
    let (deliver_tx, _delivered) = tokio::sync::mpsc::channel(16);
    let connect = |key: NodePrivate| {
        let deliver = client::DeliverTo {
            region: 7,
            tx: deliver_tx.clone(),
        };
        let config = relay.config(key);
        let queue = queue.clone();
        async move {
            within(
                "connect",
                DerpClient::connect_delivering(&config, deliver, Some(queue)),
            )
            .await
            .expect("connect")
        }
    };
    let first = connect(key.clone()).await;
    // A burst larger than one write gathers (48 KiB), then an oversized packet, which is
    // dropped alone, then the largest allowed: all but the oversized one arrive, in order.
    let mut sizes: Vec<usize> = (0..60).map(|i| 1 + (i * 331) % 1400).collect();
    sizes.extend([frame::MAX_PACKET_SIZE + 1, frame::MAX_PACKET_SIZE]);
    for (i, &size) in sizes.iter().enumerate() {
        queue_tx
            .send((ka, Bytes::from(vec![i as u8; size])))
            .await
            .unwrap();
    }
    for (i, &size) in sizes.iter().enumerate() {
        if size > frame::MAX_PACKET_SIZE {
            continue;
        }
        let (src, packet) = next_packet(&mut a).await;
        assert_eq!(src, kb);
        assert_eq!(packet.len(), size, "packet {i}");
        assert!(packet.iter().all(|&b| b == i as u8), "packet {i} intact");
    }
    // The connection goes; what is queued meanwhile is sent by the next one.
    drop(first);
    queue_tx
        .send((ka, Bytes::from_static(b"while away")))
        .await
        .unwrap();
    let _second = connect(key).await;
    assert_eq!(
        next_packet(&mut a).await,
        (kb, Bytes::from_static(b"while away"))
    );
    queue_tx
        .send((ka, Bytes::from_static(b"after")))
        .await
        .unwrap();
    assert_eq!(
        next_packet(&mut a).await,
        (kb, Bytes::from_static(b"after"))
    );
}

/// A DERP connection made by hand, to send bytes the tern client never would.
struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawConn {
    async fn connect(relay: &Relay, key: &NodePrivate, fast_start: bool) -> (RawConn, Vec<u8>) {
        Self::connect_with(relay, key, fast_start, ClientInfo::regular()).await
    }

    async fn connect_with(
        relay: &Relay,
        key: &NodePrivate,
        fast_start: bool,
        info: ClientInfo,
    ) -> (RawConn, Vec<u8>) {
        let mut stream = TcpStream::connect(relay.addr).await.unwrap();
        let fast = if fast_start {
            "Derp-Fast-Start: 1\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n{fast}Upgrade: DERP\r\n\r\n"
        );
        // Pipeline ClientInfo right behind the request, as a fast-start Go client does.
        let mut out = request.into_bytes();
        let sealed = tern::naclbox::seal(
            key.as_bytes(),
            relay.server.public_key().as_bytes(),
            info.to_json().as_bytes(),
        );
        Frame::ClientInfo {
            key: key.public(),
            sealed: Bytes::from(sealed),
        }
        .encode(&mut out);
        stream.write_all(&out).await.unwrap();
        let mut conn = RawConn {
            stream,
            buf: BytesMut::new(),
        };
        let mut head = Vec::new();
        if !fast_start {
            while !conn.buf.windows(4).any(|w| w == b"\r\n\r\n") {
                conn.fill().await;
            }
            let pos = conn.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            head = conn.buf.split_to(pos).to_vec();
        }
        assert_eq!(
            conn.frame().await,
            Frame::ServerKey {
                key: relay.server.public_key()
            }
        );
        assert!(matches!(conn.frame().await, Frame::ServerInfo { .. }));
        (conn, head)
    }

    async fn fill(&mut self) {
        let n = within("raw read", self.stream.read_buf(&mut self.buf))
            .await
            .unwrap();
        assert!(n > 0, "unexpected EOF");
    }

    async fn frame(&mut self) -> Frame {
        loop {
            if let Some(f) = frame::decode(&mut self.buf, frame::MAX_CLIENT_RECV_LEN).unwrap() {
                return f;
            }
            self.fill().await;
        }
    }

    /// Reads until the server closes the connection.
    async fn expect_closed(&mut self) {
        within("server to close the connection", async {
            loop {
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => self.buf.clear(),
                }
            }
        })
        .await
    }
}

/// The server queues the packets of one read per receiver in batches: frames for two receivers
/// interleaved in one write (one read on the server) reach each receiver complete and in order,
/// a frame for a key that is not there is dropped without disturbing them, and the counters
/// count every packet once.
#[tokio::test]
async fn interleaved_packets_of_one_read_reach_each_receiver_in_order() {
    let relay = start_relay(false, |c| c.queue_depth = 1024).await;
    let sender = NodePrivate::generate();
    let (mut raw, _) = RawConn::connect(&relay, &sender, true).await;
    let (mut b, kb) = relay.client().await;
    let (mut c, kc) = relay.client().await;
    let nobody = NodePrivate::generate().public();
    let mut out = Vec::new();
    for i in 0u32..100 {
        let dst = if i % 2 == 0 { kb } else { kc };
        frame::put_send_packet(&mut out, &dst, &i.to_be_bytes());
        if i % 10 == 0 {
            frame::put_send_packet(&mut out, &nobody, b"lost");
        }
    }
    raw.stream.write_all(&out).await.unwrap();
    for (client, first) in [(&mut b, 0u32), (&mut c, 1)] {
        for i in (first..100).step_by(2) {
            let (src, packet) = next_packet(client).await;
            assert_eq!(src, sender.public());
            assert_eq!(packet, Bytes::from(i.to_be_bytes().to_vec()), "packet {i}");
        }
    }
    assert_eq!(relay.metric(|m| &m.packets_forwarded_total), 100);
    assert_eq!(relay.metric(|m| &m.bytes_forwarded_total), 400);
    assert_eq!(relay.metric(|m| &m.packets_dropped_unknown_dest_total), 10);
    assert_eq!(relay.metric(|m| &m.packets_dropped_queue_full_total), 0);
}

#[tokio::test]
async fn upgrade_response_is_byte_exact_and_fast_start_skips_it() {
    let relay = start_relay(false, |_| {}).await;
    let (_conn, head) = RawConn::connect(&relay, &NodePrivate::generate(), false).await;
    assert_eq!(
        String::from_utf8(head).unwrap(),
        server::upgrade_response(&relay.server.public_key())
    );
    let (mut fast, head) = RawConn::connect(&relay, &NodePrivate::generate(), true).await;
    assert!(head.is_empty());
    let mut ping = Vec::new();
    Frame::Ping { data: [9; 8] }.encode(&mut ping);
    fast.stream.write_all(&ping).await.unwrap();
    assert_eq!(fast.frame().await, Frame::Pong { data: [9; 8] });
}

#[tokio::test]
async fn malformed_frames_close_only_that_connection() {
    let relay = start_relay(false, |_| {}).await;
    let (mut a, ka) = relay.client().await;
    let (mut b, kb) = relay.client().await;
    let mut oversize = vec![frame::frame_type::SEND_PACKET];
    oversize.extend_from_slice(&((frame::MAX_FRAME_LEN + 1) as u32).to_be_bytes());
    let mut big_packet = Vec::new();
    frame::put_send_packet(&mut big_packet, &kb, &vec![0; frame::MAX_PACKET_SIZE + 1]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("NotePreferred of length 2", vec![0x07, 0, 0, 0, 2, 1, 1]),
        (
            "SendPacket shorter than a key",
            vec![0x04, 0, 0, 0, 3, 1, 2, 3],
        ),
        ("frame header over 64 KiB + keys", oversize),
        ("SendPacket with a 64 KiB + 1 packet", big_packet),
        (
            "Ping of 7 bytes",
            vec![0x12, 0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7],
        ),
        ("WatchConns without mesh key", vec![0x10, 0, 0, 0, 0]),
        (
            "ClosePeer without mesh key",
            [&[0x11, 0, 0, 0, 32][..], &[1; 32]].concat(),
        ),
    ];
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let (mut raw, _) = RawConn::connect(&relay, &NodePrivate::generate(), false).await;
        raw.stream.write_all(bytes).await.unwrap();
        raw.expect_closed().await;
        let closed = i as u64 + 1;
        wait_until(name, || {
            relay.metric(|m| &m.conns_closed_protocol_error_total) == closed
        })
        .await;
        // The others are unaffected.
        a.send(kb, Bytes::from(name.as_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(
            next_packet(&mut b).await,
            (ka, Bytes::from(name.as_bytes().to_vec()))
        );
    }
    assert_eq!(relay.server.client_count(), 2);
    a.ping([1; 8]).await.unwrap();
    assert_eq!(next_event(&mut a).await, Event::Pong { data: [1; 8] });
}

#[tokio::test]
async fn unknown_frame_types_are_skipped_and_counted() {
    let relay = start_relay(false, |_| {}).await;
    let (mut raw, _) = RawConn::connect(&relay, &NodePrivate::generate(), false).await;
    let mut bytes = vec![0x0b, 0, 0, 0, 3, 1, 2, 3, 0x06, 0, 0, 0, 0];
    Frame::Ping { data: [4; 8] }.encode(&mut bytes);
    raw.stream.write_all(&bytes).await.unwrap();
    assert_eq!(raw.frame().await, Frame::Pong { data: [4; 8] });
    assert_eq!(relay.metric(|m| &m.frames_skipped_total), 2);
    assert_eq!(relay.metric(|m| &m.conns_closed_protocol_error_total), 0);
}

#[tokio::test]
async fn handshake_with_a_bad_box_is_refused() {
    let relay = start_relay(false, |_| {}).await;
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    let mut out = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n".to_vec();
    let key = NodePrivate::generate();
    Frame::ClientInfo {
        key: key.public(),
        sealed: Bytes::from(vec![7u8; 80]),
    }
    .encode(&mut out);
    stream.write_all(&out).await.unwrap();
    let mut raw = RawConn {
        stream,
        buf: BytesMut::new(),
    };
    raw.expect_closed().await;
    wait_until("handshake failure counted", || {
        relay.metric(|m| &m.handshakes_failed_total) == 1
    })
    .await;
    assert_eq!(relay.server.client_count(), 0);
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_without_stalling_others() {
    let relay = start_relay(false, |c| c.write_timeout = Duration::from_millis(300)).await;
    let (a, ka) = relay.client().await;
    let (mut b, kb) = relay.client().await;
    let stuck_key = NodePrivate::generate();
    let (stuck, _) = RawConn::connect(&relay, &stuck_key, false).await;
    let stuck_public = stuck_key.public();
    let packet = Bytes::from(vec![0x55; 60_000]);
    // Flood the stuck client (far more than socket buffers hold) while talking to b.
    let mut round = 0u32;
    while relay.metric(|m| &m.conns_closed_write_timeout_total) == 0 {
        round += 1;
        assert!(round < 5_000, "stuck client was never disconnected");
        for _ in 0..20 {
            within("flood send", a.send(stuck_public, packet.clone()))
                .await
                .unwrap();
        }
        let marker = Bytes::from(round.to_be_bytes().to_vec());
        a.send(kb, marker.clone()).await.unwrap();
        assert_eq!(next_packet(&mut b).await, (ka, marker));
    }
    wait_until("stuck client unregistered", || {
        relay.server.client_count() == 2
    })
    .await;
    assert!(
        relay.metric(|m| &m.packets_dropped_queue_full_total) > 0,
        "queue overflow was not counted"
    );
    drop(stuck);
    a.send(kb, Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(
        next_packet(&mut b).await,
        (ka, Bytes::from_static(b"after"))
    );
}

#[tokio::test]
async fn http_endpoints() {
    let relay = start_relay(true, |_| {}).await;
    // Plain relay for simple requests.
    let plain = start_relay(false, |_| {}).await;
    let get = |req: &'static str| async move {
        let mut s = TcpStream::connect(plain.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        within("http response", s.read_to_string(&mut out))
            .await
            .unwrap();
        out
    };
    let r =
        get("GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: ts_123\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
    assert!(
        r.contains("X-Tailscale-Response: response ts_123\r\n"),
        "{r}"
    );
    let r = get("HEAD /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\n") && r.contains("Access-Control-Allow-Origin: *"),
        "{r}"
    );
    let r = get("GET /derp/latency-check HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    let r = get("PUT /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    let r = get("GET /derp HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 426 ") && r.contains("DERP requires connection upgrade"),
        "{r}"
    );
    let r = get("GET /debug/metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.contains("tern_derp_http_requests_total 6\n"), "{r}");
    drop(relay);
}

#[tokio::test]
async fn stun_responder_answers_tailscale_requests_only() {
    let relay = start_relay(false, |_| {}).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let stun_addr = socket.local_addr().unwrap();
    tokio::spawn(relay.server.clone().serve_stun(socket));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Garbage and a plain RFC 5389 request without SOFTWARE=tailnode are ignored.
    client.send_to(b"not stun at all", stun_addr).await.unwrap();
    let mut plain = tern::stun::request(tern::stun::TxId([1; 12]));
    plain.truncate(20);
    plain[2..4].copy_from_slice(&[0, 0]);
    client.send_to(&plain, stun_addr).await.unwrap();
    let tx = tern::stun::TxId::random();
    client
        .send_to(&tern::stun::request(tx), stun_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = within("stun reply", client.recv_from(&mut buf))
        .await
        .unwrap();
    let (got_tx, mapped) = tern::stun::parse_response(&buf[..n]).unwrap();
    assert_eq!(got_tx, tx);
    assert_eq!(mapped, client.local_addr().unwrap());
    assert_eq!(relay.metric(|m| &m.stun_ignored_total), 2);
    assert_eq!(relay.metric(|m| &m.stun_responses_total), 1);
}

/// The `tern derp` subcommand itself: plain HTTP mode, STUN on, two clients exchange a packet.
#[tokio::test]
async fn tern_derp_subcommand_serves_http_and_stun() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stun_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "derp",
            "--http",
            "--addr",
            &addr.to_string(),
            "--stun-port",
            &stun_port.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tern derp");
    let mut child = child;
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut banner = String::new();
    use tokio::io::AsyncBufReadExt;
    within("banner", lines.read_line(&mut banner))
        .await
        .unwrap();
    assert!(
        banner.starts_with(&format!("derp: serving http on {addr}, key nodekey:")),
        "{banner}"
    );
    let mut stun_line = String::new();
    within("stun banner", lines.read_line(&mut stun_line))
        .await
        .unwrap();
    assert!(
        stun_line.contains(&format!("stun: serving on 127.0.0.1:{stun_port}")),
        "{stun_line}"
    );

    let config = |key: NodePrivate| ClientConfig {
        addr,
        host: "localhost".into(),
        transport: Transport::Plain,
        private_key: key,
        preferred: false,
    };
    let ka = NodePrivate::generate();
    let kb = NodePrivate::generate();
    let a = within("connect a", DerpClient::connect(&config(ka.clone())))
        .await
        .unwrap();
    let mut b = within("connect b", DerpClient::connect(&config(kb.clone())))
        .await
        .unwrap();
    a.send(kb.public(), Bytes::from_static(b"via subcommand"))
        .await
        .unwrap();
    assert_eq!(
        next_packet(&mut b).await,
        (ka.public(), Bytes::from_static(b"via subcommand"))
    );

    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx = tern::stun::TxId::random();
    udp.send_to(&tern::stun::request(tx), ("127.0.0.1", stun_port))
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = within("stun reply", udp.recv_from(&mut buf)).await.unwrap();
    assert_eq!(
        tern::stun::parse_response(&buf[..n]).unwrap(),
        (tx, udp.local_addr().unwrap())
    );
}

#[tokio::test]
async fn client_sees_the_server_close_its_connection() {
    let relay = start_relay(false, |_| {}).await;
    let (mut a, _) = relay.client().await;
    // A NotePreferred with a 2-byte body, smuggled as an "unknown" frame of type 0x07.
    let bad = Frame::Unknown {
        frame_type: frame::frame_type::NOTE_PREFERRED,
        payload: Bytes::from_static(&[1, 1]),
    };
    a.send_frame(bad).await.unwrap();
    let err = within("client to notice the close", a.recv())
        .await
        .expect_err("connection must end");
    assert!(
        matches!(
            err,
            client::ClientError::Disconnected(_) | client::ClientError::Closed
        ),
        "{err}"
    );
}

#[tokio::test]
async fn connect_with_retry_backs_off_until_the_server_appears() {
    // Reserve a port, free it, and start the relay there only after a while.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Server::new(ServerConfig::new(NodePrivate::generate()));
    let late = server.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = TcpListener::bind(addr).await.unwrap();
        late.serve(listener, None).await
    });
    let config = ClientConfig {
        addr,
        host: "x".into(),
        transport: Transport::Plain,
        private_key: NodePrivate::generate(),
        preferred: false,
    };
    let mut reconnector = client::Reconnector::default();
    let c = within(
        "retrying connect",
        DerpClient::connect_with_retry(&config, &mut reconnector, 100),
    )
    .await
    .expect("connects once the server is up");
    assert_eq!(c.server_key(), server.public_key());
    assert_eq!(reconnector.failures(), 0, "success resets the back-off");
}

#[tokio::test]
async fn idle_clients_get_keep_alives() {
    let relay = start_relay(false, |c| {
        c.keep_alive = Duration::from_millis(50);
        c.keep_alive_jitter = Duration::from_millis(10);
    })
    .await;
    let (mut raw, _) = RawConn::connect(&relay, &NodePrivate::generate(), false).await;
    assert_eq!(raw.frame().await, Frame::KeepAlive);
    assert_eq!(raw.frame().await, Frame::KeepAlive);
    assert!(relay.metric(|m| &m.keep_alives_sent_total) >= 2);
}

#[tokio::test]
async fn mesh_client_watches_forwards_and_closes_peers() {
    let mesh_key = [7u8; 32];
    let relay = start_relay(false, |c| c.mesh_key = Some(mesh_key)).await;
    let (mut a, ka) = relay.client().await;
    let info = ClientInfo {
        mesh_key: Some(mesh_key),
        ..ClientInfo::regular()
    };
    let (mut mesh, _) = RawConn::connect_with(&relay, &NodePrivate::generate(), false, info).await;
    let mut out = Vec::new();
    Frame::WatchConns.encode(&mut out);
    mesh.stream.write_all(&out).await.unwrap();
    // Existing clients first: a, and the mesh connection itself.
    let mut present = Vec::new();
    for _ in 0..2 {
        match mesh.frame().await {
            Frame::PeerPresent {
                peer,
                endpoint,
                flags,
            } => present.push((peer, endpoint.is_some(), flags)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        present.contains(&(ka, true, frame::peer_present_flags::IS_REGULAR)),
        "{present:?}"
    );
    assert!(
        present
            .iter()
            .any(|p| p.2 == frame::peer_present_flags::IS_MESH_PEER),
        "{present:?}"
    );

    // Live updates: b arrives and leaves.
    let (b, kb) = relay.client().await;
    assert!(matches!(mesh.frame().await, Frame::PeerPresent { peer, .. } if peer == kb));
    drop(b);
    assert_eq!(
        mesh.frame().await,
        Frame::PeerGone {
            peer: kb,
            reason: PeerGoneReason::Disconnected
        }
    );

    // ForwardPacket from the mesh peer reaches a with the original source.
    let far = NodePrivate::generate().public();
    let mut out = Vec::new();
    Frame::ForwardPacket {
        src: far,
        dst: ka,
        packet: Bytes::from_static(b"meshed"),
    }
    .encode(&mut out);
    mesh.stream.write_all(&out).await.unwrap();
    assert_eq!(
        next_packet(&mut a).await,
        (far, Bytes::from_static(b"meshed"))
    );
    let mut out = Vec::new();
    Frame::ClosePeer { peer: ka }.encode(&mut out);
    mesh.stream.write_all(&out).await.unwrap();
    // ClosePeer ends a's connection.
    let err = within("a to be closed", async {
        loop {
            if let Err(e) = a.recv().await {
                return e;
            }
        }
    })
    .await;
    assert!(
        matches!(
            err,
            client::ClientError::Disconnected(_) | client::ClientError::Closed
        ),
        "{err}"
    );
    assert_eq!(
        mesh.frame().await,
        Frame::PeerGone {
            peer: ka,
            reason: PeerGoneReason::Disconnected
        }
    );
}
