use super::login::LoginRequest;
use super::*;
use serde_json::json;

fn config(dir: &std::path::Path, extra: &str) -> Config {
    let text = format!(
        r#"
listen = "127.0.0.1:8080"
state_dir = "{}"
[[auth_key]]
key = "reusable"
reusable = true
[[auth_key]]
key = "oneshot"
[[auth_key]]
key = "eph"
reusable = true
ephemeral = true
[[derp_region]]
id = 900
code = "lab"
[[derp_region.node]]
name = "900a"
host_name = "10.0.0.1"
{extra}
"#,
        dir.display()
    );
    Config::parse(&text).unwrap()
}

fn mkey(n: u8) -> String {
    format!("mkey:{}", format!("{n:02x}").repeat(32))
}

fn nodekey(n: u8) -> String {
    format!("nodekey:{}", format!("{n:02x}").repeat(32))
}

fn req(machine: u8, node: u8, auth: Option<&str>, hostname: &str) -> RegisterInput {
    RegisterInput {
        machine_key: mkey(machine),
        node_key: nodekey(node),
        auth_key: auth.map(str::to_string),
        hostinfo: json!({"Hostname": hostname, "OS": "linux"}),
        version: 130,
        ..RegisterInput::default()
    }
}

fn accepted(outcome: RegisterOutcome) -> (u64, bool) {
    match outcome {
        RegisterOutcome::Accepted { node_id, created } => (node_id, created),
        other => panic!("expected Accepted, got {other:?}"),
    }
}

#[test]
fn registration_assigns_addresses_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, created) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "Web Server"), 10)
            .unwrap(),
    );
    assert!(created);
    let (b, _) = accepted(
        tailnet
            .register(&req(2, 2, Some("reusable"), "web-server"), 10)
            .unwrap(),
    );
    let (na, nb) = (tailnet.node(a).unwrap(), tailnet.node(b).unwrap());
    assert_eq!(na.ipv4.to_string(), "100.64.0.1");
    assert_eq!(na.ipv6.to_string(), "fd7a:115c:a1e0::1");
    assert_eq!(nb.ipv4.to_string(), "100.64.0.2");
    assert_eq!(na.name, "web-server");
    assert_eq!(nb.name, "web-server-2");
    assert_ne!(na.stable_id, nb.stable_id);
}

#[test]
fn bad_and_missing_auth_keys_are_rejected_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    assert_eq!(
        tailnet.register(&req(1, 1, Some("nope"), "a"), 0).unwrap(),
        RegisterOutcome::Rejected("invalid authkey".into())
    );
    assert!(matches!(
        tailnet.register(&req(1, 1, None, "a"), 0).unwrap(),
        RegisterOutcome::Rejected(_)
    ));
    assert!(tailnet.nodes().is_empty());
}

#[test]
fn one_shot_key_is_idempotent_for_its_machine_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("oneshot"), "a"), 0)
            .unwrap(),
    );
    // The same node restarts and re-sends the used key.
    assert_eq!(
        accepted(
            tailnet
                .register(&req(1, 1, Some("oneshot"), "a"), 0)
                .unwrap()
        ),
        (a, false)
    );
    // Same machine, fresh node key (state lost): same node and addresses.
    assert_eq!(
        accepted(
            tailnet
                .register(&req(1, 9, Some("oneshot"), "a"), 0)
                .unwrap()
        ),
        (a, false)
    );
    assert_eq!(tailnet.node(a).unwrap().node_key, nodekey(9));
    assert_eq!(
        tailnet
            .register(&req(2, 2, Some("oneshot"), "b"), 0)
            .unwrap(),
        RegisterOutcome::Rejected("authkey already used".into())
    );
}

#[test]
fn node_key_of_another_machine_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "a"), 0)
            .unwrap(),
    );
    assert_eq!(
        tailnet
            .register(&req(2, 1, Some("reusable"), "a"), 0)
            .unwrap(),
        RegisterOutcome::MachineMismatch
    );
    assert!(matches!(
        tailnet.authorize_map(&nodekey(1), &mkey(2)),
        Err(ControlError::MachineMismatch)
    ));
    assert!(matches!(
        tailnet.authorize_map(&nodekey(7), &mkey(1)),
        Err(ControlError::UnknownNode)
    ));
    assert!(tailnet.authorize_map(&nodekey(1), &mkey(1)).is_ok());
}

