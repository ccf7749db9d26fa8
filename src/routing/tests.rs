use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn peer(id: i64, name: &str, v4: &str, extra: &[&str]) -> Node {
    let addresses = vec![
        net(&format!("{v4}/32")),
        net(&format!("fd7a:115c:a1e0::{id:x}/128")),
    ];
    let mut allowed = addresses.clone();
    allowed.extend(extra.iter().map(|s| net(s)));
    Node {
        id,
        name: format!("{name}.lab.ts.net."),
        addresses,
        allowed_ips: Some(allowed),
        ..Node::default()
    }
}

fn map_of(peers: Vec<Node>) -> NetworkMap {
    let mut map = NetworkMap::new();
    for p in peers {
        map.peers.insert(p.id, p);
    }
    map
}

fn me() -> Vec<IpNet> {
    vec![net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128")]
}

fn lan() -> LocalPrefixes {
    LocalPrefixes {
        internal: vec![net("127.0.0.0/8")],
        external: vec![net("10.1.0.0/24")],
        host_ips: vec![net("10.1.0.2/32")],
    }
}

fn strs(nets: &[IpNet]) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

#[test]
fn plain_plan_has_peer_hosts_ula_and_quad_100() {
    let map = map_of(vec![
        peer(2, "c2", "100.64.0.2", &["10.2.9.0/24"]),
        peer(3, "c3", "100.64.0.3", &["0.0.0.0/0", "::/0"]),
    ]);
    let plan = route_plan(&map, &me(), &RoutingPrefs::default(), &lan(), true);
    assert_eq!(
        strs(&plan.via_tun),
        [
            "100.64.0.2/32",
            "100.64.0.3/32",
            "100.100.100.100/32",
            "fd7a:115c:a1e0::/48",
            "fd7a:115c:a1e0::53/128"
        ]
    );
    assert!(
        plan.throw.is_empty(),
        "no throw routes without an exit node"
    );
    let v4_only = route_plan(&map, &me(), &RoutingPrefs::default(), &lan(), false);
    assert!(v4_only.via_tun.iter().all(|n| n.addr().is_ipv4()));
}

#[test]
fn accept_routes_adds_subnets_never_default_routes() {
    let map = map_of(vec![
        peer(2, "c2", "100.64.0.2", &["10.2.9.0/24"]),
        peer(3, "c3", "100.64.0.3", &["0.0.0.0/0", "::/0"]),
    ]);
    let prefs = RoutingPrefs {
        accept_routes: true,
        ..RoutingPrefs::default()
    };
    let plan = route_plan(&map, &me(), &prefs, &lan(), true);
    assert!(plan.via_tun.contains(&net("10.2.9.0/24")));
    assert!(!plan.via_tun.contains(&default_v4()));
}

#[test]
fn exit_node_routes_everything_and_the_lan_into_the_tunnel() {
    let map = map_of(vec![peer(3, "c3", "100.64.0.3", &["0.0.0.0/0", "::/0"])]);
    let prefs = RoutingPrefs {
        exit_node_wanted: true,
        ..RoutingPrefs::default()
    };
    let plan = route_plan(&map, &me(), &prefs, &lan(), true);
    for want in ["0.0.0.0/0", "::/0", "10.1.0.0/24"] {
        assert!(
            plan.via_tun.contains(&net(want)),
            "{want} in {:?}",
            plan.via_tun
        );
    }
    assert_eq!(strs(&plan.throw), ["127.0.0.0/8"]);
    let lan_ok = RoutingPrefs {
        exit_node_allow_lan_access: true,
        ..prefs
    };
    let plan = route_plan(&map, &me(), &lan_ok, &lan(), true);
    assert!(!plan.via_tun.contains(&net("10.1.0.0/24")));
    assert_eq!(strs(&plan.throw), ["10.1.0.0/24", "127.0.0.0/8"]);
}

#[test]
fn many_peers_share_one_cgnat_route() {
    let peers: Vec<Node> = (0..=MAX_PEER_HOST_ROUTES as i64)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 65, 0, 0)) + i as u32);
            peer(i + 10, &format!("p{i}"), &ip.to_string(), &[])
        })
        .collect();
    let plan = route_plan(
        &map_of(peers),
        &me(),
        &RoutingPrefs::default(),
        &lan(),
        false,
    );
    assert_eq!(strs(&plan.via_tun), ["100.64.0.0/10", "100.100.100.100/32"]);
}

#[test]
fn wireguard_gets_default_routes_only_from_the_exit_node() {
    let exit = peer(3, "c3", "100.64.0.3", &["0.0.0.0/0", "::/0", "10.3.0.0/24"]);
    assert_eq!(
        strs(&wg_allowed_ips(&exit, false, false)),
        ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"]
    );
    assert_eq!(wg_allowed_ips(&exit, true, false).len(), 4);
    assert_eq!(wg_allowed_ips(&exit, true, true).len(), 5);
    assert!(offers_exit_node(&exit));
    assert!(!offers_exit_node(&peer(
        2,
        "c2",
        "100.64.0.2",
        &["0.0.0.0/0"]
    )));
}

