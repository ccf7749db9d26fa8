//! Upstream vectors from `tests/vectors/filter.json`.

use super::*;
use crate::packet::tcp_flags;
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/filter.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).expect("filter.json parses")
}

fn rules(v: &Value) -> Vec<FilterRule> {
    serde_json::from_value(v.clone()).expect("FilterRule JSON")
}

fn nets(v: &Value) -> Vec<IpNet> {
    serde_json::from_value(v.clone()).expect("prefix list")
}

fn packet(proto: u8, src: &str, dst: &str, sport: u64, dport: u64, syn: bool) -> PacketSummary {
    let src: IpAddr = src.parse().unwrap();
    PacketSummary {
        proto,
        src,
        dst: dst.parse().unwrap(),
        src_port: sport as u16,
        dst_port: dport as u16,
        tcp_flags: if syn { tcp_flags::SYN } else { 0 },
        // echo request: neither a reply nor an error
        icmp_type: if src.is_ipv4() { 8 } else { 128 },
        icmp_code: 0,
        later_fragment: false,
    }
}

fn verdict(s: &str) -> Verdict {
    match s {
        "Accept" => Verdict::Accept,
        "Drop" => Verdict::Drop,
        other => panic!("unknown verdict {other}"),
    }
}

/// `ip:port` in Go netip text form.
fn split_addr_port(s: &str) -> (String, u64) {
    let sa: std::net::SocketAddr = s.parse().unwrap();
    (sa.ip().to_string(), u64::from(sa.port()))
}

/// Renders compiled matches in the vectors' `filtertype.Match` JSON shape; `Caps` sorted (Go
/// iterates CapMap in random order, so the vectors' order means nothing).
fn match_json(m: &Match) -> Value {
    sorted_caps(&serde_json::json!({
        "IPProto": m.protos,
        "Srcs": m.srcs.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "SrcCaps": if m.src_caps.is_empty() { Value::Null } else { serde_json::json!(m.src_caps) },
        "Dsts": m.dsts.iter().map(|d| serde_json::json!({
            "Net": d.net.to_string(),
            "Ports": {"First": d.ports.first, "Last": d.ports.last},
        })).collect::<Vec<_>>(),
        "Caps": m.caps.iter().map(|c| serde_json::json!({
            "Dst": c.dst.to_string(),
            "Cap": c.cap,
            "Values": c.values,
        })).collect::<Vec<_>>(),
    }))
}

/// The same JSON with `Caps` in a canonical order.
fn sorted_caps(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(Value::Array(caps)) = v.get_mut("Caps") {
        caps.sort_by_key(|c| c.to_string());
    }
    v
}

#[test]
fn parse_ip_set_vectors() {
    let v = vectors();
    let cases = v["parse_ip_set_vectors"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let input = c["input"].as_str().unwrap();
        match (parse_ip_set(input), c["want_error"].as_str()) {
            (Ok(set), None) => {
                let want: Vec<String> = serde_json::from_value(c["want_prefixes"].clone()).unwrap();
                let got: Vec<String> = set.prefixes.iter().map(|n| n.to_string()).collect();
                assert_eq!(got, want, "{input}");
                assert_eq!(set.cap.as_deref(), c["want_cap"].as_str(), "{input}");
            }
            (Err(e), Some(want)) => assert_eq!(e.to_string(), want, "{input}"),
            (got, want) => panic!("{input}: got {got:?}, want error {want:?}"),
        }
    }
}

