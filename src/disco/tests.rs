use super::*;
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/disco.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).expect("disco.json is JSON")
}

fn hex_array<const N: usize>(v: &Value) -> [u8; N] {
    let s = v.as_str().expect("hex string");
    hex::decode(s)
        .expect("hex")
        .try_into()
        .expect("hex of the right length")
}

fn disco_key(v: &Value) -> DiscoPublic {
    DiscoPublic::from_bytes(hex_array(&v["raw_hex"]))
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str().expect("addr string").parse().expect("addr")
}

fn addrs(v: &Value) -> Vec<SocketAddr> {
    v.as_array().expect("addr list").iter().map(addr).collect()
}

fn nanos(v: &Value) -> Duration {
    Duration::from_nanos(v["nanoseconds"].as_u64().expect("nanoseconds"))
}

fn relay_endpoint(f: &Value) -> UdpRelayEndpoint {
    UdpRelayEndpoint {
        server_disco: disco_key(&f["ServerDisco"]),
        client_disco: [
            disco_key(&f["ClientDisco"][0]),
            disco_key(&f["ClientDisco"][1]),
        ],
        lamport_id: f["LamportID"].as_u64().expect("LamportID"),
        vni: f["VNI"].as_u64().expect("VNI") as u32,
        bind_lifetime: nanos(&f["BindLifetime"]),
        steady_state_lifetime: nanos(&f["SteadyStateLifetime"]),
        addr_ports: addrs(&f["AddrPorts"]),
    }
}

fn bind(f: &Value) -> BindBody {
    BindBody {
        vni: f["VNI"].as_u64().expect("VNI") as u32,
        generation: f["Generation"].as_u64().expect("Generation") as u32,
        remote_key: disco_key(&f["RemoteKey"]),
        challenge: hex_array(&f["Challenge_hex"]),
    }
}

/// Builds the message a vector's `fields` describe (the upstream Go literal).
fn message_from_fields(kind: &str, f: &Value) -> Message {
    let tx = || TxId(hex_array(&f["TxID_hex"]));
    match kind {
        "Ping" => Message::Ping(Ping {
            tx_id: tx(),
            node_key: f
                .get("NodeKey")
                .map(|k| NodePublic::from_bytes(hex_array(&k["raw_hex"]))),
            padding: f.get("Padding").and_then(Value::as_u64).unwrap_or(0) as usize,
        }),
        "Pong" => Message::Pong(Pong {
            tx_id: tx(),
            src: addr(&f["Src"]),
        }),
        "CallMeMaybe" => Message::CallMeMaybe(addrs(&f["MyNumber"])),
        "BindUDPRelayEndpoint" => Message::BindUdpRelayEndpoint(bind(f)),
        "BindUDPRelayEndpointChallenge" => Message::BindUdpRelayEndpointChallenge(bind(f)),
        "BindUDPRelayEndpointAnswer" => Message::BindUdpRelayEndpointAnswer(bind(f)),
        "CallMeMaybeVia" => Message::CallMeMaybeVia(relay_endpoint(&f["UDPRelayEndpoint"])),
        "AllocateUDPRelayEndpointRequest" => {
            Message::AllocateUdpRelayEndpointRequest(AllocateRequest {
                client_disco: [
                    disco_key(&f["ClientDisco"][0]),
                    disco_key(&f["ClientDisco"][1]),
                ],
                generation: f["Generation"].as_u64().expect("Generation") as u32,
            })
        }
        "AllocateUDPRelayEndpointResponse" => {
            Message::AllocateUdpRelayEndpointResponse(AllocateResponse {
                generation: f["Generation"].as_u64().expect("Generation") as u32,
                endpoint: relay_endpoint(&f["UDPRelayEndpoint"]),
            })
        }
        other => panic!("vector with unknown message type {other}"),
    }
}

