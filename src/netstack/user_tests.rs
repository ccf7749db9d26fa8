//! Two user stacks wired back to back (A's packets are B's input and the other way round), with
//! real loopback servers behind B: what crosses is real TCP built by smoltcp on both sides.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;

const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

struct Pair {
    a: StackHandle,
    b: StackHandle,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Moves every packet from one stack's output to the other's input.
fn wire(
    mut from: mpsc::Receiver<Vec<u8>>,
    to: mpsc::Sender<Vec<u8>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(p) = from.recv().await {
            if to.send(p).await.is_err() {
                return;
            }
        }
    })
}

fn pair() -> Pair {
    let (a_in_tx, a_in) = mpsc::channel(1024);
    let (b_in_tx, b_in) = mpsc::channel(1024);
    let (a_out, a_out_rx) = mpsc::channel(1024);
    let (b_out, b_out_rx) = mpsc::channel(1024);
    let (a, ta) = spawn(StackIo {
        inbound: a_in,
        outbound: a_out,
    });
    let (b, tb) = spawn(StackIo {
        inbound: b_in,
        outbound: b_out,
    });
    a.set_addresses(vec![IpAddr::V4(A)]);
    b.set_addresses(vec![IpAddr::V4(B)]);
    let wa = wire(a_out_rx, b_in_tx);
    let wb = wire(b_out_rx, a_in_tx);
    Pair {
        a,
        b,
        _tasks: vec![ta, tb, wa, wb],
    }
}

/// An echo server on the host's loopback; its port.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

async fn connect(stack: &StackHandle, to: SocketAddr) -> Result<DuplexStream, DialError> {
    tokio::time::timeout(Duration::from_secs(5), stack.connect(to))
        .await
        .expect("connect answered in time")
}

#[tokio::test]
async fn inbound_connections_reach_the_loopback_port_byte_exact() {
    let pair = pair();
    let port = echo_server().await;
    let mut conn = connect(&pair.a, SocketAddr::from((B, port)))
        .await
        .expect("connected");
    // 1 MiB of patterned bytes out and back: windows fill, close and open again.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(conn);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write");
        w.shutdown().await.expect("shutdown");
        w
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("echo within 20 s")
        .expect("read");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
    conn = r.unsplit(writer.await.expect("writer"));
    drop(conn);
    let counters = pair.b.counters();
    assert_eq!(counters.tcp_inbound, 1, "{counters:?}");
    assert_eq!(pair.a.counters().tcp_outbound, 1);
    // Both sides forget the finished connection.
    for _ in 0..100 {
        if pair.a.counters().open_connections == 0 && pair.b.counters().open_connections == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pair.a.counters().open_connections, 0);
    assert_eq!(pair.b.counters().open_connections, 0);
}

#[tokio::test]
async fn a_port_with_nothing_on_loopback_resets_the_connection() {
    let pair = pair();
    // A port nothing listens on: bind, note, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut conn = connect(&pair.a, SocketAddr::from((B, port)))
        .await
        .expect("the handshake completes before the loopback dial");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("reset within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "no data from a port nobody serves");
}

#[tokio::test]
async fn connecting_to_an_address_nobody_has_is_refused_or_times_out() {
    let pair = pair();
    // B drops a SYN to an address it does not own: the dial must come back as a timeout,
    // not hang.
    let other = SocketAddr::from((Ipv4Addr::new(100, 64, 0, 9), 80));
    let result = tokio::time::timeout(Duration::from_secs(15), pair.a.connect(other))
        .await
        .expect("an answer within the handshake timeout");
    assert_eq!(result.err(), Some(DialError::Timeout(HANDSHAKE_TIMEOUT)));
}

#[tokio::test]
async fn without_an_address_of_the_family_there_is_no_source() {
    let pair = pair();
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 80));
    assert_eq!(connect(&pair.a, v6).await.err(), Some(DialError::NoSource));
    let _ = pair.b;
}

