use super::*;
use serde::de::DeserializeOwned;

fn vector(name: &str) -> String {
    let path = format!(
        "{}/tests/vectors/control_json/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn samples() -> Value {
    serde_json::from_str(&vector("samples.json")).unwrap()
}

/// Whether Go's omitempty (or our Option modelling) may drop this value on re-encoding.
fn droppable(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Every non-empty field of `original` is in `reencoded` with an equal value (recursively).
/// Fields we do not model would show up here as missing.
fn assert_fields_kept(original: &Value, reencoded: &Value, path: &str) {
    match (original, reencoded) {
        (Value::Object(o), Value::Object(r)) => {
            for (k, v) in o {
                let p = format!("{path}.{k}");
                match r.get(k) {
                    Some(rv) => assert_fields_kept(v, rv, &p),
                    None => assert!(droppable(v), "field {p} lost on re-encoding: {v}"),
                }
            }
        }
        (Value::Array(o), Value::Array(r)) => {
            assert_eq!(o.len(), r.len(), "array length at {path}");
            for (i, (a, b)) in o.iter().zip(r).enumerate() {
                assert_fields_kept(a, b, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            assert_eq!(a.as_f64(), b.as_f64(), "number at {path}")
        }
        (a, b) => assert_eq!(a, b, "value at {path}"),
    }
}

/// Decodes, re-encodes, checks fields are kept and that decoding the output gives the same value.
fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(json: &Value) -> T {
    let parsed: T = serde_json::from_value(json.clone()).expect("decode");
    let reencoded = serde_json::to_value(&parsed).unwrap();
    assert_fields_kept(json, &reencoded, "");
    let again: T = serde_json::from_value(reencoded).unwrap();
    assert_eq!(again, parsed);
    parsed
}

#[test]
fn map_response_fixture_round_trips() {
    let json: Value = serde_json::from_str(&vector("map_response.json")).unwrap();
    let resp: MapResponse = round_trip(&json);
    let node = resp.node.as_ref().expect("Node");
    assert_eq!(node.id, 6523515364831089);
    assert_eq!(node.stable_id, "nLzY4qgWws11CNTRL");
    assert!(node.machine_authorized);
    assert!(node.disco_key.is_zero());
    assert_eq!(node.addresses.len(), 2);
    assert!(node
        .cap_map
        .contains_key("https://tailscale.com/cap/is-admin"));
    let derp = resp.derp_map.as_ref().unwrap();
    let regions = derp.regions.as_ref().unwrap();
    assert_eq!(regions.len(), 28);
    assert_eq!(regions[&1].as_ref().unwrap().region_code, "nyc");
    assert!(!resp.peers_changed.is_empty());
    let relay = &resp.peers_changed[0];
    assert_eq!(relay.allowed_ips, None);
    assert_eq!(relay.effective_allowed_ips(), &relay.addresses[..]);
    assert_eq!(relay.effective_home_derp(), 1);
    assert_eq!(relay.online, Some(true));
    let dns = resp.dns_config.as_ref().unwrap();
    assert_eq!(dns.routes.get("tail252fff.ts.net."), Some(&None));
    assert_eq!(dns.routes["ts.net."].as_ref().unwrap().len(), 2);
    assert!(resp.packet_filter.as_ref().unwrap().len() >= 2);
    assert_eq!(
        resp.control_time.unwrap().to_string(),
        "2025-09-30T00:32:16.013505287Z"
    );
    assert!(resp.ssh_policy.is_some());
    assert!(!resp.user_profiles.is_empty());
}

#[test]
fn node_fixture_round_trips() {
    let json: Value = serde_json::from_str(&vector("node.json")).unwrap();
    let node: Node = round_trip(&json);
    assert_eq!(node.id, 1679275757477108);
    assert_eq!(node.legacy_derp, "127.3.3.40:12");
    assert_eq!(node.home_derp, 1);
    assert_eq!(node.effective_home_derp(), 1, "HomeDERP wins over DERP");
    assert_eq!(node.hostinfo.services.len(), 2);
    assert_eq!(node.key_expiry.to_string(), "2026-01-25T18:31:27Z");
    assert_eq!(node.cap, 127);
    // Re-encoded, the key names keep Go's casing.
    let text = serde_json::to_string(&node).unwrap();
    for key in [
        "\"ID\"",
        "\"StableID\"",
        "\"HomeDERP\"",
        "\"DERP\"",
        "\"AllowedIPs\":null",
        "\"Hostinfo\"",
    ] {
        assert!(text.contains(key), "{key} missing in {text}");
    }
}

#[test]
fn netmap_capture_nodes_and_parts_parse() {
    let doc: Value = serde_json::from_str(&vector("netmap_capture_acl-a01_beedrill.json")).unwrap();
    let nm = &doc["netmap"];
    let self_node: Node = round_trip(&nm["SelfNode"]);
    assert_eq!(self_node.name, "beedrill.tail78f774.ts.net.");
    let peers = nm["Peers"].as_array().unwrap();
    assert!(!peers.is_empty());
    for p in peers {
        let peer: Node = round_trip(p);
        assert!(peer.id > 0);
        assert!(!peer.key.is_zero());
    }
    let derp: DerpMap = round_trip(&nm["DERPMap"]);
    assert!(derp.regions.unwrap().len() > 10);
    let rules: Vec<FilterRule> = round_trip(&nm["PacketFilterRules"]);
    assert!(!rules.is_empty());
    let _: DnsConfig = round_trip(&nm["DNS"]);
    for (id, profile) in nm["UserProfiles"].as_object().unwrap() {
        let p: UserProfile = serde_json::from_value(profile.clone()).unwrap();
        assert_eq!(p.id.to_string(), *id);
    }
}

#[test]
fn map_request_endpoints_sample() {
    let s = samples();
    let sample = &s["map_request_endpoints"];
    let req: MapRequest = serde_json::from_str(sample["json"].as_str().unwrap()).unwrap();
    assert_eq!(req.version, 130);
    let usable = req.usable_endpoints();
    let want = &sample["want"]["Endpoints"][0];
    assert_eq!(usable.len(), 1);
    assert_eq!(usable[0].0.to_string(), want["addr"].as_str().unwrap());
    assert_eq!(usable[0].1 .0 as u64, want["type"].as_u64().unwrap());
    assert_eq!(usable[0].1, EndpointType::LOCAL);

    let types: Vec<EndpointType> =
        serde_json::from_str(s["endpoint_type_values"]["json"].as_str().unwrap()).unwrap();
    assert_eq!(
        types,
        [
            EndpointType::UNKNOWN,
            EndpointType::LOCAL,
            EndpointType::STUN,
            EndpointType::PORTMAPPED,
            EndpointType::STUN4_LOCAL_PORT
        ]
    );
    assert_eq!(serde_json::to_string(&types).unwrap(), "[0,1,2,3,4]");
}

#[test]
fn map_request_drops_zoned_and_link_local_endpoints() {
    let req: MapRequest = serde_json::from_str(
        r#"{"Endpoints":["[fe80::1%eth0]:41641","[fe80::2]:41641","[2001:db8::1]:41641","10.0.0.1:1"],
            "EndpointTypes":[1,1,2]}"#,
    )
    .unwrap();
    let usable = req.usable_endpoints();
    assert_eq!(usable.len(), 2);
    assert_eq!(usable[0].0.to_string(), "[2001:db8::1]:41641");
    assert_eq!(usable[0].1, EndpointType::STUN);
    assert_eq!(usable[1].1, EndpointType::UNKNOWN);
}

#[test]
fn control_dial_plan_sample() {
    let s = samples();
    let sample = &s["control_dial_plan"];
    let json: Value = serde_json::from_str(sample["json"].as_str().unwrap()).unwrap();
    let plan: ControlDialPlan = round_trip(&json);
    assert_eq!(
        plan.candidates.len() as u64,
        sample["want"]["candidate_count"].as_u64().unwrap()
    );
    assert!(plan
        .candidates
        .iter()
        .all(|c| c.ip.is_some() || !c.ace_host.is_empty()));
    assert_eq!(plan.candidates[1].dial_start_delay_sec, 0.3);
    assert!(plan.candidates[9].ip.is_none());
}

#[test]
fn c2n_ping_request_sample() {
    let s = samples();
    let sample = &s["c2n_ping_request"];
    let ping: PingRequest = serde_json::from_str(sample["json"].as_str().unwrap()).unwrap();
    let want = &sample["want"];
    assert_eq!(ping.url, want["URL"].as_str().unwrap());
    assert!(ping.url_is_noise);
    assert_eq!(ping.type_list(), ["c2n"]);
    assert_eq!(ping.ip, None);
    assert_eq!(
        String::from_utf8(ping.payload_bytes().unwrap()).unwrap(),
        want["Payload_decoded"].as_str().unwrap()
    );
    // IP "" is re-encoded as "" (Go's zero netip.Addr).
    assert!(serde_json::to_string(&ping)
        .unwrap()
        .contains("\"IP\":\"\""));
}

#[test]
fn health_null_vs_empty_sample() {
    let s = samples();
    for case in s["map_response_health"].as_array().unwrap() {
        let resp: MapResponse =
            serde_json::from_str(case["map_response_json"].as_str().unwrap()).unwrap();
        let want: Option<Vec<String>> =
            serde_json::from_value(case["want_health"].clone()).unwrap();
        assert_eq!(resp.health, want, "{}", case["map_response_json"]);
    }
}

#[test]
fn raw_message_cap_map_sample() {
    let s = samples();
    for case in s["raw_message_roundtrip"]["cases"].as_array().unwrap() {
        let json: Value = if let Some(text) = case.get("json") {
            serde_json::from_str(text.as_str().unwrap()).unwrap()
        } else {
            // `wire` lists each RawMessage as its JSON text.
            let mut obj = serde_json::Map::new();
            for (k, v) in case["wire"].as_object().unwrap() {
                let vals = v.as_array().map(|a| {
                    Value::Array(
                        a.iter()
                            .map(|t| serde_json::from_str(t.as_str().unwrap()).unwrap())
                            .collect(),
                    )
                });
                obj.insert(k.clone(), vals.unwrap_or(Value::Null));
            }
            Value::Object(obj)
        };
        let cap_map: Option<CapMap> = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&cap_map).unwrap(),
            json,
            "{}",
            case["name"]
        );
    }
}

#[test]
fn register_shapes_match_go_encoding_byte_for_byte() {
    let s = samples();
    let shapes = s["derived_go_encoding_shapes"].as_array().unwrap();
    let req = RegisterRequest {
        version: 130,
        node_key: "nodekey:50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765"
            .parse()
            .unwrap(),
        ..RegisterRequest::default()
    };
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        shapes[0]["json"].as_str().unwrap()
    );
    let parsed: RegisterRequest =
        serde_json::from_str(shapes[0]["json"].as_str().unwrap()).unwrap();
    assert_eq!(parsed, req);
    assert_eq!(
        serde_json::to_string(&RegisterResponse::default()).unwrap(),
        shapes[1]["json"].as_str().unwrap()
    );
}

