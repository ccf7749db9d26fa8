use super::*;
use serde_json::json;
use tern_lab::control::{Config, RegisterOutcome};

fn tailnet(dir: &std::path::Path) -> Tailnet {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[[auth_key]]\nkey = \"k\"\nreusable = true\n\
         [[derp_region]]\nid = 900\ncode = \"lab\"\n[[derp_region.node]]\nname = \"900a\"\nhost_name = \"10.0.0.1\"\nipv4 = \"10.0.0.1\"\nderp_port = 8443\n\
         [[grant]]\nsrc = [\"*\"]\ndst = [\"*\"]\ncaps = [\"tailscale.com/cap/relay\"]\n",
        dir.display()
    );
    Tailnet::open(Config::parse(&text).unwrap()).unwrap()
}

fn add(tailnet: &mut Tailnet, n: u8, host: &str) -> u64 {
    let input = RegisterInput {
        machine_key: format!("mkey:{}", format!("{n:02x}").repeat(32)),
        node_key: format!("nodekey:{}", format!("{n:02x}").repeat(32)),
        auth_key: Some("k".into()),
        hostinfo: json!({"Hostname": host}),
        version: 130,
        ..RegisterInput::default()
    };
    match tailnet.register(&input, 1_700_000_000).unwrap() {
        RegisterOutcome::Accepted { node_id, .. } => node_id,
        other => panic!("{other:?}"),
    }
}

