use std::net::{IpAddr, SocketAddr};

use serde_json::json;

use super::*;
use crate::control::tailcfg::FilterRule;

const ME: UserId = 1;
const OTHER: UserId = 2;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// An exit node's filter: `internet_from` may reach anything (autogroup:internet in control's
/// rules becomes every address outside the tailnet); served = 0.0.0.0/0 and ::/0 as an exit node.
fn exit_filter(internet_from: &str) -> Filter {
    let rules: Vec<FilterRule> = serde_json::from_value(json!([{
        "SrcIPs": [internet_from],
        "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]
    }]))
    .expect("rule JSON");
    let served = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    Filter::from_rules(&rules, &served).expect("filter")
}

fn access(offering_exit_node: bool, filter: Option<Filter>) -> Access {
    Access {
        self_user: Some(ME),
        peers: [
            (ip("100.64.0.2"), ME),
            (ip("100.64.0.3"), OTHER),
            (ip("fd7a:115c:a1e0::3"), OTHER),
        ]
        .into_iter()
        .collect(),
        offering_exit_node,
        filter,
        exit_node_filtered: Vec::new(),
    }
}

#[test]
fn a_peer_of_the_same_user_may_always_ask() {
    let a = access(false, None);
    assert!(a.may_query_dns(ip("100.64.0.2")));
}

#[test]
fn another_users_peer_needs_an_exit_node_and_the_filters_leave_to_reach_the_internet() {
    assert!(!access(false, None).may_query_dns(ip("100.64.0.3")));
    assert!(!access(false, Some(exit_filter("*"))).may_query_dns(ip("100.64.0.3")));
    assert!(!access(true, None).may_query_dns(ip("100.64.0.3")));
    let allowed = access(true, Some(exit_filter("100.64.0.3/32")));
    assert!(allowed.may_query_dns(ip("100.64.0.3")));
    let someone_else = access(true, Some(exit_filter("100.64.0.9/32")));
    assert!(!someone_else.may_query_dns(ip("100.64.0.3")));
}

#[test]
fn ipv6_callers_are_checked_against_2000_colon_colon() {
    let allowed = access(true, Some(exit_filter("fd7a:115c:a1e0::3/128")));
    assert!(allowed.may_query_dns(ip("fd7a:115c:a1e0::3")));
    // The filter serves only IPv4: 2000:: is none of ours.
    let rules: Vec<FilterRule> = serde_json::from_value(json!([{
        "SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]
    }]))
    .unwrap();
    let v4_only = Filter::from_rules(&rules, &["0.0.0.0/0".parse().unwrap()]).unwrap();
    assert!(!access(true, Some(v4_only)).may_query_dns(ip("fd7a:115c:a1e0::3")));
}

#[test]
fn unknown_addresses_are_no_peers_and_may_not_ask() {
    let a = access(true, Some(exit_filter("*")));
    assert!(!a.is_peer(ip("100.64.0.99")));
    assert!(!a.may_query_dns(ip("100.64.0.99")));
    assert!(a.is_peer(ip("100.64.0.3")));
}

#[test]
fn exit_node_filtered_set_matches_exact_names_and_dot_suffixes() {
    let mut a = access(true, None);
    a.exit_node_filtered = vec![".ts.net".into(), "secret.example.com".into(), ".".into()];
    assert!(!a.serves_name("host.tail1234.ts.net."));
    assert!(!a.serves_name("X.TS.NET"));
    assert!(
        a.serves_name("ts.net."),
        "a suffix filters what is under it, as Go's"
    );
    assert!(!a.serves_name("Secret.Example.com."));
    assert!(a.serves_name("www.secret.example.com."));
    assert!(a.serves_name("example.org."));
    assert!(a.serves_name("notts.net."));
}

#[test]
fn services_name_each_family_and_the_dns_proxy() {
    let both = services(&[(ip("100.64.0.1"), 41641), (ip("fd7a:115c:a1e0::1"), 41641)]);
    let got: Vec<(&str, u16)> = both.iter().map(|s| (s.proto.as_str(), s.port)).collect();
    assert_eq!(
        got,
        [
            ("peerapi4", 41641),
            ("peerapi6", 41641),
            ("peerapi-dns-proxy", 1)
        ]
    );
    let v4 = services(&[(ip("100.64.0.1"), 5000)]);
    assert_eq!(v4.len(), 2);
    assert_eq!(v4[0].proto, "peerapi4");
    assert!(services(&[]).is_empty(), "no listener: nothing to announce");
}

#[test]
fn urls_follow_each_address_family_with_its_port() {
    let announced = services(&[(ip("100.64.0.1"), 5000), (ip("fd7a:115c:a1e0::1"), 6000)]);
    let addrs = [ip("100.64.0.7"), ip("fd7a:115c:a1e0::7")];
    assert_eq!(
        urls(&addrs, &announced),
        ["http://100.64.0.7:5000", "http://[fd7a:115c:a1e0::7]:6000"]
    );
    assert!(urls(&addrs, &[]).is_empty());
}