#[test]
fn key_rotation_moves_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "a"), 0)
            .unwrap(),
    );
    let mut rotate = req(1, 2, None, "a");
    rotate.old_node_key = Some(nodekey(1));
    assert_eq!(accepted(tailnet.register(&rotate, 0).unwrap()), (a, false));
    assert!(tailnet.authorize_map(&nodekey(2), &mkey(1)).is_ok());
    assert!(tailnet.authorize_map(&nodekey(1), &mkey(1)).is_err());
}

#[test]
fn logout_expires_or_deletes_ephemeral_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "a"), 0)
            .unwrap(),
    );
    let (b, _) = accepted(tailnet.register(&req(2, 2, Some("eph"), "b"), 0).unwrap());
    assert!(tailnet.node(b).unwrap().ephemeral);
    let mut logout = req(1, 1, None, "a");
    logout.logout = true;
    assert_eq!(
        tailnet.register(&logout, 0).unwrap(),
        RegisterOutcome::LoggedOut {
            node_id: Some(a),
            deleted: false
        }
    );
    assert!(tailnet.authorize_map(&nodekey(1), &mkey(1)).is_err());
    let mut logout = req(2, 2, None, "b");
    logout.logout = true;
    assert_eq!(
        tailnet.register(&logout, 0).unwrap(),
        RegisterOutcome::LoggedOut {
            node_id: Some(b),
            deleted: true
        }
    );
    assert!(tailnet.node(b).is_none());
    // Logging back in with a key keeps the address.
    let ip = tailnet.node(a).unwrap().ipv4;
    let (again, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "a"), 0)
            .unwrap(),
    );
    assert_eq!((again, tailnet.node(a).unwrap().ipv4), (a, ip));
}

#[test]
fn map_updates_report_changes_and_keep_netinfo() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "a"), 0)
            .unwrap(),
    );
    let update = NodeUpdate {
        disco_key: Some("discokey:ab".into()),
        hostinfo: Some(json!({"Hostname": "a", "OS": "linux", "NetInfo": {"PreferredDERP": 900}})),
        endpoints: Some(vec![
            "10.0.0.2:41641".into(),
            "[fe80::1]:41641".into(),
            "junk".into(),
        ]),
        version: 130,
    };
    let changes = tailnet.update_node(a, &update).unwrap();
    assert!(changes.disco_key && changes.home_derp && changes.endpoints);
    assert!(
        !changes.hostinfo,
        "hostinfo apart from NetInfo is what registration stored"
    );
    assert!(!changes.cap_version);
    let node = tailnet.node(a).unwrap();
    assert_eq!(node.endpoints, vec!["10.0.0.2:41641".to_string()]);
    assert_eq!(node.home_derp, 900);
    assert_eq!(
        tailnet.update_node(a, &update).unwrap(),
        NodeChanges::default()
    );
    // Hostinfo without NetInfo keeps the old one and the home DERP.
    let changes = tailnet
        .update_node(
            a,
            &NodeUpdate {
                hostinfo: Some(json!({"Hostname": "a", "OS": "linux"})),
                ..NodeUpdate::default()
            },
        )
        .unwrap();
    assert!(!changes.any(), "{changes:?}");
    assert_eq!(
        tailnet.node(a).unwrap().hostinfo["NetInfo"]["PreferredDERP"],
        900
    );
}

#[test]
fn netinfo_nat_facts_reach_peers_but_latencies_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "a"), 0)
            .unwrap(),
    );
    let with_netinfo = |netinfo: serde_json::Value| NodeUpdate {
        hostinfo: Some(json!({"Hostname": "a", "OS": "linux", "NetInfo": netinfo})),
        ..NodeUpdate::default()
    };
    let hard = with_netinfo(json!({
        "MappingVariesByDestIP": true,
        "PreferredDERP": 900,
        "DERPLatency": {"900-v4": 0.001}
    }));
    let changes = tailnet.update_node(a, &hard).unwrap();
    assert!(
        changes.hostinfo,
        "a hard NAT is news for peers: {changes:?}"
    );
    let slower = with_netinfo(json!({
        "MappingVariesByDestIP": true,
        "PreferredDERP": 900,
        "DERPLatency": {"900-v4": 0.002}
    }));
    let changes = tailnet.update_node(a, &slower).unwrap();
    assert!(!changes.any(), "latencies alone are not: {changes:?}");
    assert_eq!(
        tailnet.node(a).unwrap().hostinfo["NetInfo"]["DERPLatency"]["900-v4"],
        0.002
    );
}

