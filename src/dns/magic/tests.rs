use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

use super::*;
use crate::dns::name::reverse_key;
use crate::dns::testing::{lab_map, query, query_edns, query_msg, ID};

fn cfg() -> MagicDnsConfig {
    MagicDnsConfig::from_netmap(&lab_map())
}

fn answer(outcome: Outcome) -> Message {
    match outcome {
        Outcome::Answer(bytes) => Message::from_vec(&bytes).expect("answer parses"),
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn ask(name: &str, rtype: RecordType) -> Message {
    answer(respond(&cfg(), &query(name, rtype), MAX_UDP_RESPONSE))
}

fn addrs(msg: &Message) -> Vec<IpAddr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// Every local answer: ID echoed, a response, AA and RA, RD echoed, the question echoed.
fn assert_local(msg: &Message, name: &str, rtype: RecordType) {
    assert_eq!(msg.metadata.id, ID);
    assert_eq!(msg.metadata.message_type, MessageType::Response);
    assert!(msg.metadata.authoritative);
    assert!(msg.metadata.recursion_available);
    assert!(msg.metadata.recursion_desired);
    assert_eq!(msg.queries.len(), 1);
    assert_eq!(msg.queries[0].name().to_ascii(), name);
    assert_eq!(msg.queries[0].query_type(), rtype);
    for r in &msg.answers {
        assert_eq!(r.ttl, TTL);
    }
}

#[test]
fn a_and_aaaa_for_tailnet_names_in_any_spelling() {
    for name in [
        "c2",
        "c2.lab.tern.test",
        "c2.lab.tern.test.",
        "C2.LAB.TERN.TEST.",
    ] {
        let a = ask(name, RecordType::A);
        assert_local(
            &a,
            &format!("{}.", name.trim_end_matches('.')),
            RecordType::A,
        );
        assert_eq!(a.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(addrs(&a), vec!["100.64.0.2".parse::<IpAddr>().unwrap()]);
        let aaaa = ask(name, RecordType::AAAA);
        assert_eq!(
            addrs(&aaaa),
            vec!["fd7a:115c:a1e0::2".parse::<IpAddr>().unwrap()]
        );
        // The record's name is the question's, as asked.
        assert_eq!(a.answers[0].name, *a.queries[0].name());
    }
}

#[test]
fn any_gets_the_first_address_and_a_missing_family_is_empty() {
    let any = ask("c2.lab.tern.test.", RecordType::ANY);
    assert_eq!(addrs(&any), vec!["100.64.0.2".parse::<IpAddr>().unwrap()]);
    let aaaa = ask("c3.lab.tern.test.", RecordType::AAAA);
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty());
}

#[test]
fn zone_types_are_not_implemented_and_others_empty() {
    for t in [
        RecordType::NS,
        RecordType::SOA,
        RecordType::AXFR,
        RecordType::HINFO,
    ] {
        let m = ask("c2.lab.tern.test.", t);
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp, "{t}");
        assert_local(&m, "c2.lab.tern.test.", t);
    }
    for t in [
        RecordType::TXT,
        RecordType::MX,
        RecordType::SRV,
        RecordType::CNAME,
    ] {
        let m = ask("c2.lab.tern.test.", t);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
        assert!(m.answers.is_empty());
    }
}

#[test]
fn ptr_for_tailnet_addresses() {
    for (ip, want) in [
        ("100.64.0.2", "c2.lab.tern.test."),
        ("fd7a:115c:a1e0::2", "c2.lab.tern.test."),
        ("100.64.0.3", "C3.lab.tern.test."),
    ] {
        let name = reverse_key(ip.parse().unwrap());
        let m = ask(&name, RecordType::PTR);
        assert_local(&m, &name, RecordType::PTR);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        match &m.answers[0].data {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), want),
            other => panic!("{other:?}"),
        }
        assert_eq!(m.answers[0].ttl, TTL);
    }
}

#[test]
fn unknown_addresses_in_local_reverse_zones_are_nxdomain() {
    for ip in ["100.64.0.99", "100.127.255.255", "fd7a:115c:a1e0::99"] {
        let m = ask(&reverse_key(ip.parse().unwrap()), RecordType::PTR);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{ip}");
    }
    // Outside the CGNAT range: not ours, forwarded.
    let q = query(
        &reverse_key("100.128.0.1".parse().unwrap()),
        RecordType::PTR,
    );
    assert!(matches!(
        respond(&cfg(), &q, MAX_UDP_RESPONSE),
        Outcome::Forward { .. }
    ));
}

