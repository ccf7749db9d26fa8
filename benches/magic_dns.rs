//! MagicDNS speed (issue 14's goal: ≥ 50,000 queries/s answered from the netmap on one core, and
//! the p99 latency). Run: `cargo bench --bench magic_dns`. Prints two figures:
//! 1. `dns::magic::respond` alone: an A query for a peer of a 1,000-peer netmap;
//! 2. the whole quad-100 path on one thread: an IPv4/UDP packet injected into the netstack,
//!    polled, answered by `respond`, the reply packet taken out — queries/s and the latency
//!    distribution of single queries (p50, p99, max).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use ipnet::IpNet;
use tern::control::tailcfg::{DnsConfig, Node};
use tern::dns::magic::{respond, Outcome, MAX_UDP_RESPONSE};
use tern::dns::MagicDnsConfig;
use tern::netmap::NetworkMap;
use tern::netstack::Netstack;

const PEERS: u32 = 1_000;

fn netmap() -> NetworkMap {
    let mut map = NetworkMap::new();
    let node = |i: u32| {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + i);
        Node {
            id: i64::from(i) + 1,
            name: format!("peer{i}.lab.tern.test."),
            addresses: vec![IpNet::from(IpAddr::V4(ip))],
            ..Node::default()
        }
    };
    map.self_node = Some(node(PEERS + 1));
    for i in 0..PEERS {
        let n = node(i);
        map.peers.insert(n.id, n);
    }
    map.dns_config = Some(DnsConfig {
        proxied: true,
        domains: vec!["lab.tern.test".into()],
        ..DnsConfig::default()
    });
    map
}

fn query(name: &str) -> Vec<u8> {
    let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    msg.to_vec().unwrap()
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4/UDP 100.64.0.1:5353 → 100.100.100.100:53 (no UDP checksum, allowed for IPv4).
fn udp_packet(payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&[100, 64, 0, 1, 100, 100, 100, 100]);
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&5353u16.to_be_bytes());
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() {
    let config = MagicDnsConfig::from_netmap(&netmap());
    let q = query("peer500.lab.tern.test.");
    assert!(matches!(
        respond(&config, &q, MAX_UDP_RESPONSE),
        Outcome::Answer(_)
    ));

    let n = 1_000_000;
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(respond(&config, std::hint::black_box(&q), MAX_UDP_RESPONSE));
    }
    let elapsed = started.elapsed();
    println!(
        "respond(): {:.0} queries/s ({:.2} µs each), {PEERS}-peer netmap",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / n as f64
    );

    let mut stack = Netstack::new(false);
    let packet = udp_packet(&q);
    let mut latencies = Vec::with_capacity(200_000);
    let rounds = 200_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let t = Instant::now();
        stack.inject(&packet);
        for request in stack.poll() {
            if let Outcome::Answer(answer) = respond(&config, &request.query, MAX_UDP_RESPONSE) {
                stack.reply(request.id, &answer);
            }
        }
        let out = stack.take_output();
        assert_eq!(out.len(), 1, "one answer per query");
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "netstack + respond, one thread: {:.0} queries/s; latency p50 {:?}, p99 {:?}, max {:?}",
        rounds as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
}
