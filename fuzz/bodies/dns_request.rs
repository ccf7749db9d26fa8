//! Fuzz the MagicDNS responder: `dns::magic::respond` on arbitrary bytes with a fixed config
//! (three hosts, MagicDNS on, a split route `example.lab` → 10.0.0.53, global 1.1.1.1, a route
//! whose only resolver is DoH).
//!
//! Each input is answered twice: with the UDP limit (4095) and with a small one taken from the
//! input (byte 1, the ID's low byte: 0-127). Asserted, for both:
//! * never a panic;
//! * `Answer`: 12 bytes at least, at most the limit, the query's ID and opcode, QR, AA and RA
//!   set, RD echoed; it parses (hickory) as a response; an answer that is not truncated to a
//!   query that parses echoes its one question, and every record in it has TTL 600, the
//!   question's name and, for a host, one of its addresses (A/AAAA) or, for a reverse name, the
//!   host's name (PTR);
//! * `Forward`: the query unchanged, to exactly the route's upstreams (10.0.0.53 under
//!   `example.lab`, else 1.1.1.1);
//! * `Drop` only for fewer than 12 bytes, a response (QR set), or a limit under 12;
//! * both limits agree on the outcome kind and the response code (truncation drops records,
//!   not meaning).

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use tern::control::tailcfg::{DnsConfig, Node, Resolver};
use tern::dns::hickory_proto::op::{Message, MessageType};
use tern::dns::hickory_proto::rr::RData;
use tern::dns::magic::{respond, Outcome, HEADER_LEN, MAX_UDP_RESPONSE, TTL};
use tern::dns::name::{is_under, key_of, reverse_ip};
use tern::dns::MagicDnsConfig;
use tern::netmap::NetworkMap;

/// Hosts of the fixed tailnet: name, addresses.
pub const HOSTS: [(&str, &[&str]); 3] = [
    (
        "c1.lab.tern.test.",
        &["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
    ),
    (
        "c2.lab.tern.test.",
        &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
    ),
    ("c3.lab.tern.test.", &["100.64.0.3/32"]),
];
const SPLIT: &str = "example.lab.";
const SPLIT_UPSTREAM: &str = "10.0.0.53:53";
const ROOT_UPSTREAM: &str = "1.1.1.1:53";

fn resolver(addr: &str) -> Resolver {
    Resolver {
        addr: addr.to_string(),
        ..Resolver::default()
    }
}

fn config() -> &'static MagicDnsConfig {
    static CONFIG: OnceLock<MagicDnsConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let mut map = NetworkMap::new();
        for (i, (name, addrs)) in HOSTS.iter().enumerate() {
            let node = Node {
                id: i as i64 + 1,
                name: name.to_string(),
                addresses: addrs.iter().map(|a| a.parse().expect("prefix")).collect(),
                ..Node::default()
            };
            if i == 0 {
                map.self_node = Some(node);
            } else {
                map.peers.insert(node.id, node);
            }
        }
        let mut dns = DnsConfig {
            resolvers: vec![resolver("1.1.1.1")],
            domains: vec!["lab.tern.test".into()],
            proxied: true,
            ..DnsConfig::default()
        };
        dns.routes
            .insert(SPLIT.into(), Some(vec![resolver("10.0.0.53")]));
        dns.routes.insert(
            "corp.example.".into(),
            Some(vec![resolver("https://doh.corp.example/dns-query")]),
        );
        map.dns_config = Some(dns);
        MagicDnsConfig::from_netmap(&map)
    })
}

pub fn run(data: &[u8]) {
    let cfg = config();
    let small = usize::from(data.get(1).copied().unwrap_or(0) & 0x7f);
    let full = respond(cfg, data, MAX_UDP_RESPONSE);
    let cut = respond(cfg, data, small);
    check(cfg, data, MAX_UDP_RESPONSE, &full);
    check(cfg, data, small, &cut);
    agree(&full, &cut, small);
}