#[test]
fn nxdomain_under_the_tailnet_domain_and_for_onion() {
    for name in [
        "nope.lab.tern.test.",
        "a.b.c2.lab.tern.test.",
        "x.only.local.",
    ] {
        let m = ask(name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert_local(&m, name, RecordType::A);
    }
    for name in [
        "duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion.",
        "x.ONION.",
    ] {
        let m = ask(name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn forwarded_to_the_split_route_or_the_root() {
    let q = query("www.example.lab.", RecordType::A);
    assert_eq!(
        respond(&cfg(), &q, MAX_UDP_RESPONSE),
        Outcome::Forward {
            upstreams: vec![sa("10.0.0.53:53")],
            query: q.clone()
        }
    );
    let q = query("example.com.", RecordType::AAAA);
    assert_eq!(
        respond(&cfg(), &q, MAX_UDP_RESPONSE),
        Outcome::Forward {
            upstreams: vec![sa("1.1.1.1:53"), sa("9.9.9.9:5353")],
            query: q.clone()
        }
    );
    // `example.lab` through the root alone, when control sends only global resolvers.
    let mut map = lab_map();
    map.dns_config.as_mut().unwrap().routes.clear();
    let q = query("example.lab.", RecordType::A);
    assert_eq!(
        respond(&MagicDnsConfig::from_netmap(&map), &q, MAX_UDP_RESPONSE),
        Outcome::Forward {
            upstreams: vec![sa("1.1.1.1:53"), sa("9.9.9.9:5353")],
            query: q
        }
    );
}

#[test]
fn servfail_without_an_upstream() {
    // A split route whose only resolver tern cannot use: SERVFAIL, not a leak to the root.
    let m = ask("intranet.corp.example.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let mut map = lab_map();
    map.dns_config.as_mut().unwrap().resolvers.clear();
    let m = answer(respond(
        &MagicDnsConfig::from_netmap(&map),
        &query("example.com.", RecordType::A),
        MAX_UDP_RESPONSE,
    ));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_local(&m, "example.com.", RecordType::A);
}

fn rcode_of(outcome: &Outcome) -> Option<u8> {
    match outcome {
        Outcome::Answer(b) => Some(b[3] & 0x0f),
        _ => None,
    }
}

#[test]
fn formerr_for_broken_queries() {
    let good = query("c2.lab.tern.test.", RecordType::A);
    // Truncated anywhere after the header.
    for cut in 12..good.len() {
        let out = respond(&cfg(), &good[..cut], MAX_UDP_RESPONSE);
        assert_eq!(rcode_of(&out), Some(1), "cut at {cut}");
        let Outcome::Answer(b) = out else {
            unreachable!()
        };
        assert_eq!(&b[..2], &ID.to_be_bytes());
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(b[2] & 0x80, 0x80);
    }
    // No header to reply to.
    for cut in 0..12 {
        assert_eq!(
            respond(&cfg(), &good[..cut], MAX_UDP_RESPONSE),
            Outcome::Drop
        );
    }
    // Garbage after a header.
    let mut garbage = good[..12].to_vec();
    garbage.extend_from_slice(&[0xff; 40]);
    assert_eq!(
        rcode_of(&respond(&cfg(), &garbage, MAX_UDP_RESPONSE)),
        Some(1)
    );
    // A name that points at itself.
    let mut looped = good[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(
        rcode_of(&respond(&cfg(), &looped, MAX_UDP_RESPONSE)),
        Some(1)
    );
    // Two pointers at each other.
    let mut looped = good[..12].to_vec();
    looped.extend_from_slice(&[1, b'a', 0xc0, 16, 0xc0, 14, 0, 1, 0, 1]);
    assert_eq!(
        rcode_of(&respond(&cfg(), &looped, MAX_UDP_RESPONSE)),
        Some(1)
    );
}

#[test]
fn formerr_for_question_counts_other_than_one() {
    for count in [0u16, 2, 5] {
        let mut q = query("c2.lab.tern.test.", RecordType::A);
        q[4..6].copy_from_slice(&count.to_be_bytes());
        let out = respond(&cfg(), &q, MAX_UDP_RESPONSE);
        assert_eq!(rcode_of(&out), Some(1), "qdcount {count}");
    }
    // Five real questions.
    let mut msg = query_msg("c2.lab.tern.test.", RecordType::A);
    for _ in 0..4 {
        msg.add_query(msg.queries[0].clone());
    }
    let out = respond(&cfg(), &msg.to_vec().unwrap(), MAX_UDP_RESPONSE);
    assert_eq!(rcode_of(&out), Some(1));
}

#[test]
fn responses_dropped_and_other_opcodes_not_implemented() {
    let mut q = query("c2.lab.tern.test.", RecordType::A);
    q[2] |= 0x80;
    assert_eq!(respond(&cfg(), &q, MAX_UDP_RESPONSE), Outcome::Drop);
    let mut q = query("c2.lab.tern.test.", RecordType::A);
    q[2] = (q[2] & 0x87) | (5 << 3); // UPDATE
    let out = respond(&cfg(), &q, MAX_UDP_RESPONSE);
    assert_eq!(rcode_of(&out), Some(4));
    let Outcome::Answer(b) = out else {
        unreachable!()
    };
    assert_eq!((b[2] >> 3) & 0x0f, 5);
}

#[test]
fn truncated_to_max_len() {
    let q = query("c2.lab.tern.test.", RecordType::AAAA);
    let full = respond(&cfg(), &q, MAX_UDP_RESPONSE);
    let Outcome::Answer(full) = full else {
        panic!()
    };
    // One byte short: the record goes, TC is set, the question stays.
    let out = respond(&cfg(), &q, full.len() - 1);
    let Outcome::Answer(b) = out else { panic!() };
    assert!(b.len() < full.len());
    let m = Message::from_vec(&b).unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    assert_eq!(m.queries.len(), 1);
    // Room for the header only.
    let Outcome::Answer(b) = respond(&cfg(), &q, HEADER_LEN) else {
        panic!()
    };
    assert_eq!(b.len(), HEADER_LEN);
    assert!(Message::from_vec(&b).unwrap().metadata.truncation);
    // Not even that.
    assert_eq!(respond(&cfg(), &q, HEADER_LEN - 1), Outcome::Drop);
}

#[test]
fn edns_lowers_the_limit_and_is_echoed() {
    let q = query_edns("c2.lab.tern.test.", RecordType::A, 1232);
    let m = answer(respond(&cfg(), &q, MAX_UDP_RESPONSE));
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    assert_eq!(addrs(&m).len(), 1);
    // A payload under 512 counts as 512.
    let q = query_edns("c2.lab.tern.test.", RecordType::A, 100);
    let m = answer(respond(&cfg(), &q, MAX_UDP_RESPONSE));
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(512));
    // A larger payload does not raise the transport's limit.
    let q = query_edns("c2.lab.tern.test.", RecordType::A, 8192);
    let m = answer(respond(&cfg(), &q, MAX_UDP_RESPONSE));
    assert_eq!(
        m.edns.as_ref().map(|e| usize::from(e.max_payload())),
        Some(MAX_UDP_RESPONSE)
    );
}

#[test]
fn counters_follow_outcomes() {
    let c = cfg();
    let mut n = DnsCounters::default();
    respond_counted(&c, &query("c2", RecordType::A), 4095, &mut n);
    respond_counted(
        &c,
        &query("nope.lab.tern.test.", RecordType::A),
        4095,
        &mut n,
    );
    respond_counted(&c, &query("example.com.", RecordType::A), 4095, &mut n);
    respond_counted(&c, &[0u8; 5], 4095, &mut n);
    respond_counted(&c, &[0u8; 12], 4095, &mut n);
    respond_counted(
        &c,
        &query("intranet.corp.example.", RecordType::A),
        4095,
        &mut n,
    );
    assert_eq!(
        n,
        DnsCounters {
            queries: 6,
            answered_locally: 1,
            nxdomain: 1,
            forwarded: 1,
            formerr: 1,
            dropped: 1,
            other_errors: 1,
        }
    );
}

#[test]
fn fit_reply_truncates_forwarded_answers() {
    let q = query("example.com.", RecordType::A);
    let mut reply = q.clone();
    reply[2] |= 0x80;
    reply.extend_from_slice(&[0; 600]);
    assert_eq!(fit_reply(&reply, 4096), Some(reply.clone()));
    let fitted = fit_reply(&reply, 512).unwrap();
    assert_eq!(fitted, {
        let mut want = q.clone();
        want[2] |= 0x80 | 0x02;
        want
    });
    assert_eq!(fit_reply(&reply, 20).unwrap().len(), HEADER_LEN);
    assert_eq!(fit_reply(&reply, 11), None);
    assert_eq!(fit_reply(&reply[..5], 4), None);
}

#[test]
fn never_panics_on_mutations_of_real_queries() {
    let c = cfg();
    let seeds = [
        query("c2", RecordType::A),
        query_edns("example.com.", RecordType::AAAA, 1232),
        query(&reverse_key("100.64.0.2".parse().unwrap()), RecordType::PTR),
    ];
    for seed in &seeds {
        for i in 0..seed.len() {
            for v in [0u8, 1, 0x3f, 0x40, 0x80, 0xc0, 0xff] {
                let mut q = seed.clone();
                q[i] = v;
                for max in [0, 12, 40, 512, 4095] {
                    if let Outcome::Answer(b) = respond(&c, &q, max) {
                        assert!(b.len() <= max);
                        assert_eq!(&b[..2], &q[..2]);
                    }
                }
            }
        }
    }
}

#[test]
fn servfail_echoes_the_query() {
    let q = crate::dns::testing::query("www.example.lab.", RecordType::A);
    let reply = Message::from_vec(&servfail(&q).expect("a reply")).expect("parses");
    let asked = Message::from_vec(&q).expect("query parses");
    assert_eq!(reply.metadata.id, asked.metadata.id);
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(reply.queries, asked.queries);
    assert_eq!(servfail(&[1, 2, 3]), None, "no header");
}

/// `fuzz/seeds/dns_request/` are real queries built with hickory for the fuzz target's config:
/// this checks the committed seeds are exactly what the generator makes (so they cannot drift
/// from the responder's inputs), and with `TERN_WRITE_FUZZ_SEEDS=1` writes them.
#[test]
fn fuzz_seeds_are_the_generated_queries() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/dns_request");
    let write = std::env::var_os("TERN_WRITE_FUZZ_SEEDS").is_some();
    let rev = |ip: &str| reverse_key(ip.parse().unwrap());
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("a_single_label", query("c2", RecordType::A)),
        ("aaaa_fqdn", query("c2.lab.tern.test.", RecordType::AAAA)),
        ("a_upper_case", query("C3.LAB.TERN.TEST.", RecordType::A)),
        ("any_host", query("c1.lab.tern.test.", RecordType::ANY)),
        ("ns_host", query("c2.lab.tern.test.", RecordType::NS)),
        ("txt_host", query("c2.lab.tern.test.", RecordType::TXT)),
        ("ptr_v4", query(&rev("100.64.0.2"), RecordType::PTR)),
        ("ptr_v6", query(&rev("fd7a:115c:a1e0::1"), RecordType::PTR)),
        ("ptr_unknown", query(&rev("100.100.1.2"), RecordType::PTR)),
        ("ptr_outside", query(&rev("192.0.2.1"), RecordType::PTR)),
        ("a_nxdomain", query("nope.lab.tern.test.", RecordType::A)),
        ("a_onion", query("x.onion.", RecordType::A)),
        ("txt_forward", query("example.com.", RecordType::TXT)),
        ("aaaa_split", query("www.example.lab.", RecordType::AAAA)),
        ("mx_servfail", query("mail.corp.example.", RecordType::MX)),
        (
            "a_edns",
            query_edns("c2.lab.tern.test.", RecordType::A, 1232),
        ),
        (
            "any_edns",
            query_edns("example.lab.", RecordType::ANY, 4096),
        ),
        (
            "ptr_edns_small",
            query_edns(&rev("100.64.0.3"), RecordType::PTR, 512),
        ),
    ];
    let mut two = query_msg("c2.lab.tern.test.", RecordType::A);
    two.add_query(two.queries[0].clone());
    seeds.push(("two_questions", two.to_vec().unwrap()));
    let mut notify = query("c2.lab.tern.test.", RecordType::SOA);
    notify[2] = (notify[2] & 0x87) | (4 << 3);
    seeds.push(("opcode_notify", notify));
    let mut response = query("c2.lab.tern.test.", RecordType::A);
    response[2] |= 0x80;
    seeds.push(("a_response", response));
    for (name, bytes) in seeds {
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert_eq!(
            committed,
            bytes,
            "{} differs from the generator",
            path.display()
        );
        assert!(
            !matches!(respond(&cfg(), &committed, MAX_UDP_RESPONSE), Outcome::Drop)
                || name == "a_response",
            "{name}: a seed the responder drops reaches nothing"
        );
    }
}

#[test]
fn with_an_exit_node_other_names_go_to_its_doh_and_tailnet_names_stay_local() {
    let map = lab_map();
    let doh = sa("100.64.0.2:41000");
    let mut config = MagicDnsConfig::from_netmap(&map);
    config.use_exit_node_dns(&map, doh);
    let q = query("example.com.", RecordType::A);
    assert_eq!(
        respond(&config, &q, MAX_UDP_RESPONSE),
        Outcome::ForwardDoh {
            server: doh,
            query: q.clone()
        }
    );
    assert_eq!(
        respond(&config, &q, MAX_UDP_RESPONSE).bucket(),
        Bucket::Forwarded
    );
    let local = answer(respond(
        &config,
        &query("c2.lab.tern.test.", RecordType::A),
        MAX_UDP_RESPONSE,
    ));
    assert_eq!(addrs(&local), [IpAddr::from([100, 64, 0, 2])]);
}