#[test]
fn full_map_has_what_a_go_client_needs_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tailnet(dir.path());
    let a = add(&mut t, 1, "alpha");
    add(&mut t, 2, "beta");
    let msg = full_map(&t, a, &mut StreamState::default()).unwrap();
    let v = serde_json::to_value(&msg).unwrap();
    let node = &v["Node"];
    assert_eq!(node["Name"], "alpha.lab.tern.test.");
    assert_eq!(
        node["Addresses"],
        json!(["100.64.0.1/32", "fd7a:115c:a1e0::1/128"])
    );
    assert_eq!(node["MachineAuthorized"], true);
    assert_eq!(node["KeyExpiry"], "0001-01-01T00:00:00Z");
    assert_eq!(
        node["AllowedIPs"],
        json!(["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]),
        "no routes: AllowedIPs are the addresses"
    );
    assert!(node.get("PrimaryRoutes").is_none(), "{node}");
    assert!(node["CapMap"]
        .as_object()
        .unwrap()
        .contains_key("disable-captive-portal-detection"));
    assert!(node["Hostinfo"].is_object());
    assert_eq!(
        v["Peers"].as_array().unwrap().len(),
        1,
        "self is not a peer"
    );
    assert_eq!(v["Peers"][0]["Name"], "beta.lab.tern.test.");
    assert!(v["Peers"][0]["Hostinfo"].is_object());
    assert_eq!(v["DERPMap"]["Regions"]["900"]["Nodes"][0]["DERPPort"], 8443);
    assert_eq!(v["DERPMap"]["omitDefaultRegions"], true);
    assert_eq!(
        v["PacketFilter"][0],
        json!({"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]})
    );
    let caps = &v["PacketFilter"][1]["CapGrant"][0]["CapMap"];
    assert!(caps.get("tailscale.com/cap/relay").is_some(), "{v}");
    assert!(v["PacketFilter"][2]["CapGrant"][0]["CapMap"]
        .get("tailscale.com/cap/relay-target")
        .is_some());
    assert_eq!(v["Debug"]["DisableLogTail"], true);
    assert!(v.get("TKAInfo").is_none());
}

#[test]
fn deltas_follow_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tailnet(dir.path());
    let a = add(&mut t, 1, "alpha");
    let mut state = StreamState::default();
    full_map(&t, a, &mut state).unwrap();
    let b = add(&mut t, 2, "beta");
    let added = delta(&t, a, &Event::Added(b), &mut state).unwrap();
    assert_eq!(added.peers_changed.len(), 1);
    assert!(
        added.packet_filter.is_none(),
        "a * grant does not change with new nodes"
    );
    let update = NodeUpdate {
        endpoints: Some(vec!["10.1.1.1:41641".into()]),
        hostinfo: Some(json!({"Hostname": "beta", "NetInfo": {"PreferredDERP": 900}})),
        ..NodeUpdate::default()
    };
    let changes = t.update_node(b, &update).unwrap();
    let patch = delta(&t, a, &Event::Changed(b, changes), &mut state).unwrap();
    let v = serde_json::to_value(&patch).unwrap();
    assert_eq!(
        v["PeersChangedPatch"],
        json!([{"NodeID": b, "DERPRegion": 900, "Endpoints": ["10.1.1.1:41641"]}])
    );
    let online = delta(&t, a, &Event::Online(b, true), &mut state).unwrap();
    assert_eq!(
        serde_json::to_value(&online).unwrap(),
        json!({"OnlineChange": {b.to_string(): true}})
    );
    assert!(
        delta(&t, a, &Event::Online(a, true), &mut state).is_none(),
        "own changes are not deltas"
    );
    let removed = delta(&t, a, &Event::Removed(b), &mut state).unwrap();
    assert_eq!(removed.peers_removed, vec![b as i64]);
}

/// A tailnet with `top` among the top-level keys and `tables` after the DERP region.
fn tailnet_with(dir: &std::path::Path, top: &str, tables: &str) -> Tailnet {
    let text = format!(
        "{top}\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[[auth_key]]\nkey = \"k\"\nreusable = true\n\
         [[derp_region]]\nid = 900\ncode = \"lab\"\n[[derp_region.node]]\nname = \"900a\"\nhost_name = \"10.0.0.1\"\n{tables}",
        dir.display()
    );
    Tailnet::open(Config::parse(&text).unwrap()).unwrap()
}

/// Node `id` advertises `routes` in a map request, as a Go client does.
fn advertise(t: &mut Tailnet, id: u64, host: &str, routes: &[&str]) -> NodeChanges {
    let update = NodeUpdate {
        hostinfo: Some(json!({"Hostname": host, "RoutableIPs": routes})),
        ..NodeUpdate::default()
    };
    t.update_node(id, &update).unwrap()
}

const ROUTER_ROUTES: [&str; 3] = ["10.2.9.0/24", "0.0.0.0/0", "::/0"];

#[test]
fn approved_routes_reach_peers_in_allowed_ips_and_primary_routes() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tailnet_with(dir.path(), "auto_approve_routes = true", "");
    let a = add(&mut t, 1, "alpha");
    let b = add(&mut t, 2, "router");
    let mut state = StreamState::default();
    full_map(&t, a, &mut state).unwrap();
    let changes = advertise(&mut t, b, "router", &ROUTER_ROUTES);
    assert!(changes.routes);
    let msg = delta(&t, a, &Event::Changed(b, changes), &mut state).unwrap();
    let v = serde_json::to_value(&msg).unwrap();
    let peer = &v["PeersChanged"][0];
    assert_eq!(
        peer["AllowedIPs"],
        json!([
            "100.64.0.2/32",
            "fd7a:115c:a1e0::2/128",
            "0.0.0.0/0",
            "10.2.9.0/24",
            "::/0"
        ])
    );
    assert_eq!(
        peer["PrimaryRoutes"],
        json!(["10.2.9.0/24"]),
        "exit routes are not primary"
    );
    assert!(
        msg.packet_filter.is_none(),
        "allow-all (*) already covers subnets"
    );
    let full = serde_json::to_value(full_map(&t, a, &mut StreamState::default()).unwrap()).unwrap();
    assert_eq!(full["Peers"][0]["AllowedIPs"], peer["AllowedIPs"]);
    assert_eq!(full["PacketFilter"][0]["DstPorts"][0]["IP"], "*");
    // The router itself learns the routes it serves.
    let own = delta(
        &t,
        b,
        &Event::Changed(b, changes),
        &mut StreamState::default(),
    )
    .unwrap();
    let own = own.node.expect("self node after a route change");
    assert_eq!(
        own.primary_routes,
        vec!["10.2.9.0/24".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn unapproved_routes_stay_out_of_allowed_ips() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tailnet_with(dir.path(), "", "");
    let a = add(&mut t, 1, "alpha");
    let b = add(&mut t, 2, "router");
    let mut state = StreamState::default();
    full_map(&t, a, &mut state).unwrap();
    let changes = advertise(&mut t, b, "router", &ROUTER_ROUTES);
    assert!(!changes.routes);
    let msg = delta(&t, a, &Event::Changed(b, changes), &mut state).unwrap();
    let v = serde_json::to_value(&msg).unwrap();
    let peer = &v["PeersChanged"][0];
    assert_eq!(
        peer["AllowedIPs"],
        json!(["100.64.0.2/32", "fd7a:115c:a1e0::2/128"])
    );
    assert!(peer.get("PrimaryRoutes").is_none(), "{peer}");
    assert_eq!(
        peer["Hostinfo"]["RoutableIPs"],
        json!(["10.2.9.0/24", "0.0.0.0/0", "::/0"]),
        "the advertisement itself is visible"
    );
}

#[test]
fn listed_routes_are_approved_and_explicit_subnet_filters_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let tables = "[[approved_routes]]\nnode = \"router\"\nroutes = [\"10.2.9.0/24\"]\n\
               [[filter]]\nsrc = [\"*\"]\ndst = [\"10.2.9.0/24:80\"]\n";
    let mut t = tailnet_with(dir.path(), "", tables);
    let a = add(&mut t, 1, "alpha");
    let b = add(&mut t, 2, "router");
    advertise(&mut t, b, "router", &ROUTER_ROUTES);
    let v = serde_json::to_value(full_map(&t, a, &mut StreamState::default()).unwrap()).unwrap();
    assert_eq!(
        v["Peers"][0]["AllowedIPs"],
        json!(["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.2.9.0/24"]),
        "exit routes are not listed for router"
    );
    assert_eq!(
        v["PacketFilter"][0]["DstPorts"],
        json!([{"IP": "10.2.9.0/24", "Ports": {"First": 80, "Last": 80}}])
    );
}

#[test]
fn dns_section_becomes_go_dns_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tailnet_with(
        dir.path(),
        "",
        "[dns]\nnameservers = [\"198.18.0.20\"]\nsearch_domains = [\"corp.lab\"]\n\
         [[dns.route]]\nsuffix = \"example.lab\"\nresolvers = [\"198.18.0.21\"]\n",
    );
    let a = add(&mut t, 1, "alpha");
    let v = serde_json::to_value(full_map(&t, a, &mut StreamState::default()).unwrap()).unwrap();
    let dns = &v["DNSConfig"];
    assert_eq!(dns["Proxied"], true, "MagicDNS is on by default: {dns}");
    assert_eq!(dns["Domains"], json!(["lab.tern.test", "corp.lab"]));
    assert_eq!(dns["Resolvers"], json!([{"Addr": "198.18.0.20"}]));
    assert_eq!(
        dns["Routes"],
        json!({"example.lab.": [{"Addr": "198.18.0.21"}]})
    );

    let dir = tempfile::tempdir().unwrap();
    let mut off = tailnet_with(dir.path(), "", "[dns]\nmagic_dns = false\n");
    let b = add(&mut off, 2, "beta");
    let v = serde_json::to_value(full_map(&off, b, &mut StreamState::default()).unwrap()).unwrap();
    assert!(
        v["DNSConfig"].get("Proxied").is_none(),
        "{}",
        v["DNSConfig"]
    );
    assert!(v["DNSConfig"].get("Domains").is_none());
}

#[test]
fn bad_dns_sections_are_refused_with_the_fix() {
    let base = "listen = \"127.0.0.1:0\"\nstate_dir = \"/tmp/x\"\n";
    let err = Config::parse(&format!("{base}[dns]\nsearch_domains = [\"no spaces\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a domain"), "{err}");
    let err = Config::parse(&format!(
        "{base}[[dns.route]]\nsuffix = \"example.lab\"\nresolvers = []\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("no resolvers"), "{err}");
}