#[test]
fn marshal_vectors_encode_and_parse_back() {
    let v = vectors();
    let cases = v["marshal_vectors"].as_array().expect("marshal_vectors");
    assert_eq!(cases.len(), 14, "every upstream case is present");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let kind = case["message_type"].as_str().expect("message_type");
        let msg = message_from_fields(kind, &case["fields"]);
        let want = hex::decode(case["plaintext_hex"].as_str().expect("hex")).expect("hex");
        let got = to_vec(&msg);
        assert_eq!(hex::encode(&got), hex::encode(&want), "encode {name}");
        assert_eq!(got.len() as u64, case["length"].as_u64().unwrap(), "{name}");
        assert_eq!(
            u64::from(msg.type_byte()),
            case["type_byte"].as_u64().unwrap()
        );
        assert_eq!(parse(&want).as_ref(), Ok(&msg), "parse {name}");
    }
}

#[test]
fn trailing_bytes_are_ignored_where_upstream_ignores_them() {
    let pong = Message::Pong(Pong {
        tx_id: TxId([7; 12]),
        src: "1.2.3.4:5".parse().unwrap(),
    });
    let mut b = to_vec(&pong);
    b.extend_from_slice(b"future fields");
    assert_eq!(parse(&b), Ok(pong));

    let bind = Message::BindUdpRelayEndpoint(BindBody {
        vni: 9,
        generation: 3,
        remote_key: DiscoPublic::from_bytes([5; 32]),
        challenge: [0; 32],
    });
    let mut b = to_vec(&bind);
    b.push(0xff);
    assert_eq!(parse(&b), Ok(bind));
}