#[test]
fn restart_keeps_nodes_and_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ip) = {
        let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
        accepted(
            tailnet
                .register(&req(1, 1, Some("reusable"), "x"), 0)
                .unwrap(),
        );
        let (a, _) = accepted(
            tailnet
                .register(&req(2, 2, Some("oneshot"), "y"), 0)
                .unwrap(),
        );
        (a, tailnet.node(a).unwrap().ipv4)
    };
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    assert_eq!(tailnet.nodes().len(), 2);
    assert_eq!(
        accepted(
            tailnet
                .register(&req(2, 2, Some("oneshot"), "y"), 0)
                .unwrap()
        ),
        (a, false)
    );
    assert_eq!(tailnet.node(a).unwrap().ipv4, ip);
    // The one-shot key stays used after the restart.
    assert!(matches!(
        tailnet
            .register(&req(3, 3, Some("oneshot"), "z"), 0)
            .unwrap(),
        RegisterOutcome::Rejected(_)
    ));
    let (c, _) = accepted(
        tailnet
            .register(&req(3, 3, Some("reusable"), "z"), 0)
            .unwrap(),
    );
    assert_eq!(c, 3, "IDs are never reused");
}

#[test]
fn default_filter_allows_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "a"), 0)
            .unwrap(),
    );
    let rules = tailnet.packet_filter(a);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].src_ips, vec!["*"]);
    assert_eq!(
        rules[0].dst_ports,
        vec![DstPortRange {
            ip: "*".into(),
            first: 0,
            last: 65535
        }]
    );
}

#[test]
fn relay_grant_gives_relay_to_destination_and_relay_target_to_sources() {
    let dir = tempfile::tempdir().unwrap();
    let grant =
        "[[grant]]\nsrc = [\"client\"]\ndst = [\"relay\"]\ncaps = [\"tailscale.com/cap/relay\"]\n\
                 [[filter]]\nsrc = [\"*\"]\ndst = [\"*:22\"]\n";
    let mut tailnet = Tailnet::open(config(dir.path(), grant)).unwrap();
    let (client, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "client"), 0)
            .unwrap(),
    );
    let (relay, _) = accepted(
        tailnet
            .register(&req(2, 2, Some("reusable"), "relay"), 0)
            .unwrap(),
    );
    let relay_rules = tailnet.packet_filter(relay);
    assert_eq!(relay_rules[0].dst_ports[0].first, 22);
    assert_eq!(relay_rules.len(), 2);
    assert_eq!(
        relay_rules[1].src_ips,
        vec!["100.64.0.1", "fd7a:115c:a1e0::1"]
    );
    assert_eq!(
        relay_rules[1].cap_grants[0].dsts,
        vec!["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    );
    assert_eq!(relay_rules[1].cap_grants[0].caps, vec![CAP_RELAY]);
    let client_rules = tailnet.packet_filter(client);
    assert_eq!(client_rules.len(), 2);
    assert_eq!(
        client_rules[1].src_ips,
        vec!["100.64.0.2", "fd7a:115c:a1e0::2"]
    );
    assert_eq!(
        client_rules[1].cap_grants[0].dsts,
        vec!["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
    );
    assert_eq!(client_rules[1].cap_grants[0].caps, vec![CAP_RELAY_TARGET]);
}

#[test]
fn dns_labels_are_sanitised() {
    assert_eq!(dns_label("My_Host.local"), "my-host-local");
    assert_eq!(dns_label("--"), "node");
    assert_eq!(dns_label(&"a".repeat(80)).len(), 63);
}

fn login_id(outcome: RegisterOutcome) -> String {
    match outcome {
        RegisterOutcome::NeedsLogin { login_id } => login_id,
        other => panic!("expected NeedsLogin, got {other:?}"),
    }
}

#[test]
fn interactive_login_waits_for_approval_of_its_own_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut off = Tailnet::open(config(dir.path(), "")).unwrap();
    assert!(matches!(
        off.register(&req(1, 1, None, "a"), 1).unwrap(),
        RegisterOutcome::Rejected(m) if m.contains("pre-auth key")
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "");
    cfg.interactive_login = true;
    let mut t = Tailnet::open(cfg).unwrap();
    let id = login_id(t.register(&req(1, 1, None, "a"), 1).unwrap());
    assert_eq!(id.len(), 32, "128 random bits as hex");
    assert_ne!(id, login_id(t.register(&req(2, 2, None, "b"), 1).unwrap()));
    let follow = |m: u8, n: u8, id: &str| RegisterInput {
        followup: Some(format!("http://127.0.0.1:8080/register/{id}")),
        ..req(m, n, None, "a")
    };
    // Not approved yet: still waiting, on the same ID.
    assert_eq!(login_id(t.register(&follow(1, 1, &id), 2).unwrap()), id);
    // Another machine cannot ride on this login.
    assert_eq!(
        t.register(&follow(3, 3, &id), 2).unwrap(),
        RegisterOutcome::MachineMismatch
    );
    assert_eq!(
        t.login_request(&id),
        Some(LoginRequest {
            hostname: "a".into(),
            approved: false
        })
    );
    assert!(t.approve_login("no-such-login").is_none());
    assert!(t.approve_login(&id).is_some());
    let (node_id, created) = accepted(t.register(&follow(1, 1, &id), 3).unwrap());
    assert!(created);
    assert_eq!(t.nodes()[0].id, node_id);
    // The login is used up.
    assert!(matches!(
        t.register(&follow(1, 9, &id), 4).unwrap(),
        RegisterOutcome::Rejected(m) if m.contains("unknown or expired")
    ));
}

fn with_routes(tailnet: &mut Tailnet, id: u64, hostname: &str, routes: &[&str]) -> NodeChanges {
    let update = NodeUpdate {
        hostinfo: Some(json!({"Hostname": hostname, "OS": "linux", "RoutableIPs": routes})),
        ..NodeUpdate::default()
    };
    tailnet.update_node(id, &update).unwrap()
}

fn strs(routes: &[ipnet::IpNet]) -> Vec<String> {
    routes.iter().map(ToString::to_string).collect()
}

#[test]
fn advertised_routes_need_approval() {
    let dir = tempfile::tempdir().unwrap();
    let mut tailnet = Tailnet::open(config(dir.path(), "")).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "c2"), 10)
            .unwrap(),
    );
    let changes = with_routes(&mut tailnet, a, "c2", &["10.2.9.0/24"]);
    assert!(changes.hostinfo && !changes.routes, "{changes:?}");
    assert!(tailnet.approved_routes(tailnet.node(a).unwrap()).is_empty());
}