#[test]
fn matches_from_filter_rules_vectors() {
    let v = vectors();
    for c in v["matches_from_filter_rules_vectors"].as_array().unwrap() {
        let got = matches_from_rules(&rules(&c["rules"])).unwrap();
        let got: Vec<Value> = got.iter().map(match_json).collect();
        let want: Vec<Value> = c["want_matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(sorted_caps)
            .collect();
        assert_eq!(got, want, "{}", c["name"]);
    }
}

#[test]
fn captured_rule_to_match_vectors() {
    let v = vectors();
    let cases = v["captured_rule_to_match_vectors"].as_array().unwrap();
    assert_eq!(cases.len(), 44);
    for c in cases {
        let got = matches_from_rules(&rules(&c["packet_filter_rules"]))
            .unwrap_or_else(|e| panic!("{}: {e}", c["test_id"]));
        let got: Vec<Value> = got.iter().map(match_json).collect();
        let want: Vec<Value> = c["want_matches"]
            .as_array()
            .map(|a| a.iter().map(sorted_caps).collect())
            .unwrap_or_default();
        assert_eq!(got, want, "{}", c["test_id"]);
    }
}

#[test]
fn filter_decision_vectors() {
    let v = vectors();
    let fd = &v["filter_decision_vectors"];
    let filter = Filter::from_rules(
        &rules(&fd["rules_as_filter_rules"]),
        &nets(&fd["local_nets"]),
    )
    .unwrap()
    .with_cap_lookup(|ip, cap| ip == IpAddr::from([10, 0, 0, 1]) && cap == "cap-hit-1234-ssh");
    let cases = fd["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 35);
    for c in cases {
        let proto = c["ip_proto"].as_u64().unwrap() as u8;
        let p = packet(
            proto,
            c["src"].as_str().unwrap(),
            c["dst"].as_str().unwrap(),
            c["src_port"].as_u64().unwrap(),
            c["dst_port"].as_u64().unwrap(),
            c["tcp_flags"].as_str() == Some("SYN"),
        );
        let want = verdict(c["want"].as_str().unwrap());
        assert_eq!(filter.check(&p), want, "{c}");
        if proto == proto::TCP {
            // The upstream case also asserts the same verdict for UDP.
            let udp = PacketSummary {
                proto: proto::UDP,
                ..p
            };
            assert_eq!(filter.check(&udp), want, "as UDP: {c}");
        }
    }
}

#[test]
fn udp_state_vectors() {
    let v = vectors();
    let fd = &v["filter_decision_vectors"];
    let mut filter = Filter::from_rules(
        &rules(&fd["rules_as_filter_rules"]),
        &nets(&fd["local_nets"]),
    )
    .unwrap();
    for step in v["udp_state_vectors"]["steps"].as_array().unwrap() {
        let (src, sport) = split_addr_port(step["src"].as_str().unwrap());
        let (dst, dport) = split_addr_port(step["dst"].as_str().unwrap());
        let p = packet(
            step["proto"].as_u64().unwrap() as u8,
            &src,
            &dst,
            sport,
            dport,
            false,
        );
        let want = verdict(step["want"].as_str().unwrap());
        match step["op"].as_str().unwrap() {
            "RunIn" => assert_eq!(filter.check(&p), want, "{step}"),
            "RunOut" => filter.note_outbound(&p),
            op => panic!("unknown op {op}"),
        }
    }
}

#[test]
fn proto_and_ips_only_if_all_ports_vectors() {
    let v = vectors();
    for c in v["proto_and_ips_only_if_all_ports_vectors"]
        .as_array()
        .unwrap()
    {
        let pk = &c["packet"];
        let dst = pk["dst"].as_str().unwrap();
        let local = [IpNet::from(dst.parse::<IpAddr>().unwrap())];
        let filter = Filter::from_rules(&rules(&serde_json::json!([c["rule"]])), &local).unwrap();
        let p = packet(
            pk["ip_proto"].as_u64().unwrap() as u8,
            pk["src"].as_str().unwrap(),
            dst,
            0,
            0,
            false,
        );
        let want = c["want"].as_bool().unwrap();
        assert_eq!(filter.check(&p) == Verdict::Accept, want, "{}", c["name"]);
    }
}

#[test]
fn icmp_replies_and_non_syn_tcp_pass_without_rules() {
    let local = ["100.64.0.1/32".parse().unwrap()];
    let filter = Filter::from_rules(&[], &local).unwrap();
    let mut p = packet(proto::ICMPV4, "100.64.0.9", "100.64.0.1", 0, 0, false);
    assert_eq!(filter.check(&p), Verdict::Drop, "echo request");
    p.icmp_type = 0;
    assert_eq!(filter.check(&p), Verdict::Accept, "echo reply");
    let tcp = packet(proto::TCP, "100.64.0.9", "100.64.0.1", 5, 22, false);
    assert_eq!(filter.check(&tcp), Verdict::Accept, "established TCP");
    let syn = packet(proto::TCP, "100.64.0.9", "100.64.0.1", 5, 22, true);
    assert_eq!(filter.check(&syn), Verdict::Drop, "new TCP");
    let elsewhere = packet(proto::TCP, "100.64.0.9", "100.64.0.2", 5, 22, false);
    assert_eq!(filter.check(&elsewhere), Verdict::Drop, "not for us");
}

#[test]
fn cap_as_destination_is_an_error() {
    let r = rules(
        &serde_json::json!([{"SrcIPs": ["*"], "DstPorts": [{"IP": "cap:x", "Ports": {"First": 0, "Last": 65535}}]}]),
    );
    assert_eq!(
        Filter::from_rules(&r, &[]).unwrap_err(),
        FilterError::CapInDst("x".into())
    );
}

#[test]
fn peer_caps_vectors() {
    let v = vectors();
    let pc = &v["peer_caps_vectors"];
    let filter = Filter::from_rules(&rules(&pc["rules"]), &[]).unwrap();
    for c in pc["cases"].as_array().unwrap() {
        let src: IpAddr = c["src"].as_str().unwrap().parse().unwrap();
        let dst: IpAddr = c["dst"].as_str().unwrap().parse().unwrap();
        let mut want: Vec<String> = serde_json::from_value(c["want_caps"].clone()).unwrap();
        want.sort();
        assert_eq!(filter.peer_caps(src, dst), want, "{}", c["name"]);
    }
}

#[test]
fn filter_rule_json_roundtrip_vectors() {
    let v = vectors();
    for c in v["filter_rule_json_roundtrip_vectors"].as_array().unwrap() {
        let rule: FilterRule = serde_json::from_value(c["json"].clone()).unwrap();
        let back = serde_json::to_value(&rule).unwrap();
        let again: FilterRule = serde_json::from_value(back).unwrap();
        assert_eq!(again, rule, "{}", c["name"]);
        matches_from_rules(&[rule]).unwrap_or_else(|e| panic!("{}: {e}", c["name"]));
    }
}

/// Node addresses of `node`, and for each peer address its CapMap keys.
fn netmap_parts(resp: &Value, peers: &mut Vec<(IpAddr, Vec<String>)>) -> Vec<IpNet> {
    for key in ["Peers", "PeersChanged"] {
        for peer in resp[key].as_array().into_iter().flatten() {
            let caps: Vec<String> = peer["CapMap"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for a in nets(&peer["Addresses"]) {
                peers.push((a.addr(), caps.clone()));
            }
        }
    }
    if resp["Node"].is_null() {
        Vec::new()
    } else {
        nets(&resp["Node"]["Addresses"])
    }
}

#[test]
fn netmap_filter_vectors() {
    let v = vectors();
    let cases = v["netmap_filter_vectors"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let mut peers = Vec::new();
        let local = netmap_parts(&c["map_response"], &mut peers);
        netmap_parts(&c["incremental_map_response"], &mut peers);
        let filter = Filter::from_rules(&rules(&c["map_response"]["PacketFilter"]), &local)
            .unwrap()
            .with_cap_lookup(move |ip, cap| {
                peers
                    .iter()
                    .any(|(a, caps)| *a == ip && caps.iter().any(|c| c == cap))
            });
        for check in c["checks"].as_array().unwrap() {
            let p = packet(
                proto::TCP,
                check["src"].as_str().unwrap(),
                check["dst"].as_str().unwrap(),
                40000,
                check["port"].as_u64().unwrap(),
                true,
            );
            let want = verdict(check["want"].as_str().unwrap());
            assert_eq!(filter.check(&p), want, "{}: {check}", c["name"]);
        }
    }
}

#[test]
fn realistic_sample_filter_compiles_and_decides() {
    let v = vectors();
    let rules = rules(&v["fixtures"]["sample_filter_rules"]["value"]);
    assert!(!rules.is_empty());
    let matches = matches_from_rules(&rules).expect("sample filter compiles");
    assert_eq!(matches.len(), rules.len());
    // Every match accepts a new TCP/UDP flow from one of its own sources to one of its own
    // destinations on its first port (when it covers TCP or UDP).
    for m in &matches {
        let (Some(src), Some(dst)) = (m.srcs.first(), m.dsts.first()) else {
            continue;
        };
        let Some(&p) = m
            .protos
            .iter()
            .find(|p| [proto::TCP, proto::UDP].contains(p))
        else {
            continue;
        };
        let filter = Filter::from_rules(&rules, &[dst.net]).unwrap();
        let pkt = PacketSummary {
            proto: p,
            src: src.network(),
            dst: dst.net.network(),
            src_port: 40000,
            dst_port: dst.ports.first,
            tcp_flags: tcp_flags::SYN,
            icmp_type: 0,
            icmp_code: 0,
            later_fragment: false,
        };
        assert_eq!(filter.check(&pkt), Verdict::Accept, "{m:?}");
    }
}