#[test]
fn exit_node_is_found_by_name_ip_or_hostname() {
    let mut c3 = peer(3, "c3", "100.64.0.3", &["0.0.0.0/0", "::/0"]);
    c3.hostinfo.hostname = "Exit-Box".into();
    let map = map_of(vec![
        c3,
        peer(2, "c2", "100.64.0.2", &[]),
        peer(4, "c2x", "100.64.0.4", &[]),
    ]);
    for spec in [
        "c3",
        "C3.lab.ts.net.",
        "c3.lab.ts.net",
        "100.64.0.3",
        "exit-box",
    ] {
        assert_eq!(resolve_exit_node(&map, spec).unwrap().id, 3, "{spec}");
    }
    assert!(matches!(
        resolve_exit_node(&map, "nope"),
        Err(ExitNodeError::NotFound(_))
    ));
    assert!(matches!(
        resolve_exit_node(&map, "c2"),
        Err(ExitNodeError::NotOffered(_))
    ));
    let mut twin = peer(5, "c5", "100.64.0.5", &["0.0.0.0/0", "::/0"]);
    twin.hostinfo.hostname = "exit-box".into();
    let mut map = map;
    map.peers.insert(5, twin);
    let err = resolve_exit_node(&map, "exit-box").unwrap_err();
    assert!(err.to_string().contains("several peers"), "{err}");
}

#[test]
fn served_networks_of_an_exit_node_leave_out_its_lan() {
    let advertised = [net("0.0.0.0/0"), net("::/0"), net("10.2.9.0/24")];
    let served = served_networks(&me(), &advertised, &lan());
    let covers = |ip: &str| {
        let ip: IpAddr = ip.parse().unwrap();
        served.iter().any(|n| n.contains(&ip))
    };
    assert!(covers("198.18.0.30"), "the internet");
    assert!(covers("2001:db8::1"));
    assert!(covers("10.2.9.7"), "an advertised subnet");
    assert!(covers("100.64.0.1"), "our own address");
    assert!(
        !covers("10.1.0.77"),
        "the exit node's own LAN is not served"
    );
    assert!(
        !covers("100.64.0.9"),
        "other tailnet addresses are not ours"
    );
    let plain = served_networks(&me(), &[], &lan());
    assert_eq!(plain, me());
}

#[test]
fn subtract_splits_around_holes() {
    let rest = subtract(net("10.0.0.0/8"), &[net("10.1.0.0/16")]);
    assert_eq!(rest.len(), 8);
    assert!(!rest.iter().any(|n| n.contains(&net("10.1.2.0/24"))));
    assert!(rest.iter().any(|n| n.contains(&net("10.2.0.0/16"))));
    assert!(subtract(net("10.1.0.0/24"), &[net("10.0.0.0/8")]).is_empty());
    assert_eq!(
        subtract(net("10.0.0.0/8"), &[net("11.0.0.0/8")]),
        [net("10.0.0.0/8")]
    );
}

#[test]
fn local_prefixes_sort_loopback_lan_and_skip_the_rest() {
    let addrs = [
        (true, net("127.0.0.1/8")),
        (true, net("::1/128")),
        (false, net("10.1.0.2/24")),
        (false, net("100.64.0.1/32")),
        (false, net("fe80::1/64")),
        (false, net("2001:db8:1:1::2/64")),
    ];
    let local = LocalPrefixes::from_interfaces(addrs.iter().map(|(l, n)| (*l, n)));
    assert_eq!(strs(&local.internal), ["127.0.0.0/8"]);
    assert_eq!(strs(&local.external), ["10.1.0.0/24", "2001:db8:1:1::/64"]);
    assert!(local.host_ips.contains(&net("10.1.0.2/32")));
    assert!(!local.host_ips.iter().any(is_tailnet_range));
}

#[test]
fn advertised_routes_refuse_what_would_break_routing() {
    assert_eq!(
        parse_advertised_routes("10.2.9.0/24, 192.168.7.0/24,").unwrap(),
        [net("10.2.9.0/24"), net("192.168.7.0/24")]
    );
    assert!(parse_advertised_routes("").unwrap().is_empty());
    let err = |s| parse_advertised_routes(s).unwrap_err().to_string();
    assert!(err("10.2.9.1/24").contains("write 10.2.9.0/24"));
    assert!(err("100.64.5.0/24").contains("tailnet"));
    assert!(err("100.0.0.0/8").contains("tailnet"));
    assert!(err("fd7a:115c:a1e0:ab::/64").contains("tailnet"));
    assert!(err("10.2.9.7/32").contains("single host"));
    assert!(err("10.0.0.0/8,10.2.0.0/16").contains("overlaps"));
    assert!(err("0.0.0.0/0").contains("--advertise-exit-node"));
    assert!(err("bogus").contains("not a CIDR"));
}
