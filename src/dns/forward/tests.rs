//! `forward` against stub DNS servers on 127.0.0.1 (UDP and TCP on one port).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::*;
use crate::dns::testing::{query, ID};

/// How a stub answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers over UDP with 192.0.2.1, over TCP with 192.0.2.2.
    Answer,
    /// Over UDP first a reply to another ID, then a truncated (TC) reply; TCP answers.
    Truncate,
    /// Never answers over UDP; TCP answers.
    UdpSilent,
    /// Never answers at all (TCP accepted, never read).
    Silent,
}

struct Stub {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

fn reply(q: &[u8], last_octet: u8, tc: bool) -> Vec<u8> {
    let q = Message::from_vec(q).unwrap();
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.message_type = MessageType::Response;
    r.metadata.truncation = tc;
    r.queries = q.queries.clone();
    if !tc {
        let name = q.queries[0].name().clone();
        r.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(A::new(192, 0, 2, last_octet)),
        ));
    }
    r.to_vec().unwrap()
}

async fn stub(mode: Mode) -> Stub {
    // Same port for UDP and TCP; retry if the TCP side happens to be taken.
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    let udp_queries = Arc::new(AtomicUsize::new(0));
    let tcp_queries = Arc::new(AtomicUsize::new(0));
    let counter = udp_queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            counter.fetch_add(1, Ordering::SeqCst);
            let q = &buf[..n];
            match mode {
                Mode::Answer => {
                    let _ = udp.send_to(&reply(q, 1, false), from).await;
                }
                Mode::Truncate => {
                    let mut other = q.to_vec();
                    other[0] ^= 0xff;
                    let _ = udp.send_to(&reply(&other, 9, false), from).await;
                    let _ = udp.send_to(&reply(q, 1, true), from).await;
                }
                Mode::UdpSilent | Mode::Silent => {}
            }
        }
    });
    let counter = tcp_queries.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = tcp.accept().await {
            if mode == Mode::Silent {
                // Hold the connection open without a word.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(conn);
                });
                continue;
            }
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                conn.read_exact(&mut len).await.unwrap();
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                conn.read_exact(&mut q).await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let r = reply(&q, 2, false);
                let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&r);
                conn.write_all(&framed).await.unwrap();
            });
        }
    });
    Stub {
        addr,
        udp_queries,
        tcp_queries,
    }
}

fn answer_ip(bytes: &[u8]) -> IpAddr {
    let m = Message::from_vec(bytes).unwrap();
    assert_eq!(m.metadata.id, ID);
    match &m.answers[0].data {
        RData::A(a) => IpAddr::V4(a.0),
        other => panic!("{other:?}"),
    }
}

const FAST: Timeouts = Timeouts {
    udp: Duration::from_millis(300),
    overall: Duration::from_secs(3),
};

#[tokio::test]
async fn udp_answer() {
    let s = stub(Mode::Answer).await;
    let q = query("example.com.", RecordType::A);
    let r = forward(&[s.addr], &q, false).await.unwrap();
    assert_eq!(answer_ip(&r), "192.0.2.1".parse::<IpAddr>().unwrap());
    assert_eq!(s.tcp_queries.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn tcp_client_goes_over_tcp() {
    let s = stub(Mode::Answer).await;
    let q = query("example.com.", RecordType::A);
    let r = forward(&[s.addr], &q, true).await.unwrap();
    assert_eq!(answer_ip(&r), "192.0.2.2".parse::<IpAddr>().unwrap());
    assert_eq!(s.udp_queries.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn truncated_udp_is_retried_over_tcp_and_stray_answers_ignored() {
    let s = stub(Mode::Truncate).await;
    let q = query("example.com.", RecordType::A);
    let r = forward(&[s.addr], &q, false).await.unwrap();
    assert_eq!(answer_ip(&r), "192.0.2.2".parse::<IpAddr>().unwrap());
    assert_eq!(s.udp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(s.tcp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn udp_silence_falls_back_to_tcp() {
    let s = stub(Mode::UdpSilent).await;
    let q = query("example.com.", RecordType::A);
    let started = Instant::now();
    let r = forward_with(&[s.addr], &q, false, FAST).await.unwrap();
    assert!(started.elapsed() >= FAST.udp);
    assert_eq!(answer_ip(&r), "192.0.2.2".parse::<IpAddr>().unwrap());
}

#[tokio::test]
async fn a_silent_upstream_does_not_hold_up_a_live_one() {
    let silent = stub(Mode::Silent).await;
    let live = stub(Mode::Answer).await;
    let q = query("example.com.", RecordType::A);
    let started = Instant::now();
    let r = forward(&[silent.addr, live.addr], &q, false).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(answer_ip(&r), "192.0.2.1".parse::<IpAddr>().unwrap());
    assert_eq!(silent.udp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn all_silent_times_out() {
    let silent = stub(Mode::Silent).await;
    let q = query("example.com.", RecordType::A);
    let started = Instant::now();
    let err = forward_with(&[silent.addr], &q, false, FAST)
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Timeout(_)), "{err}");
    assert!(started.elapsed() >= FAST.overall);
}

#[tokio::test]
async fn refusals() {
    let q = query("example.com.", RecordType::A);
    assert!(matches!(
        forward(&[], &q, false).await,
        Err(ForwardError::NoUpstreams)
    ));
    let s: SocketAddr = "127.0.0.1:53".parse().unwrap();
    assert!(matches!(
        forward(&[s], &q[..5], false).await,
        Err(ForwardError::BadQuery)
    ));
    assert!(matches!(
        forward(&[s], &vec![0u8; 70_000], false).await,
        Err(ForwardError::TooLong(70_000))
    ));
}

#[tokio::test]
async fn closed_port_fails_without_waiting_for_the_timeout() {
    // Nothing listens on this port (UDP refused by ICMP, TCP by RST).
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap()
    };
    let q = query("example.com.", RecordType::A);
    let err = forward_with(&[port], &q, false, FAST).await.unwrap_err();
    assert!(matches!(err, ForwardError::Failed(_)), "{err}");
}

#[test]
fn resolv_conf_nameservers() {
    let text = "# generated\nnameserver 192.168.1.1\nnameserver 100.100.100.100\n\
                nameserver fd7a:115c:a1e0::53\n  nameserver   2001:db8::1 \n\
                nameserver 192.168.1.1\nnameserver fe80::1%1\nnameserver bogus\n\
                search lab.tern.test\n;nameserver 10.0.0.1\noptions edns0\n\
                nameserver 127.0.0.53#resolved";
    let got: Vec<String> = os_base_resolvers(text)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        vec![
            "192.168.1.1:53",
            "[2001:db8::1]:53",
            "[fe80::1%1]:53",
            "127.0.0.53:53"
        ]
    );
    assert!(os_base_resolvers("").is_empty());
}