#[test]
fn register_request_example_from_spec() {
    let req: RegisterRequest = serde_json::from_str(
        r#"{"Version":130,
 "NodeKey":"nodekey:7d56c29e77fdd9b76ddcaa1e17e1866a6d4afb1daae3a639fbee46b6b61dcd6d",
 "OldNodeKey":"nodekey:0000000000000000000000000000000000000000000000000000000000000000",
 "NLKey":"nlpub:3a1f000000000000000000000000000000000000000000000000000000000000",
 "Auth":{"AuthKey":"tskey-auth-xyz"},
 "Expiry":"0001-01-01T00:00:00Z",
 "Followup":"",
 "Hostinfo":{"IPNVersion":"1.90.9","BackendLogID":"ab","OS":"linux","Hostname":"myapp","Package":"tsnet","SomethingNew":1},
 "Ephemeral":true,
 "NodeKeySignature":null}"#,
    )
    .unwrap();
    assert_eq!(req.auth.as_ref().unwrap().auth_key, "tskey-auth-xyz");
    assert!(req.old_node_key.is_zero());
    assert!(req.expiry.is_zero());
    assert!(req.ephemeral);
    assert_eq!(req.hostinfo.as_ref().unwrap().hostname, "myapp");
    assert!(logout_expiry() != GoTime::ZERO);
    assert_eq!(logout_expiry().to_string(), "1970-01-01T00:02:03Z");
    // v1.94 omits zero fields: absent everything decodes to defaults.
    let empty: RegisterRequest = serde_json::from_str("{}").unwrap();
    assert_eq!(empty, RegisterRequest::default());
    let empty: MapRequest = serde_json::from_str("{}").unwrap();
    assert!(!empty.stream && !empty.keep_alive);
}