/// A query for `example.com` A, id 0xabcd.
fn example_query() -> Vec<u8> {
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "com"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn get_takes_base64url_with_or_without_padding() {
    let query = example_query();
    let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&query);
    let padded = base64::engine::general_purpose::URL_SAFE.encode(&query);
    assert!(padded.ends_with('='), "test query must need padding");
    assert_eq!(
        query_from_get(Some(&format!("dns={plain}"))).unwrap(),
        query
    );
    assert_eq!(
        query_from_get(Some(&format!("ct=x&dns={padded}"))).unwrap(),
        query
    );
    let escaped = padded.replace('=', "%3D");
    assert_eq!(
        query_from_get(Some(&format!("dns={escaped}"))).unwrap(),
        query
    );
}

#[test]
fn get_refuses_missing_bad_and_oversized_queries() {
    assert_eq!(query_from_get(None), Err(DohError::MissingDns));
    assert_eq!(query_from_get(Some("dns=")), Err(DohError::MissingDns));
    assert_eq!(
        query_from_get(Some("q=example.com")),
        Err(DohError::MissingDns)
    );
    assert_eq!(query_from_get(Some("dns=!!!")), Err(DohError::BadBase64));
    assert_eq!(query_from_get(Some("dns==")), Err(DohError::BadBase64));
    assert_eq!(query_from_get(Some("dns=%3D")), Err(DohError::BadBase64));
    let huge = "A".repeat(MAX_QUERY / 3 * 4 + 8);
    assert_eq!(
        query_from_get(Some(&format!("dns={huge}"))),
        Err(DohError::TooLarge)
    );
}

#[test]
fn post_needs_the_doh_content_type() {
    assert!(is_doh_content_type(Some("application/dns-message")));
    assert!(is_doh_content_type(Some(
        "Application/DNS-Message; charset=x"
    )));
    assert!(!is_doh_content_type(Some("application/json")));
    assert!(!is_doh_content_type(None));
}

#[test]
fn question_name_reads_the_query_and_rejects_garbage() {
    assert_eq!(
        question_name(&example_query()).as_deref(),
        Some("example.com.")
    );
    assert_eq!(question_name(&[0u8; 5]), None);
    // A header without a question.
    assert_eq!(question_name(&example_query()[..12]), None);
}

#[test]
fn upstream_is_the_hosts_first_nameserver_unless_that_is_quad_100() {
    let mut magic = MagicDnsConfig::default();
    let control: SocketAddr = "192.0.2.53:53".parse().unwrap();
    let corp: SocketAddr = "192.0.2.54:53".parse().unwrap();
    magic.routes.insert(".".into(), vec![control]);
    magic.routes.insert("corp.example.".into(), vec![corp]);

    let host = "search lan\nnameserver 10.1.1.1\nnameserver 10.1.1.2\n";
    assert_eq!(
        upstreams_for(host, &magic, "example.com."),
        ["10.1.1.1:53".parse::<SocketAddr>().unwrap()]
    );
    let ours = "nameserver 100.100.100.100\nnameserver 10.1.1.2\n";
    assert_eq!(upstreams_for(ours, &magic, "example.com."), [control]);
    assert_eq!(upstreams_for(ours, &magic, "git.corp.example."), [corp]);
    assert_eq!(upstreams_for("", &magic, "example.com."), [control]);
}

#[test]
fn refused_answers_the_query_with_rcode_5() {
    let reply = crate::dns::magic::refused(&example_query()).expect("reply");
    assert_eq!(&reply[..2], &[0xab, 0xcd], "same id");
    assert_ne!(reply[2] & 0x80, 0, "QR set");
    assert_eq!(reply[3] & 0x0f, 5, "REFUSED");
}

fn exit_node(cap: i32, services: Vec<Service>) -> crate::control::tailcfg::Node {
    let mut node = crate::control::tailcfg::Node {
        cap,
        addresses: vec![
            "100.64.0.9/32".parse().unwrap(),
            "fd7a:115c:a1e0::9/128".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
        ],
        ..Default::default()
    };
    node.hostinfo.services = services;
    node
}

#[test]
fn doh_server_of_an_exit_node_as_go_finds_it() {
    let both = services(&[(ip("100.64.0.1"), 5000), (ip("fd7a:115c:a1e0::1"), 6000)]);
    // New enough: the capability version says it; the port comes from the services.
    let node = exit_node(CAP_VERSION_DNS_PROXY, both.clone());
    assert_eq!(
        doh_server(&node, true, true),
        Some("100.64.0.9:5000".parse().unwrap())
    );
    assert_eq!(
        doh_server(&node, false, true),
        Some("[fd7a:115c:a1e0::9]:6000".parse().unwrap())
    );
    assert_eq!(doh_server(&node, false, false), None);
    // Old but announcing the DNS proxy.
    assert!(doh_server(&exit_node(20, both.clone()), true, false).is_some());
    // Old and silent about it.
    let ports_only: Vec<Service> = both
        .iter()
        .filter(|s| s.proto != SERVICE_DNS)
        .cloned()
        .collect();
    assert_eq!(doh_server(&exit_node(20, ports_only), true, true), None);
    // New enough but no peer API port announced (Go would build a URL without a host).
    assert_eq!(doh_server(&exit_node(130, Vec::new()), true, true), None);
}