fn check(cfg: &MagicDnsConfig, data: &[u8], limit: usize, outcome: &Outcome) {
    match outcome {
        Outcome::Answer(bytes) => check_answer(cfg, data, limit, bytes),
        Outcome::Forward { upstreams, query } => {
            assert_eq!(query.as_slice(), data, "forwarded query altered");
            check_forward(data, upstreams);
        }
        Outcome::ForwardDoh { query, .. } => {
            assert!(cfg.exit_doh.is_some(), "DoH without an exit node's");
            assert_eq!(query.as_slice(), data, "forwarded query altered");
        }
        Outcome::Drop => assert!(
            data.len() < HEADER_LEN || data[2] & 0x80 != 0 || limit < HEADER_LEN,
            "dropped a query it could answer"
        ),
    }
}

fn check_answer(cfg: &MagicDnsConfig, data: &[u8], limit: usize, bytes: &[u8]) {
    assert!(bytes.len() >= HEADER_LEN && bytes.len() <= limit, "size");
    assert_eq!(bytes[..2], data[..2], "ID");
    assert_eq!(bytes[2] & 0x80, 0x80, "QR");
    assert_eq!(bytes[2] & 0x78, data[2] & 0x78, "opcode");
    assert_eq!(bytes[2] & 0x01, data[2] & 0x01, "RD");
    assert_eq!(bytes[2] & 0x04, 0x04, "AA");
    assert_eq!(bytes[3] & 0x80, 0x80, "RA");
    let reply = Message::from_vec(bytes).expect("an answer parses");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    let Ok(query) = Message::from_vec(data) else {
        return;
    };
    if reply.metadata.truncation || reply.queries.is_empty() {
        return;
    }
    assert_eq!(reply.queries, query.queries, "question echoed");
    let question = &query.queries[0];
    let key = key_of(question.name());
    for record in &reply.answers {
        assert_eq!(record.ttl, TTL);
        assert_eq!(record.name, *question.name());
        match &record.data {
            RData::A(a) => assert!(host_has(cfg, &key, IpAddr::V4(a.0)), "A of another host"),
            RData::AAAA(a) => {
                assert!(host_has(cfg, &key, IpAddr::V6(a.0)), "AAAA of another host")
            }
            RData::PTR(p) => {
                let ip = reverse_ip(&key).expect("PTR only for a reverse name");
                assert_eq!(cfg.ptr.get(&ip), Some(&p.0.to_ascii()), "PTR name");
            }
            other => panic!("unexpected record {other:?}"),
        }
    }
}

/// Whether `ip` is an address of the host `key` names (directly or as a single label).
fn host_has(cfg: &MagicDnsConfig, key: &str, ip: IpAddr) -> bool {
    cfg.lookup(key).is_some_and(|addrs| addrs.contains(&ip))
}

fn check_forward(data: &[u8], upstreams: &[SocketAddr]) {
    let query = Message::from_vec(data).expect("only parsed queries are forwarded");
    assert_eq!(query.queries.len(), 1);
    let key = key_of(query.queries[0].name());
    let want = if is_under(&key, SPLIT) {
        SPLIT_UPSTREAM
    } else {
        ROOT_UPSTREAM
    };
    let want: SocketAddr = want.parse().expect("socket address");
    assert_eq!(upstreams, [want], "upstreams for {key}");
}

/// The small limit changes only the size: the same kind of outcome and response code.
fn agree(full: &Outcome, cut: &Outcome, small: usize) {
    match (full, cut) {
        (Outcome::Answer(a), Outcome::Answer(b)) => {
            assert_eq!(a[3] & 0x0f, b[3] & 0x0f, "rcode");
            // Only the OPT's payload size (same width) may differ then.
            if a.len() <= small {
                assert_eq!(a.len(), b.len(), "an answer that fits is not cut");
            }
        }
        (Outcome::Answer(_), Outcome::Drop) => assert!(small < HEADER_LEN),
        (Outcome::Forward { .. }, Outcome::Forward { .. }) | (Outcome::Drop, Outcome::Drop) => {}
        _ => panic!("the limit changed the outcome: {full:?} vs {cut:?}"),
    }
}