#[test]
fn listed_routes_are_approved_for_their_node_only() {
    let dir = tempfile::tempdir().unwrap();
    let extra =
        "[[approved_routes]]\nnode = \"c2\"\nroutes = [\"10.2.9.0/24\", \"0.0.0.0/0\", \"::/0\"]\n";
    let mut tailnet = Tailnet::open(config(dir.path(), extra)).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "c2"), 10)
            .unwrap(),
    );
    let (b, _) = accepted(
        tailnet
            .register(&req(2, 2, Some("reusable"), "c3"), 10)
            .unwrap(),
    );
    // Advertised but not listed (10.3.9.0/24), listed but not advertised (exit routes).
    let changes = with_routes(&mut tailnet, a, "c2", &["10.2.9.0/24", "10.3.9.0/24"]);
    assert!(changes.routes);
    assert_eq!(
        strs(&tailnet.approved_routes(tailnet.node(a).unwrap())),
        ["10.2.9.0/24"]
    );
    with_routes(&mut tailnet, b, "c3", &["10.2.9.0/24"]);
    assert!(tailnet.approved_routes(tailnet.node(b).unwrap()).is_empty());
    // The same routes again change nothing.
    assert!(!with_routes(&mut tailnet, a, "c2", &["10.2.9.0/24", "10.3.9.0/24"]).any());
}

#[test]
fn exit_routes_are_approved_as_a_pair() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), "");
    config.auto_approve_routes = true;
    let mut tailnet = Tailnet::open(config).unwrap();
    let (a, _) = accepted(
        tailnet
            .register(&req(1, 1, Some("reusable"), "c2"), 10)
            .unwrap(),
    );
    with_routes(&mut tailnet, a, "c2", &["0.0.0.0/0"]);
    assert!(tailnet.approved_routes(tailnet.node(a).unwrap()).is_empty());
    with_routes(&mut tailnet, a, "c2", &["::/0", "10.2.9.0/24", "0.0.0.0/0"]);
    let approved = tailnet.approved_routes(tailnet.node(a).unwrap());
    assert_eq!(strs(&approved), ["0.0.0.0/0", "10.2.9.0/24", "::/0"]);
    assert_eq!(
        strs(&super::routes::primary_routes(&approved)),
        ["10.2.9.0/24"]
    );
}

#[test]
fn unusable_advertised_routes_are_ignored() {
    let hostinfo = json!({"RoutableIPs": [
        "10.2.9.1/24", "100.64.0.0/24", "fd7a:115c:a1e0::/64", "junk", 7, "10.2.9.0/24", "10.2.9.0/24"
    ]});
    assert_eq!(
        strs(&super::routes::advertised_routes(&hostinfo)),
        ["10.2.9.0/24"]
    );
    assert!(super::routes::advertised_routes(&json!({})).is_empty());
}