#[tokio::test]
async fn many_connections_at_once_each_get_their_own_bytes() {
    let pair = pair();
    let port = echo_server().await;
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let a = pair.a.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = connect(&a, SocketAddr::from((B, port)))
                .await
                .expect("connect");
            let msg = format!("connection {i}");
            conn.write_all(msg.as_bytes()).await.expect("write");
            let mut buf = vec![0u8; msg.len()];
            conn.read_exact(&mut buf).await.expect("read");
            assert_eq!(buf, msg.as_bytes());
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("in time")
            .expect("task");
    }
    assert_eq!(pair.b.counters().tcp_inbound, 40);
}

#[test]
fn malformed_packets_are_dropped_without_a_listener() {
    let mut stack = UserStack::new();
    stack.set_addresses(&[IpAddr::V4(B)]);
    for junk in [
        &[][..],
        &[0x45][..],
        &[0x45; 20][..],
        &[0x60; 41][..],
        &[0xff; 100][..],
    ] {
        stack.inject(junk);
    }
    let waker = Waker::from(Arc::new(TaskWaker(Arc::new(Notify::new()))));
    stack.poll(&mut Context::from_waker(&waker));
    assert_eq!(stack.conns.len(), 0);
    assert_eq!(stack.counters().packets_in, 5);
    assert!(stack.take_output().is_empty(), "no answer to junk");
}

/// An IPv4/UDP packet from `src` to `dst` with correct checksums.
fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only");
    };
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let ip = Ipv4Repr {
        src_addr: s,
        dst_addr: d,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + ip.payload_len];
    let caps = ChecksumCapabilities::default();
    let mut packet = Ipv4Packet::new_unchecked(&mut buf);
    ip.emit(&mut packet, &caps);
    let mut datagram = UdpPacket::new_unchecked(packet.payload_mut());
    udp.emit(
        &mut datagram,
        &s.into(),
        &d.into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// The source and payload of a UDP packet the stack sent.
fn parse_udp(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    use smoltcp::wire::{Ipv4Packet, UdpPacket};
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    Some((
        SocketAddr::from((ip.src_addr(), udp.src_port())),
        SocketAddr::from((ip.dst_addr(), udp.dst_port())),
        udp.payload().to_vec(),
    ))
}

#[tokio::test]
async fn inbound_udp_reaches_the_loopback_port_and_the_reply_comes_back() {
    let (to_stack, inbound) = mpsc::channel(64);
    let (outbound, mut from_stack) = mpsc::channel(64);
    let (b, _task) = spawn(StackIo { inbound, outbound });
    b.set_addresses(vec![IpAddr::V4(B)]);
    // A loopback UDP echo service that upper-cases what it gets.
    let service = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = service.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = service.recv_from(&mut buf).await {
            let _ = service.send_to(&buf[..n].to_ascii_uppercase(), from).await;
        }
    });
    let peer = SocketAddr::from((A, 40000));
    let ours = SocketAddr::from((B, port));
    for (i, word) in ["hello", "again"].into_iter().enumerate() {
        // The first datagram may arrive before the address is set: send until answered.
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                to_stack
                    .send(udp_packet(peer, ours, word.as_bytes()))
                    .await
                    .expect("send");
                let wait = tokio::time::sleep(Duration::from_millis(200));
                tokio::select! {
                    Some(p) = from_stack.recv() => return p,
                    _ = wait => continue,
                }
            }
        })
        .await
        .expect("a reply within 5 s");
        let (src, dst, payload) = parse_udp(&reply).expect("a UDP packet");
        assert_eq!(
            (src, dst),
            (ours, peer),
            "reply {i} from our port to the peer"
        );
        assert_eq!(payload, word.to_ascii_uppercase().as_bytes());
    }
    let counters = b.counters();
    assert!(
        counters.udp_in >= 2 && counters.udp_out >= 2,
        "{counters:?}"
    );
}
