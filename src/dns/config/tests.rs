use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::dns::testing::lab_map;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn hosts_and_ptr_from_every_node() {
    let cfg = MagicDnsConfig::from_netmap(&lab_map());
    assert_eq!(
        cfg.hosts.get("c2.lab.tern.test.").unwrap(),
        &[ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")]
    );
    assert_eq!(
        cfg.hosts.get("c1.lab.tern.test.").unwrap(),
        &[ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")]
    );
    // Lower-cased key; the subnet prefix is not the node's address.
    assert_eq!(
        cfg.hosts.get("c3.lab.tern.test.").unwrap(),
        &[ip("100.64.0.3")]
    );
    assert_eq!(cfg.ptr[&ip("100.64.0.3")], "C3.lab.tern.test.");
    assert_eq!(cfg.ptr[&ip("fd7a:115c:a1e0::2")], "c2.lab.tern.test.");
    assert_eq!(cfg.tailnet_domain.as_deref(), Some("lab.tern.test."));
    assert_eq!(cfg.search_domains, vec!["lab.tern.test.".to_string()]);
}

#[test]
fn local_domains_when_proxied() {
    let cfg = MagicDnsConfig::from_netmap(&lab_map());
    for d in [
        "lab.tern.test.",
        "64.100.in-addr.arpa.",
        "100.100.in-addr.arpa.",
        "127.100.in-addr.arpa.",
        TAILNET_V6_REVERSE_ZONE,
        "only.local.",
    ] {
        assert!(cfg.local_domains.iter().any(|l| l == d), "{d}");
    }
    assert!(!cfg
        .local_domains
        .iter()
        .any(|l| l == "63.100.in-addr.arpa."));
    assert!(!cfg
        .local_domains
        .iter()
        .any(|l| l == "128.100.in-addr.arpa."));
    assert!(cfg.is_local("x.lab.tern.test."));
    assert!(!cfg.is_local("xlab.tern.test."));

    let mut map = lab_map();
    map.dns_config.as_mut().unwrap().proxied = false;
    let cfg = MagicDnsConfig::from_netmap(&map);
    assert_eq!(cfg.local_domains, vec!["only.local.".to_string()]);
    // Hosts are answered whether or not MagicDNS is on.
    assert!(cfg.hosts.contains_key("c2.lab.tern.test."));
}

#[test]
fn routes_keep_plain_resolvers_and_count_the_others() {
    let cfg = MagicDnsConfig::from_netmap(&lab_map());
    assert_eq!(cfg.routes["example.lab."], vec![sa("10.0.0.53:53")]);
    assert_eq!(cfg.routes["corp.example."], Vec::<SocketAddr>::new());
    assert_eq!(cfg.routes[ROOT], vec![sa("1.1.1.1:53"), sa("9.9.9.9:5353")]);
    assert_eq!(cfg.unsupported_resolvers, 2);
    assert_eq!(cfg.upstreams_for("a.b.example.lab."), &[sa("10.0.0.53:53")]);
    assert_eq!(cfg.upstreams_for("corp.example."), &[] as &[SocketAddr]);
    assert_eq!(cfg.upstreams_for("example.com."), &cfg.routes[ROOT][..]);
}

#[test]
fn root_falls_back_to_the_os_then_control_fallbacks() {
    let mut map = lab_map();
    let dns = map.dns_config.as_mut().unwrap();
    dns.resolvers.clear();
    dns.fallback_resolvers = vec![crate::control::tailcfg::Resolver {
        addr: "8.8.8.8".into(),
        ..Default::default()
    }];
    let mut cfg = MagicDnsConfig::from_netmap(&map);
    assert!(!cfg.routes.contains_key(ROOT));
    assert_eq!(cfg.upstreams_for("example.com."), &[sa("8.8.8.8:53")]);
    cfg.base_resolvers = vec![sa("192.168.1.1:53")];
    assert_eq!(cfg.upstreams_for("example.com."), &[sa("192.168.1.1:53")]);
    // A split route still wins over the base.
    assert_eq!(cfg.upstreams_for("x.example.lab."), &[sa("10.0.0.53:53")]);
}

#[test]
fn longest_route_wins() {
    let mut cfg = MagicDnsConfig::default();
    cfg.routes.insert("lab.".into(), vec![sa("10.0.0.1:53")]);
    cfg.routes.insert("x.lab.".into(), vec![sa("10.0.0.2:53")]);
    assert_eq!(cfg.upstreams_for("a.x.lab."), &[sa("10.0.0.2:53")]);
    assert_eq!(cfg.upstreams_for("a.y.lab."), &[sa("10.0.0.1:53")]);
    assert_eq!(cfg.upstreams_for("a.xlab."), &[] as &[SocketAddr]);
}

#[test]
fn resolver_addresses() {
    assert_eq!(parse_resolver_addr("1.2.3.4"), Some(sa("1.2.3.4:53")));
    assert_eq!(
        parse_resolver_addr("1.2.3.4:5353"),
        Some(sa("1.2.3.4:5353"))
    );
    assert_eq!(parse_resolver_addr("fd00::1"), Some(sa("[fd00::1]:53")));
    assert_eq!(
        parse_resolver_addr("[fd00::1]:54"),
        Some(sa("[fd00::1]:54"))
    );
    assert_eq!(parse_resolver_addr("https://dns.google/dns-query"), None);
    assert_eq!(parse_resolver_addr("tls://1.1.1.1"), None);
    assert_eq!(parse_resolver_addr(""), None);
}

#[test]
fn empty_map_is_empty() {
    let cfg = MagicDnsConfig::from_netmap(&NetworkMap::new());
    assert_eq!(cfg, MagicDnsConfig::default());
}

#[test]
fn extra_records_are_hosts() {
    use crate::control::tailcfg::DnsRecord;
    let rec = |name: &str, kind: &str, value: &str| DnsRecord {
        name: name.into(),
        record_type: kind.into(),
        value: value.into(),
    };
    let mut map = lab_map();
    map.dns_config.as_mut().unwrap().extra_records = vec![
        rec("db.lab.tern.test", "A", "100.64.9.9"),
        rec("db.lab.tern.test", "AAAA", "fd7a:115c:a1e0::99"),
        rec("odd.lab.tern.test", "A", "fd7a:115c:a1e0::98"),
        rec("txt.lab.tern.test", "TXT", "hello"),
        rec("any.example", "", "192.0.2.7"),
    ];
    let cfg = MagicDnsConfig::from_netmap(&map);
    assert_eq!(
        cfg.hosts["db.lab.tern.test."],
        vec![ip("100.64.9.9"), ip("fd7a:115c:a1e0::99")]
    );
    assert_eq!(cfg.ptr[&ip("100.64.9.9")], "db.lab.tern.test.");
    assert_eq!(cfg.hosts["any.example."], vec![ip("192.0.2.7")]);
    assert!(!cfg.hosts.contains_key("odd.lab.tern.test."));
    assert!(!cfg.hosts.contains_key("txt.lab.tern.test."));
}

#[test]
fn ipv6_of_dual_stack_nodes_only_with_magicdns_aaaa_as_go() {
    let mut map = crate::dns::testing::lab_map();
    let v6 = |ip: &str| ip.parse::<IpAddr>().unwrap();
    if let Some(me) = map.self_node.as_mut() {
        me.cap_map.clear();
    }
    let cfg = MagicDnsConfig::from_netmap(&map);
    assert_eq!(
        cfg.lookup("c2.lab.tern.test."),
        Some(&[v6("100.64.0.2")][..]),
        "a node with IPv4 is named by it alone"
    );
    // This node IPv6-only: only IPv6 everywhere.
    if let Some(me) = map.self_node.as_mut() {
        me.addresses.retain(|p| p.addr().is_ipv6());
    }
    let cfg = MagicDnsConfig::from_netmap(&map);
    assert_eq!(
        cfg.lookup("c2.lab.tern.test."),
        Some(&[v6("fd7a:115c:a1e0::2")][..])
    );
}

#[test]
fn with_an_exit_nodes_doh_only_routes_for_exit_nodes_stay_and_the_rest_goes_to_it() {
    let map = lab_map();
    let doh = sa("100.64.0.2:41000");
    let mut cfg = MagicDnsConfig::from_netmap(&map);
    cfg.base_resolvers = vec![sa("192.168.1.1:53")];
    cfg.use_exit_node_dns(&map, doh);
    assert_eq!(cfg.exit_doh, Some(doh));
    // No resolver is marked UseWithExitNode: no split route and no `.` route remain, and the
    // host's own resolvers are not used either.
    assert!(cfg.routes.is_empty(), "{:?}", cfg.routes);
    assert_eq!(cfg.upstream_for("example.com."), Upstream::Doh(doh));
    assert_eq!(cfg.upstream_for("a.example.lab."), Upstream::Doh(doh));
    // Local domains stay local; the unsupported count is not doubled.
    assert!(cfg.is_local("x.only.local."));
    assert_eq!(cfg.unsupported_resolvers, 2);
}

#[test]
fn resolvers_marked_for_exit_nodes_win_over_the_exit_nodes_doh() {
    let mut map = lab_map();
    let dns = map.dns_config.as_mut().unwrap();
    dns.resolvers[1].use_with_exit_node = true;
    let route = dns.routes.get_mut("example.lab").unwrap().as_mut().unwrap();
    route[0].use_with_exit_node = true;
    let mut cfg = MagicDnsConfig::from_netmap(&map);
    cfg.use_exit_node_dns(&map, sa("100.64.0.2:41000"));
    assert_eq!(cfg.exit_doh, None);
    assert_eq!(cfg.routes[ROOT], vec![sa("9.9.9.9:5353")]);
    assert_eq!(
        cfg.upstream_for("a.example.lab."),
        Upstream::Dns(&[sa("10.0.0.53:53")])
    );
    assert_eq!(
        cfg.upstream_for("example.com."),
        Upstream::Dns(&[sa("9.9.9.9:5353")])
    );
}

#[test]
fn a_split_route_for_exit_nodes_beats_the_doh_for_its_names_only() {
    let mut map = lab_map();
    let dns = map.dns_config.as_mut().unwrap();
    let route = dns.routes.get_mut("example.lab").unwrap().as_mut().unwrap();
    route[0].use_with_exit_node = true;
    let doh = sa("100.64.0.2:41000");
    let mut cfg = MagicDnsConfig::from_netmap(&map);
    cfg.use_exit_node_dns(&map, doh);
    assert_eq!(
        cfg.upstream_for("a.example.lab."),
        Upstream::Dns(&[sa("10.0.0.53:53")])
    );
    assert_eq!(cfg.upstream_for("example.com."), Upstream::Doh(doh));
}
