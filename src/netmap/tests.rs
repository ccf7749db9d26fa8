use super::*;
use crate::control::tailcfg::{DerpHomeParams, DerpRegion, PortRange};
use crate::keys::DiscoPublic;
use proptest::prelude::*;

fn now() -> GoTime {
    GoTime::from_unix(1_700_000_000)
}

fn key(id: NodeId, version: u32) -> NodePublic {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&id.to_be_bytes());
    b[8..12].copy_from_slice(&version.to_be_bytes());
    b[31] = 1;
    NodePublic::from_bytes(b)
}

fn node(id: NodeId, version: u32) -> Node {
    Node {
        id,
        stable_id: format!("n{id}"),
        name: format!("node{id}.tailnet.example."),
        user: 1,
        key: key(id, version),
        addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
        home_derp: 900,
        ..Node::default()
    }
}

fn parse(json: &str) -> MapResponse {
    serde_json::from_str(json).unwrap()
}

fn full_map() -> MapResponse {
    MapResponse {
        node: Some(node(1, 0)),
        peers: vec![node(2, 0), node(3, 0), node(4, 0)],
        derp_map: Some(parse(r#"{"DERPMap":{"Regions":{"900":{"RegionID":900,"Nodes":[]}},"omitDefaultRegions":true}}"#).derp_map.unwrap()),
        packet_filter: Some(vec![FilterRule::allow_all()]),
        domain: "tailnet.example".into(),
        ..MapResponse::default()
    }
}

fn started() -> NetworkMap {
    let mut nm = NetworkMap::new();
    let s = nm.apply_at(&full_map(), now());
    assert!(s.self_changed && s.peers_changed && s.derp_changed && s.filter_changed);
    nm
}

#[test]
fn full_map_then_removal_upsert_and_patch() {
    let mut nm = started();
    assert_eq!(nm.peers.len(), 3);
    assert_eq!(nm.self_node.as_ref().unwrap().id, 1);
    assert_eq!(nm.packet_filter(), vec![FilterRule::allow_all()]);

    nm.apply_at(&parse(r#"{"PeersRemoved":[3,99]}"#), now());
    assert!(nm.peer(3).is_none());
    assert!(nm.peer_by_key(&key(3, 0)).is_none());

    let mut changed = node(5, 0);
    changed.hostinfo.hostname = "five".into();
    nm.apply_at(
        &MapResponse {
            peers_changed: vec![changed],
            ..MapResponse::default()
        },
        now(),
    );
    assert_eq!(nm.peer(5).unwrap().hostinfo.hostname, "five");
    assert_eq!(nm.peer_by_key(&key(5, 0)).unwrap().id, 5);

    let disco = DiscoPublic::from_bytes([7; 32]);
    nm.apply_at(
        &MapResponse {
            peers_changed_patch: vec![
                PeerChange {
                    node_id: 2,
                    derp_region: 901,
                    endpoints: Some(vec!["1.2.3.4:41641".parse().unwrap()]),
                    key: Some(key(2, 1)),
                    disco_key: Some(disco),
                    online: Some(true),
                    cap: 130,
                    ..PeerChange::default()
                },
                PeerChange {
                    node_id: 77,
                    derp_region: 5,
                    ..PeerChange::default()
                },
            ],
            ..MapResponse::default()
        },
        now(),
    );
    let p = nm.peer(2).unwrap();
    assert_eq!(p.home_derp, 901);
    assert_eq!(p.endpoints.len(), 1);
    assert_eq!(p.disco_key, disco);
    assert_eq!(p.online, Some(true));
    assert_eq!(p.cap, 130);
    assert!(nm.peer(77).is_none(), "patch for unknown peer is ignored");
    assert!(nm.peer_by_key(&key(2, 0)).is_none());
    assert_eq!(nm.peer_by_key(&key(2, 1)).unwrap().id, 2);

    // Zero/absent patch fields change nothing.
    nm.apply_at(
        &MapResponse {
            peers_changed_patch: vec![PeerChange {
                node_id: 2,
                ..PeerChange::default()
            }],
            ..MapResponse::default()
        },
        now(),
    );
    assert_eq!(nm.peer(2).unwrap().home_derp, 901);
    assert_eq!(nm.peer(2).unwrap().endpoints.len(), 1);
}

#[test]
fn online_and_seen_changes() {
    let mut nm = started();
    nm.apply_at(
        &parse(r#"{"OnlineChange":{"2":true,"4":false,"99":true}}"#),
        now(),
    );
    assert_eq!(nm.peer(2).unwrap().online, Some(true));
    assert_eq!(nm.peer(4).unwrap().online, Some(false));
    assert!(nm.peer(99).is_none());
    nm.apply_at(&parse(r#"{"PeerSeenChange":{"2":true}}"#), now());
    assert_eq!(nm.peer(2).unwrap().last_seen, Some(now()));
    nm.apply_at(&parse(r#"{"PeerSeenChange":{"2":false}}"#), now());
    assert_eq!(nm.peer(2).unwrap().last_seen, None);
}

#[test]
fn full_peer_list_replaces_and_precludes_other_deltas() {
    let mut nm = started();
    let mut resp = MapResponse {
        peers: vec![node(3, 0), node(8, 0)],
        peers_removed: vec![3],
        peers_changed: vec![node(9, 0)],
        ..MapResponse::default()
    };
    resp.online_change.insert(8, true);
    nm.apply_at(&resp, now());
    assert_eq!(nm.peers.keys().copied().collect::<Vec<_>>(), [3, 8]);
    assert_eq!(nm.peer(8).unwrap().online, None);
    assert!(nm.peer_by_key(&key(2, 0)).is_none());
    // `Peers: []` is not a full list: nothing is cleared.
    nm.apply_at(&parse(r#"{"Peers":[]}"#), now());
    assert_eq!(nm.peers.len(), 2);
}

#[test]
fn packet_filter_absent_empty_and_named() {
    let mut nm = started();
    nm.apply_at(&parse(r#"{"Domain":""}"#), now());
    assert_eq!(nm.packet_filter().len(), 1, "absent filter is unchanged");
    assert_eq!(nm.domain, "tailnet.example", "empty domain is unchanged");
    let s = nm.apply_at(&parse(r#"{"PacketFilter":[]}"#), now());
    assert!(s.filter_changed);
    assert!(nm.packet_filter().is_empty(), "[] denies all inbound");

    let rule = |ip: &str| FilterRule {
        src_ips: vec![ip.into()],
        dst_ports: vec![crate::control::tailcfg::NetPortRange {
            ip: "*".into(),
            bits: None,
            ports: PortRange::ANY,
        }],
        ..FilterRule::default()
    };
    let mut named = BTreeMap::new();
    named.insert("zz".to_owned(), Some(vec![rule("100.64.0.9")]));
    named.insert("aa".to_owned(), Some(vec![rule("100.64.0.8")]));
    nm.apply_at(
        &MapResponse {
            packet_filters: Some(named),
            ..MapResponse::default()
        },
        now(),
    );
    let srcs: Vec<_> = nm
        .packet_filter()
        .into_iter()
        .map(|r| r.src_ips[0].clone())
        .collect();
    assert_eq!(
        srcs,
        ["100.64.0.8", "100.64.0.9"],
        "aa, then base ([]), then zz"
    );
    assert_eq!(nm.named_packet_filters.len(), 3);

    nm.apply_at(&parse(r#"{"PacketFilters":{"aa":null}}"#), now());
    assert!(!nm.named_packet_filters.contains_key("aa"));
    nm.apply_at(
        &parse(r#"{"PacketFilters":{"*":null,"new":[{"SrcIPs":["*"]}]}}"#),
        now(),
    );
    assert_eq!(nm.named_packet_filters.keys().collect::<Vec<_>>(), ["new"]);
}

#[test]
fn derp_map_merging() {
    let mut nm = started();
    // Absent Regions keeps regions and omitDefaultRegions; HomeParams is taken.
    nm.apply_at(
        &parse(r#"{"DERPMap":{"HomeParams":{"RegionScore":{"900":2.0}}}}"#),
        now(),
    );
    let dm = nm.derp_map.clone().unwrap();
    assert_eq!(dm.regions.as_ref().unwrap().len(), 1);
    assert!(dm.omit_default_regions);
    assert_eq!(
        dm.home_params
            .as_ref()
            .unwrap()
            .region_score
            .as_ref()
            .unwrap()[&900],
        2.0
    );
    // HomeParams {} keeps the scores; new regions replace; null regions are dropped.
    nm.apply_at(
        &parse(r#"{"DERPMap":{"HomeParams":{},"Regions":{"901":{"RegionID":901},"902":null}}}"#),
        now(),
    );
    let dm = nm.derp_map.clone().unwrap();
    assert_eq!(
        dm.regions.as_ref().unwrap().keys().collect::<Vec<_>>(),
        [&901]
    );
    assert!(!dm.omit_default_regions);
    assert_eq!(
        dm.home_params
            .as_ref()
            .unwrap()
            .region_score
            .as_ref()
            .unwrap()[&900],
        2.0
    );
    // RegionScore {} clears; Regions {} clears.
    nm.apply_at(
        &parse(r#"{"DERPMap":{"HomeParams":{"RegionScore":{}},"Regions":{}}}"#),
        now(),
    );
    let dm = nm.derp_map.clone().unwrap();
    assert!(dm.regions.as_ref().unwrap().is_empty());
    assert!(dm.home_params.unwrap().region_score.unwrap().is_empty());
}

#[test]
fn keep_alive_only_updates_control_time() {
    let mut nm = started();
    let before = nm.clone();
    let resp = parse(
        r#"{"KeepAlive":true,"PeersRemoved":[2],"Domain":"x","ControlTime":"2025-01-01T00:00:00Z"}"#,
    );
    let s = nm.apply_at(&resp, now());
    assert!(s.keep_alive && !s.peers_changed);
    assert_eq!(nm.peers, before.peers);
    assert_eq!(nm.domain, before.domain);
    assert_eq!(nm.control_time.unwrap().to_string(), "2025-01-01T00:00:00Z");
}

#[test]
fn misc_fields() {
    let mut nm = started();
    nm.apply_at(
        &parse(
            r#"{"CollectServices":true,"Health":["a"],"DNSConfig":{"Domains":["t.example"]},
                "UserProfiles":[{"ID":1,"LoginName":"a@x","DisplayName":"A"}],
                "DisplayMessages":{"m1":{"Title":"t","Text":"x","Severity":"low"},"m2":{"Title":"u","Text":"y","Severity":"high"}}}"#,
        ),
        now(),
    );
    assert!(nm.collect_services);
    assert_eq!(nm.health, ["a"]);
    assert_eq!(nm.dns_config.as_ref().unwrap().domains, ["t.example"]);
    assert_eq!(nm.display_messages.len(), 2);
    nm.apply_at(
        &parse(r#"{"CollectServices":null,"UserProfiles":[{"ID":2,"LoginName":"b@x","DisplayName":"B"}],"DisplayMessages":{"m1":null}}"#),
        now(),
    );
    assert!(nm.collect_services, "null CollectServices is unchanged");
    assert_eq!(nm.health, ["a"], "absent Health is unchanged");
    assert_eq!(nm.user_profiles.len(), 2, "profiles are upsert-only");
    assert_eq!(nm.display_messages.keys().collect::<Vec<_>>(), ["m2"]);
    nm.apply_at(
        &parse(r#"{"Health":[],"DisplayMessages":{"*":null},"CollectServices":false}"#),
        now(),
    );
    assert!(nm.health.is_empty());
    assert!(nm.display_messages.is_empty());
    assert!(!nm.collect_services);
}

#[test]
fn nodes_are_upgraded_like_go() {
    let mut nm = NetworkMap::new();
    nm.apply_at(
        &parse(
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32"],"Capabilities":["old-cap"],"CapMap":{"new-cap":["x"]}},
                "Peers":[{"ID":2,"DERP":"127.3.3.40:12","Addresses":["100.64.0.2/32"],"AllowedIPs":null},
                         {"ID":3,"DERP":"127.3.3.40:12","HomeDERP":1,"Addresses":["100.64.0.3/32"],"AllowedIPs":[]}]}"#,
        ),
        now(),
    );
    let p2 = nm.peer(2).unwrap();
    assert_eq!(p2.home_derp, 12);
    assert!(p2.legacy_derp.is_empty());
    assert_eq!(p2.allowed_ips.as_deref(), Some(&p2.addresses[..]));
    let p3 = nm.peer(3).unwrap();
    assert_eq!(p3.home_derp, 1);
    assert_eq!(
        p3.allowed_ips,
        Some(vec![]),
        "[] routes nothing and stays []"
    );
    let me = nm.self_node.as_ref().unwrap();
    assert_eq!(me.cap_map.get("old-cap"), Some(&None));
    assert!(me.cap_map.contains_key("new-cap"));
}

#[test]
fn fixture_map_response_applies() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/control_json/map_response.json"
    );
    let resp: MapResponse = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut nm = NetworkMap::new();
    let s = nm.apply_at(&resp, now());
    assert!(s.self_changed && s.peers_changed && s.derp_changed && s.dns_changed);
    assert_eq!(nm.peers.len(), resp.peers_changed.len());
    for p in &resp.peers_changed {
        assert_eq!(nm.peer_by_key(&p.key).unwrap().id, p.id);
    }
    assert_eq!(nm.domain, resp.domain);
    assert_eq!(
        nm.derp_map
            .as_ref()
            .unwrap()
            .regions
            .as_ref()
            .unwrap()
            .len(),
        28
    );
}

// ---------------------------------------------------------------------------------------------
// Property: a session of deltas ends in the same map as one full map of the final state.

/// Control's view of the tailnet, which produces both deltas and full maps.
#[derive(Debug, Clone, Default)]
struct ServerState {
    peers: BTreeMap<NodeId, Node>,
    regions: Option<BTreeMap<i32, Option<DerpRegion>>>,
    scores: Option<BTreeMap<i32, f64>>,
    filter: Option<Vec<FilterRule>>,
    dns: Option<DnsConfig>,
    domain: String,
    profiles: BTreeMap<UserId, UserProfile>,
    versions: u32,
}

impl ServerState {
    fn full_map(&self) -> MapResponse {
        let derp_map = (self.regions.is_some() || self.scores.is_some()).then(|| DerpMap {
            regions: self.regions.clone(),
            home_params: self.scores.clone().map(|s| DerpHomeParams {
                region_score: Some(s),
            }),
            omit_default_regions: false,
        });
        MapResponse {
            node: Some(node(1, 0)),
            peers: self.peers.values().cloned().collect(),
            derp_map,
            packet_filter: self.filter.clone(),
            dns_config: self.dns.clone(),
            domain: self.domain.clone(),
            user_profiles: self.profiles.values().cloned().collect(),
            ..MapResponse::default()
        }
    }

    fn fresh_node(&mut self, id: NodeId, flavour: u8) -> Node {
        self.versions += 1;
        let mut n = node(id, self.versions);
        n.hostinfo.hostname = format!("h{flavour}");
        if flavour & 1 == 0 {
            n.allowed_ips = Some(vec![]);
        }
        if matches!(flavour % 3, 0) {
            n.legacy_derp = "127.3.3.40:7".into();
            n.home_derp = 0;
        }
        n.online = (flavour & 3 == 0).then_some(flavour & 7 == 0);
        n
    }

    /// Server-side reference for the delta kinds: mutate the state, return the message.
    fn step(&mut self, op: &Op) -> MapResponse {
        let mut r = MapResponse::default();
        match *op {
            Op::Upsert(id, flavour) => {
                let n = self.fresh_node(id, flavour);
                self.peers.insert(id, n.clone());
                r.peers_changed = vec![n];
            }
            Op::Remove(id) => {
                self.peers.remove(&id);
                r.peers_removed = vec![id];
            }
            Op::Online(id, on) => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.online = Some(on);
                }
                r.online_change.insert(id, on);
            }
            Op::Seen(id, seen) => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.last_seen = seen.then_some(now());
                }
                r.peer_seen_change.insert(id, seen);
            }
            Op::Patch(id, field, v) => {
                self.versions += 1;
                let pc = patch(id, field, v, self.versions);
                if let Some(p) = self.peers.get_mut(&id) {
                    apply_patch_by_hand(p, field, &pc);
                }
                r.peers_changed_patch = vec![pc];
            }
            Op::Regions(n) => {
                let regions: BTreeMap<_, _> = (0..n)
                    .map(|i| {
                        let id = 900 + i as i32;
                        (
                            id,
                            Some(DerpRegion {
                                region_id: id,
                                ..DerpRegion::default()
                            }),
                        )
                    })
                    .collect();
                self.regions = Some(regions.clone());
                r.derp_map = Some(DerpMap {
                    regions: Some(regions),
                    ..DerpMap::default()
                });
            }
            Op::Scores(v) => {
                let scores: BTreeMap<_, _> = [(900, v as f64)].into();
                self.scores = Some(scores.clone());
                r.derp_map = Some(DerpMap {
                    home_params: Some(DerpHomeParams {
                        region_score: Some(scores),
                    }),
                    ..DerpMap::default()
                });
            }
            Op::Filter(n) => {
                let rules = vec![FilterRule::allow_all(); n as usize];
                self.filter = Some(rules.clone());
                r.packet_filter = Some(rules);
            }
            Op::Dns(n) => {
                let dns = DnsConfig {
                    domains: (0..n).map(|i| format!("d{i}.example")).collect(),
                    ..DnsConfig::default()
                };
                self.dns = Some(dns.clone());
                r.dns_config = Some(dns);
            }
            Op::Domain(n) => {
                self.domain = format!("tailnet{n}.example");
                r.domain = self.domain.clone();
            }
            Op::Profile(id, n) => {
                let p = UserProfile {
                    id: id as UserId,
                    login_name: format!("u{n}@example"),
                    ..UserProfile::default()
                };
                self.profiles.insert(p.id, p.clone());
                r.user_profiles = vec![p];
            }
            Op::KeepAlive => r.keep_alive = true,
        }
        r
    }
}

#[derive(Debug, Clone, Copy)]
enum PatchField {
    Derp,
    Cap,
    Endpoints,
    Key,
    Disco,
    Online,
    LastSeen,
    KeyExpiry,
    KeySignature,
    CapMap,
}

fn patch(id: NodeId, field: PatchField, v: u8, version: u32) -> PeerChange {
    let mut pc = PeerChange {
        node_id: id,
        ..PeerChange::default()
    };
    match field {
        PatchField::Derp => pc.derp_region = 900 + v as i32,
        PatchField::Cap => pc.cap = 100 + v as i32,
        PatchField::Endpoints => {
            pc.endpoints = Some(
                (0..v % 3)
                    .map(|i| format!("10.0.0.{i}:{}", 1000 + v as u16).parse().unwrap())
                    .collect(),
            )
        }
        PatchField::Key => pc.key = Some(key(id, version)),
        PatchField::Disco => pc.disco_key = Some(DiscoPublic::from_bytes([v; 32])),
        PatchField::Online => pc.online = Some(v & 1 == 0),
        PatchField::LastSeen => pc.last_seen = Some(GoTime::from_unix(1_600_000_000 + v as i64)),
        PatchField::KeyExpiry => pc.key_expiry = Some(GoTime::from_unix(1_800_000_000 + v as i64)),
        PatchField::KeySignature => pc.key_signature = Some(format!("c2ln{v}")),
        PatchField::CapMap => {
            let mut m = BTreeMap::new();
            m.insert(format!("cap{v}"), None);
            pc.cap_map = Some(m);
        }
    }
    pc
}

/// The server's own (obvious) reading of each patch field, independent of `patch_peer`.
fn apply_patch_by_hand(p: &mut Node, field: PatchField, pc: &PeerChange) {
    match field {
        PatchField::Derp => {
            p.home_derp = pc.derp_region;
            p.legacy_derp.clear();
        }
        PatchField::Cap => p.cap = pc.cap,
        PatchField::Endpoints => p.endpoints = pc.endpoints.clone().unwrap(),
        PatchField::Key => p.key = pc.key.unwrap(),
        PatchField::Disco => p.disco_key = pc.disco_key.unwrap(),
        PatchField::Online => p.online = pc.online,
        PatchField::LastSeen => p.last_seen = pc.last_seen,
        PatchField::KeyExpiry => p.key_expiry = pc.key_expiry.unwrap(),
        PatchField::KeySignature => p.key_signature = pc.key_signature.clone(),
        PatchField::CapMap => p.cap_map = pc.cap_map.clone().unwrap(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Upsert(NodeId, u8),
    Remove(NodeId),
    Online(NodeId, bool),
    Seen(NodeId, bool),
    Patch(NodeId, PatchField, u8),
    Regions(u8),
    Scores(u8),
    Filter(u8),
    Dns(u8),
    Domain(u8),
    Profile(u8, u8),
    KeepAlive,
}

fn patch_field() -> impl Strategy<Value = PatchField> {
    prop_oneof![
        Just(PatchField::Derp),
        Just(PatchField::Cap),
        Just(PatchField::Endpoints),
        Just(PatchField::Key),
        Just(PatchField::Disco),
        Just(PatchField::Online),
        Just(PatchField::LastSeen),
        Just(PatchField::KeyExpiry),
        Just(PatchField::KeySignature),
        Just(PatchField::CapMap),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let id = 2i64..12;
    prop_oneof![
        4 => (id.clone(), any::<u8>()).prop_map(|(i, f)| Op::Upsert(i, f)),
        2 => id.clone().prop_map(Op::Remove),
        1 => (id.clone(), any::<bool>()).prop_map(|(i, b)| Op::Online(i, b)),
        1 => (id.clone(), any::<bool>()).prop_map(|(i, b)| Op::Seen(i, b)),
        4 => (id, patch_field(), any::<u8>()).prop_map(|(i, f, v)| Op::Patch(i, f, v)),
        1 => (0u8..3).prop_map(Op::Regions),
        1 => (1u8..5).prop_map(Op::Scores),
        1 => (0u8..3).prop_map(Op::Filter),
        1 => (0u8..3).prop_map(Op::Dns),
        1 => (1u8..4).prop_map(Op::Domain),
        1 => (1u8..4, any::<u8>()).prop_map(|(i, n)| Op::Profile(i, n)),
        1 => Just(Op::KeepAlive),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn deltas_equal_full_map(initial in prop::collection::vec(op(), 0..12), deltas in prop::collection::vec(op(), 0..40)) {
        let mut server = ServerState::default();
        for o in &initial {
            server.step(o);
        }
        let mut client = NetworkMap::new();
        client.apply_owned(server.full_map(), now());
        for o in &deltas {
            let msg = server.step(o);
            // Through the wire format, as a client sees it.
            let wire = serde_json::to_vec(&msg).unwrap();
            let decoded: MapResponse = serde_json::from_slice(&wire).unwrap();
            client.apply_owned(decoded, now());
        }
        let mut fresh = NetworkMap::new();
        fresh.apply_owned(server.full_map(), now());
        prop_assert_eq!(&client.peers, &fresh.peers);
        prop_assert_eq!(&client, &fresh);
        for (id, p) in &fresh.peers {
            prop_assert_eq!(client.peer_by_key(&p.key).map(|n| n.id), Some(*id));
        }
    }
}
