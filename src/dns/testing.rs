//! Shared test fixtures: a small tailnet and query builders.

use std::collections::BTreeMap;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

use crate::control::tailcfg::{DnsConfig, Node, Resolver};
use crate::netmap::NetworkMap;

pub const ID: u16 = 0x1234;

fn node(id: i64, name: &str, addrs: &[&str]) -> Node {
    Node {
        id,
        name: name.to_string(),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        ..Node::default()
    }
}

fn resolver(addr: &str) -> Resolver {
    Resolver {
        addr: addr.to_string(),
        ..Resolver::default()
    }
}

/// c1 (self), c2 (v4 + v6), c3 (v4 only, plus a subnet prefix); MagicDNS on; routes:
/// `example.lab` → 10.0.0.53, `corp.example` → a DoH URL only, `only.local` → none (local);
/// global resolvers 1.1.1.1 and 9.9.9.9:5353, a DoH one; search domain `lab.tern.test`.
///
/// The self node has the `magicdns-aaaa` attribute, so IPv6 addresses are answered too.
pub fn lab_map() -> NetworkMap {
    let mut map = NetworkMap::new();
    let mut me = node(
        1,
        "c1.lab.tern.test.",
        &["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
    );
    me.cap_map.insert("magicdns-aaaa".into(), None);
    map.self_node = Some(me);
    for n in [
        node(
            2,
            "c2.lab.tern.test.",
            &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
        ),
        node(3, "C3.lab.tern.test.", &["100.64.0.3/32", "10.9.0.0/24"]),
    ] {
        map.peers.insert(n.id, n);
    }
    let mut routes = BTreeMap::new();
    routes.insert("example.lab".to_string(), Some(vec![resolver("10.0.0.53")]));
    routes.insert(
        "corp.example.".to_string(),
        Some(vec![resolver("https://doh.corp.example/dns-query")]),
    );
    routes.insert("only.local".to_string(), None);
    map.dns_config = Some(DnsConfig {
        resolvers: vec![
            resolver("1.1.1.1"),
            resolver("9.9.9.9:5353"),
            resolver("https://dns.example/dns-query"),
        ],
        routes,
        domains: vec!["lab.tern.test".to_string()],
        proxied: true,
        ..DnsConfig::default()
    });
    map
}

/// A recursive query for `name`/`rtype` with ID [`ID`].
pub fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    query_msg(name, rtype).to_vec().unwrap()
}

pub fn query_msg(name: &str, rtype: RecordType) -> Message {
    let mut msg = Message::new(ID, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    msg
}

/// The same with an EDNS OPT announcing `payload`.
pub fn query_edns(name: &str, rtype: RecordType, payload: u16) -> Vec<u8> {
    let mut msg = query_msg(name, rtype);
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    msg.set_edns(edns);
    msg.to_vec().unwrap()
}