#[test]
fn key_json_response_and_early_noise() {
    let r = OverTLSPublicKeyResponse {
        legacy_public_key: MachinePublic::zero(),
        public_key: MachinePublic::from_bytes([0x5d; 32]),
    };
    let text = serde_json::to_string(&r).unwrap();
    assert_eq!(
        text,
        format!(
            r#"{{"legacyPublicKey":"mkey:{}","publicKey":"mkey:{}"}}"#,
            "0".repeat(64),
            "5d".repeat(32)
        )
    );
    assert_eq!(
        serde_json::from_str::<OverTLSPublicKeyResponse>(&text).unwrap(),
        r
    );
    // An empty string for a key field is an error, as in Go.
    assert!(serde_json::from_str::<OverTLSPublicKeyResponse>(r#"{"publicKey":""}"#).is_err());
}

#[test]
fn go_time_forms() {
    let zero: GoTime = serde_json::from_str("\"0001-01-01T00:00:00Z\"").unwrap();
    assert!(zero.is_zero());
    assert_eq!(
        serde_json::to_string(&zero).unwrap(),
        "\"0001-01-01T00:00:00Z\""
    );
    let null: GoTime = serde_json::from_str("null").unwrap();
    assert!(null.is_zero());
    for text in [
        "2025-09-25T05:41:06.417127373Z",
        "2025-09-25T05:41:06Z",
        "2025-09-25T05:41:06.5Z",
        "2025-09-25T07:41:06.25+02:00",
    ] {
        let t: GoTime = text.parse().unwrap();
        assert!(!t.is_zero());
        assert_eq!(t.to_string(), text);
    }
    assert!("yesterday".parse::<GoTime>().is_err());
    assert_eq!(GoTime::from_unix(0).to_string(), "1970-01-01T00:00:00Z");
}

#[test]
fn opt_bool_and_integer_keys() {
    let ni: NetInfo =
        serde_json::from_str(r#"{"WorkingUDP":true,"UPnP":false,"PMP":null}"#).unwrap();
    assert_eq!(ni.working_udp, Some(true));
    assert_eq!(ni.upnp, Some(false));
    assert_eq!(ni.pmp, None);
    // opt.Bool accepts only true/false/null.
    assert!(serde_json::from_str::<NetInfo>(r#"{"WorkingUDP":"true"}"#).is_err());
    // Unknown opt.Bools are emitted as null, as Go v1.90 does.
    assert!(serde_json::to_string(&ni).unwrap().contains("\"PMP\":null"));

    let resp: MapResponse = serde_json::from_str(
        r#"{"OnlineChange":{"5":true,"7":false},"PeerSeenChange":{"9":true},
            "DERPMap":{"Regions":{"900":{"RegionID":900,"Nodes":[]},"901":null},"omitDefaultRegions":true}}"#,
    )
    .unwrap();
    assert!(resp.online_change[&5]);
    assert!(!resp.online_change[&7]);
    assert!(resp.peer_seen_change[&9]);
    let regions = resp.derp_map.as_ref().unwrap().regions.as_ref().unwrap();
    assert!(regions[&900].is_some());
    assert!(regions[&901].is_none());
    let text = serde_json::to_string(&resp).unwrap();
    assert!(
        text.contains(r#""OnlineChange":{"5":true,"7":false}"#),
        "{text}"
    );
    assert!(text.contains(r#""Regions":{"900":"#), "{text}");
    assert!(text.contains(r#""omitDefaultRegions":true"#), "{text}");
}

#[test]
fn empty_vs_absent_survive_round_trip() {
    let resp: MapResponse =
        serde_json::from_str(r#"{"PacketFilter":[],"Health":[],"DERPMap":{"Regions":{}}}"#)
            .unwrap();
    assert_eq!(resp.packet_filter, Some(vec![]));
    assert_eq!(resp.health, Some(vec![]));
    let text = serde_json::to_string(&resp).unwrap();
    assert_eq!(
        text,
        r#"{"DERPMap":{"Regions":{}},"PacketFilter":[],"Health":[]}"#
    );
    assert_eq!(
        serde_json::to_string(&MapResponse::keep_alive()).unwrap(),
        r#"{"KeepAlive":true}"#
    );
    let node = Node {
        allowed_ips: Some(vec![]),
        ..Node::default()
    };
    assert!(serde_json::to_string(&node)
        .unwrap()
        .contains("\"AllowedIPs\":[]"));
    assert!(serde_json::to_string(&Node::default())
        .unwrap()
        .contains("\"AllowedIPs\":null"));
    assert!(serde_json::to_string(&Node::default())
        .unwrap()
        .contains("\"Hostinfo\":{}"));
}

#[test]
fn filter_allow_all_matches_go() {
    assert_eq!(
        serde_json::to_string(&FilterRule::allow_all()).unwrap(),
        r#"{"SrcIPs":["*"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]}"#
    );
}

#[test]
fn peer_change_and_lenient_endpoints() {
    let pc: PeerChange = serde_json::from_str(
        r#"{"NodeID":3,"DERPRegion":900,"Endpoints":["1.2.3.4:5","[fe80::1%eth0]:6"],
            "DiscoKey":"discokey:0101010101010101010101010101010101010101010101010101010101010101",
            "Online":false,"LastSeen":"2025-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!(pc.node_id, 3);
    assert_eq!(pc.derp_region, 900);
    assert_eq!(pc.endpoints.as_ref().unwrap().len(), 1);
    assert_eq!(pc.online, Some(false));
    assert!(pc.key.is_none());
    assert!(pc.cap_map.is_none());
}