#[test]
fn short_and_unknown_input_gives_typed_errors() {
    assert!(matches!(parse(&[]), Err(DiscoError::TooShort { .. })));
    assert!(matches!(parse(&[1]), Err(DiscoError::TooShort { .. })));
    assert!(matches!(
        parse(&[1, 0, 1, 2]),
        Err(DiscoError::TooShort { .. })
    ));
    assert!(matches!(
        parse(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(DiscoError::TooShort { .. })
    ));
    assert!(matches!(
        parse(&[4, 0, 0, 0]),
        Err(DiscoError::TooShort { .. })
    ));
    assert!(matches!(
        parse(&[8, 0, 0]),
        Err(DiscoError::TooShort { .. })
    ));
    assert_eq!(parse(&[0x0a, 0]), Err(DiscoError::UnknownType(0x0a)));
    assert_eq!(parse(&[0, 0]), Err(DiscoError::UnknownType(0)));
    // CallMeMaybeVia needs 124 + 18·N bytes, N ≥ 1.
    assert_eq!(parse(&[7, 0]), Err(DiscoError::BadRelayEndpoint(0)));
    let mut via = vec![7, 0];
    via.extend_from_slice(&[0; RELAY_ENDPOINT_FIXED_LEN]);
    assert_eq!(parse(&via), Err(DiscoError::BadRelayEndpoint(124)));
    via.extend_from_slice(&[0; EP_LEN + 1]);
    assert_eq!(parse(&via), Err(DiscoError::BadRelayEndpoint(124 + 19)));
}

#[test]
fn lenient_decodes_match_upstream() {
    // CallMeMaybe: wrong version or a ragged list decodes as empty, not an error.
    let mut cmm = to_vec(&Message::CallMeMaybe(vec!["1.2.3.4:5".parse().unwrap()]));
    cmm.push(0);
    assert_eq!(parse(&cmm), Ok(Message::CallMeMaybe(vec![])));
    assert_eq!(parse(&[3, 1, 0, 0]), Ok(Message::CallMeMaybe(vec![])));
    // Relay messages with version != 0 are empty messages.
    assert_eq!(
        parse(&[8, 1]),
        Ok(Message::AllocateUdpRelayEndpointRequest(Default::default()))
    );
    assert_eq!(
        parse(&[9, 1]),
        Ok(Message::AllocateUdpRelayEndpointResponse(Default::default()))
    );
    assert_eq!(
        parse(&[7, 1]),
        Ok(Message::CallMeMaybeVia(Default::default()))
    );
    // Bind ignores the version byte.
    let mut b = to_vec(&Message::BindUdpRelayEndpointAnswer(BindBody {
        vni: 1,
        generation: 2,
        remote_key: DiscoPublic::zero(),
        challenge: [9; 32],
    }));
    b[1] = 7;
    assert!(matches!(
        parse(&b),
        Ok(Message::BindUdpRelayEndpointAnswer(_))
    ));
}

#[test]
fn ping_sizes_match_the_spec() {
    let me = DiscoPrivate::generate();
    let peer = DiscoPrivate::generate();
    let ping = Message::Ping(Ping {
        tx_id: TxId::random(),
        node_key: Some(NodePublic::from_bytes([3; 32])),
        padding: 0,
    });
    assert_eq!(seal(&me, &peer.public(), &ping).len(), 124);
    assert_eq!(PING_WIRE_LEN, 124);
    let pong = Message::Pong(Pong {
        tx_id: TxId::random(),
        src: "10.0.0.1:41641".parse().unwrap(),
    });
    assert_eq!(seal(&me, &peer.public(), &pong).len(), 110);
    let cmm = Message::CallMeMaybe(vec!["10.0.0.1:1".parse().unwrap(); 3]);
    assert_eq!(seal(&me, &peer.public(), &cmm).len(), 80 + 18 * 3);
}

#[test]
fn seal_then_open_between_two_disco_keys() {
    let a = DiscoPrivate::generate();
    let b = DiscoPrivate::generate();
    let msg = Message::CallMeMaybe(vec![
        "192.0.2.1:41641".parse().unwrap(),
        "[2001:db8::1]:41641".parse().unwrap(),
    ]);
    let wire = seal(&a, &b.public(), &msg);
    assert!(looks_like_disco(&wire));
    assert_eq!(&wire[..6], &MAGIC);
    let packet = parse_packet(&wire).unwrap();
    assert_eq!(packet.sender, a.public());
    assert_eq!(
        open(&shared_box(&b, &packet.sender), &packet),
        Ok(msg.clone())
    );

    // A third key cannot open it; a flipped bit fails authentication.
    let c = DiscoPrivate::generate();
    assert_eq!(
        open(&shared_box(&c, &packet.sender), &packet),
        Err(DiscoError::Box(BoxError::Auth))
    );
    let mut bad = wire.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    let packet = parse_packet(&bad).unwrap();
    assert_eq!(
        open(&shared_box(&b, &packet.sender), &packet),
        Err(DiscoError::Box(BoxError::Auth))
    );
}

#[test]
fn outer_packet_length_rules() {
    let mut b = MAGIC.to_vec();
    assert!(!looks_like_disco(&b));
    assert_eq!(
        parse_packet(&b),
        Err(DiscoError::TooShort {
            what: "packet",
            len: 6
        })
    );
    b.resize(CLASSIFY_LEN, 0);
    assert!(looks_like_disco(&b));
    b.resize(HEADER_LEN - 1, 0);
    assert!(parse_packet(&b).is_err());
    b.resize(HEADER_LEN, 0);
    let p = parse_packet(&b).unwrap();
    assert!(p.sealed.len() == NONCE_LEN);
    // Sealed part shorter than nonce + tag: a typed error from the box.
    let shared = shared_box(
        &DiscoPrivate::generate(),
        &DiscoPrivate::generate().public(),
    );
    assert_eq!(
        open(&shared, &p),
        Err(DiscoError::Box(BoxError::TooShort(NONCE_LEN)))
    );
    assert_eq!(
        parse_packet(b"TS\xf0\x9f\x92\xad"),
        Err(DiscoError::NoMagic)
    );
}

proptest::proptest! {
    #[test]
    fn parse_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
        let _ = parse(&b);
        let _ = parse_packet(&b);
    }

    #[test]
    fn parse_of_encode_is_identity_for_pongs_and_cmm(
        ip in proptest::prelude::any::<[u8; 16]>(),
        port in proptest::prelude::any::<u16>(),
        tx in proptest::prelude::any::<[u8; 12]>(),
    ) {
        let ip = Ipv6Addr::from(ip);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        let src = SocketAddr::new(ip, port);
        let pong = Message::Pong(Pong { tx_id: TxId(tx), src });
        proptest::prop_assert_eq!(parse(&to_vec(&pong)), Ok(pong));
        let cmm = Message::CallMeMaybe(vec![src, src]);
        proptest::prop_assert_eq!(parse(&to_vec(&cmm)), Ok(cmm));
    }
}
