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
    assert_eq!(node["AllowedIPs"], Value::Null);
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

use serde_json::Value;

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
