use super::*;
use serde_json::Value;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn noise_json() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/noise.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read noise.json")).unwrap()
}

fn h32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).expect("32-byte hex");
    out
}

fn seq_key(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start + i as u8)
}

/// The four KAT private keys: initiator static/ephemeral, responder static/ephemeral.
fn kat_keys() -> (MachinePrivate, [u8; 32], MachinePrivate, [u8; 32]) {
    (
        MachinePrivate::from_bytes(seq_key(0)),
        seq_key(32),
        MachinePrivate::from_bytes(seq_key(64)),
        seq_key(96),
    )
}

#[test]
fn noise_ik_kat_generic_prologue() {
    // Spec Appendix A.1 / noise.json noise_ik_kat: bare Noise IK messages, prologue TEST HANDSHAKE.
    let doc = noise_json();
    let kat = &doc["noise_ik_kat"];
    let (client, client_e, server, server_e) = kat_keys();
    assert_eq!(
        hex::encode(client.public().as_bytes()),
        kat["initiator_static"]["public_hex"].as_str().unwrap()
    );
    assert_eq!(
        hex::encode(server.public().as_bytes()),
        kat["responder_static"]["public_hex"].as_str().unwrap()
    );
    let prologue = kat["prologue_utf8"].as_str().unwrap().as_bytes();
    let (initiator, init) =
        Initiator::start_with_prologue(&client, &server.public(), 0, client_e, prologue).unwrap();
    assert_eq!(hex::encode(&init[5..]), kat["msg1_hex"].as_str().unwrap());

    let accepted =
        Responder::accept_with_prologue(&server, &init, server_e, Some(prologue)).unwrap();
    assert_eq!(accepted.peer, client.public());
    assert_eq!(
        hex::encode(&accepted.response[3..]),
        kat["msg2_hex"].as_str().unwrap()
    );

    let keys = initiator.finish(&accepted.response).unwrap();
    let split = &kat["derived_split"];
    assert_eq!(
        hex::encode(keys.tx),
        split["initiator_to_responder_key_hex"].as_str().unwrap()
    );
    assert_eq!(
        hex::encode(keys.rx),
        split["responder_to_initiator_key_hex"].as_str().unwrap()
    );
    assert_eq!(
        hex::encode(keys.handshake_hash),
        split["handshake_hash_hex"].as_str().unwrap()
    );
    assert_eq!(accepted.keys.tx, keys.rx);
    assert_eq!(accepted.keys.rx, keys.tx);
    assert_eq!(accepted.keys.handshake_hash, keys.handshake_hash);

    // Appendix A.2: records of "hello" with the split keys.
    let (mut c_tx, _) = keys.into_ciphers();
    assert_eq!(
        hex::encode(c_tx.seal(b"hello").unwrap()),
        "040015dc192494126dbf7536fc5739545df3ba74e6dc4970"
    );
    assert_eq!(
        hex::encode(c_tx.seal(b"hello").unwrap()),
        "040015d2340ad1e4312e8db9998d67f7fa32f131ac9d935b"
    );
    let (mut s_tx, _) = accepted.keys.into_ciphers();
    assert_eq!(
        hex::encode(s_tx.seal(b"hello").unwrap()),
        "0400150090874f2241645e3a06b58754e4038336d36c5fdb"
    );
}

#[test]
fn appendix_a2_full_v130_messages() {
    let (client, client_e, server, server_e) = kat_keys();
    let (initiator, init) =
        Initiator::start_with_ephemeral(&client, &server.public(), 130, client_e).unwrap();
    assert_eq!(
        hex::encode(init),
        "0082010060358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254ad5b8febedeb97415be53612205e6bfab385e34cb127dd8854c4f9afb10f9b0e49945171d80e52b62b1cc7794ec92042d7380dba1e3c96fde099f9f4158e08ea"
    );
    let accepted = Responder::accept_with_ephemeral(&server, &init, server_e).unwrap();
    assert_eq!(accepted.version, 130);
    assert_eq!(
        hex::encode(accepted.response),
        "020030675dd574ed7789310b3d2e7681f3790b466c773b1521fecf36577958371ea52fc9dd7d78df78ba87d8e5e246ffc6af00"
    );
    initiator.finish(&accepted.response).unwrap();
}

#[test]
fn controlbase_transcripts() {
    let doc = noise_json();
    let transcripts = doc["controlbase_transcripts"].as_array().unwrap();
    assert_eq!(transcripts.len(), 2);
    for t in transcripts {
        let version = t["protocol_version"].as_u64().unwrap() as u16;
        let client = MachinePrivate::from_bytes(h32(t["client_machine_key"]["private_hex"]
            .as_str()
            .unwrap()));
        let server =
            MachinePrivate::from_bytes(h32(t["control_key"]["private_hex"].as_str().unwrap()));
        let client_e = h32(t["client_ephemeral"]["private_hex"].as_str().unwrap());
        let server_e = h32(t["control_ephemeral"]["private_hex"].as_str().unwrap());
        assert_eq!(prologue(version), t["prologue_utf8"].as_str().unwrap());

        let (initiator, init) =
            Initiator::start_with_ephemeral(&client, &server.public(), version, client_e).unwrap();
        assert_eq!(
            hex::encode(init),
            t["initiation_message_hex"].as_str().unwrap()
        );
        use base64::Engine;
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(init),
            t["x_tailscale_handshake_header"].as_str().unwrap()
        );
        let accepted = Responder::accept_with_ephemeral(&server, &init, server_e).unwrap();
        assert_eq!(
            hex::encode(accepted.response),
            t["response_message_hex"].as_str().unwrap()
        );
        assert_eq!(accepted.peer, client.public());
        let keys = initiator.finish(&accepted.response).unwrap();
        assert_eq!(
            hex::encode(keys.handshake_hash),
            t["handshake_hash_hex"].as_str().unwrap()
        );
        assert_eq!(
            hex::encode(keys.tx),
            t["client_tx_key_hex (c1)"].as_str().unwrap()
        );
        assert_eq!(
            hex::encode(keys.rx),
            t["server_tx_key_hex (c2)"].as_str().unwrap()
        );

        let (mut c_tx, mut c_rx) = keys.into_ciphers();
        let (mut s_tx, mut s_rx) = accepted.keys.into_ciphers();
        for r in t["records"].as_array().unwrap() {
            let plaintext = r["plaintext_utf8"].as_str().unwrap().as_bytes();
            let want = r["record_hex"].as_str().unwrap();
            let (tx, rx) = match r["direction"].as_str().unwrap() {
                "client->server" => (&mut c_tx, &mut s_rx),
                "server->client" => (&mut s_tx, &mut c_rx),
                other => panic!("direction {other}"),
            };
            assert_eq!(tx.counter, r["nonce_counter"].as_u64().unwrap());
            let frame = tx.seal(plaintext).unwrap();
            assert_eq!(hex::encode(&frame), want);
            if let Some(wrong) = r.get("NOT_this_little_endian_nonce_record_hex") {
                assert_ne!(hex::encode(&frame), wrong.as_str().unwrap());
            }
            rx.push(&frame);
            assert_eq!(rx.next_plaintext().unwrap().unwrap(), plaintext);
        }
    }
}

#[test]
fn other_frames() {
    let doc = noise_json();
    let frames = doc["other_frames"].as_array().unwrap();
    let error = &frames[0];
    let text = error["text"].as_str().unwrap();
    assert_eq!(
        hex::encode(encode_error_frame(text)),
        error["frame_hex"].as_str().unwrap()
    );
    let frame = hex::decode(error["frame_hex"].as_str().unwrap()).unwrap();
    assert_eq!(parse_error_frame(&frame).unwrap(), text);

    let early = &frames[1];
    let bytes = hex::decode(early["plaintext_hex"].as_str().unwrap()).unwrap();
    let EarlyPayloadStatus::Present { payload, consumed } = parse_early_payload(&bytes).unwrap()
    else {
        panic!("early payload not recognised");
    };
    assert_eq!(consumed, bytes.len());
    assert_eq!(
        payload.node_key_challenge.to_string(),
        "chalpub:50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765"
    );
    assert_eq!(encode_early_payload(&payload), bytes);
    // Every proper prefix is incomplete, never an error or "absent".
    for n in 0..bytes.len() {
        assert_eq!(
            parse_early_payload(&bytes[..n]).unwrap(),
            EarlyPayloadStatus::Incomplete
        );
    }
    // An HTTP/2 SETTINGS frame header is not an early payload.
    assert_eq!(
        parse_early_payload(&[0, 0, 0x12, 4, 0, 0, 0, 0, 0]).unwrap(),
        EarlyPayloadStatus::Absent
    );
    let mut bad = bytes.clone();
    let hex_digit = bad.len() - 5;
    bad[hex_digit] = b'!';
    assert!(parse_early_payload(&bad).is_err());
}

#[test]
fn initiator_reports_server_error_frame() {
    let (client, _, server, _) = kat_keys();
    let (initiator, _) = Initiator::start(&client, &server.public(), 130).unwrap();
    let frame = encode_error_frame("go away");
    assert_eq!(
        handshake_answer_len([frame[0], frame[1], frame[2]]).unwrap(),
        frame.len()
    );
    match initiator.finish(&frame) {
        Err(NoiseError::ServerError(text)) => assert_eq!(text, "go away"),
        other => panic!("want server error, got {other:?}"),
    }
}

#[test]
fn handshake_rejects_tampering_and_bad_shapes() {
    let (client, _, server, _) = kat_keys();
    let (_, init) = Initiator::start(&client, &server.public(), 130).unwrap();
    // Any flipped bit in the encrypted part fails authentication.
    for i in 5..INITIATION_LEN {
        let mut bad = init;
        bad[i] ^= 1;
        assert!(Responder::accept(&server, &bad).is_err(), "byte {i}");
    }
    // A different version changes the prologue, so the tags fail.
    let mut other_version = init;
    other_version[1] = 131;
    assert!(matches!(
        Responder::accept(&server, &other_version),
        Err(NoiseError::Decrypt)
    ));
    assert!(Responder::accept(&server, &init[..100]).is_err());
    let mut bad_type = init;
    bad_type[2] = 2;
    assert!(Responder::accept(&server, &bad_type).is_err());
    // Wrong server key.
    assert!(Responder::accept(&MachinePrivate::generate(), &init).is_err());
    // Zero server key: DH gives zero.
    assert!(Initiator::start(&client, &MachinePublic::zero(), 130).is_err());

    let (initiator, init) = Initiator::start(&client, &server.public(), 130).unwrap();
    let accepted = Responder::accept(&server, &init).unwrap();
    let mut bad = accepted.response;
    bad[40] ^= 0x80;
    assert!(initiator.finish(&bad).is_err());
    assert!(handshake_answer_len([9, 0, 48]).is_err());
    assert!(handshake_answer_len([2, 0, 47]).is_err());
}

fn session() -> (TransportKeys, TransportKeys) {
    let client = MachinePrivate::generate();
    let server = MachinePrivate::generate();
    let (initiator, init) = Initiator::start(&client, &server.public(), 130).unwrap();
    let accepted = Responder::accept(&server, &init).unwrap();
    (initiator.finish(&accepted.response).unwrap(), accepted.keys)
}

#[test]
fn records_split_skip_empty_and_decode_incrementally() {
    let (c, s) = session();
    let (mut tx, _) = c.into_ciphers();
    let (_, mut rx) = s.into_ciphers();
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut wire = Vec::new();
    tx.seal_record_into(&[], &mut wire).unwrap(); // zero-length record
    tx.seal_into(&big, &mut wire).unwrap();
    // 10_000 = 4077 + 4077 + 1846: three records, each at most 4096 bytes on the wire.
    assert_eq!(wire.len(), 19 + 3 * 19 + 10_000);
    assert_eq!(wire[19..22], [4, 0x0f, 0xfd]);
    let mut got = Vec::new();
    for byte in &wire {
        rx.push(std::slice::from_ref(byte));
        while let Some(p) = rx.next_plaintext().unwrap() {
            assert!(!p.is_empty());
            got.extend_from_slice(&p);
        }
    }
    assert_eq!(got, big);
    assert!(tx
        .seal_record_into(&[0; MAX_PLAINTEXT_LEN + 1], &mut Vec::new())
        .is_err());
}

#[test]
fn records_fatal_errors_poison() {
    let (c, s) = session();
    let (mut tx, _) = c.into_ciphers();
    // Oversized length.
    let (_, mut rx) = s.clone().into_ciphers();
    rx.push(&[4, 0x0f, 0xfe]);
    assert!(matches!(
        rx.next_plaintext(),
        Err(NoiseError::BadRecordLength(4094))
    ));
    assert!(matches!(rx.next_plaintext(), Err(NoiseError::Poisoned)));
    // Wrong type.
    let (_, mut rx) = s.clone().into_ciphers();
    rx.push(&[2, 0, 16]);
    assert!(matches!(
        rx.next_plaintext(),
        Err(NoiseError::UnexpectedRecordType(2))
    ));
    // Tampered ciphertext.
    let (_, mut rx) = s.clone().into_ciphers();
    let mut frame = tx.seal(b"hello").unwrap();
    frame[5] ^= 1;
    rx.push(&frame);
    assert!(matches!(rx.next_plaintext(), Err(NoiseError::Decrypt)));
    // Replayed/out-of-order record (counter mismatch).
    let (_, mut rx) = s.into_ciphers();
    let second = tx.seal(b"again").unwrap();
    rx.push(&second);
    assert!(matches!(rx.next_plaintext(), Err(NoiseError::Decrypt)));
}

#[test]
fn nonce_exhaustion() {
    let (c, _) = session();
    let (mut tx, mut rx) = c.into_ciphers();
    tx.counter = u64::MAX - 1;
    assert!(tx.seal(b"x").is_ok());
    assert!(matches!(tx.seal(b"x"), Err(NoiseError::NonceExhausted)));
    rx.counter = u64::MAX;
    rx.push(&[4, 0, 16]);
    rx.push(&[0; 16]);
    assert!(matches!(
        rx.next_plaintext(),
        Err(NoiseError::NonceExhausted)
    ));
}

async fn with_timeout<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn stream_pair() -> (
    NoiseStream<tokio::io::DuplexStream>,
    NoiseStream<tokio::io::DuplexStream>,
) {
    let (c, s) = session();
    // A small pipe buffer forces partial reads and writes.
    let (a, b) = tokio::io::duplex(1000);
    (NoiseStream::new(a, c), NoiseStream::new(b, s))
}

#[tokio::test]
async fn stream_round_trip_large_and_early_payload() {
    let (mut client, mut server) = stream_pair();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let big2 = big.clone();
    let early = EarlyNoise {
        node_key_challenge: crate::keys::ChallengePrivate::generate().public(),
    };
    let early2 = early.clone();
    let writer = tokio::spawn(async move {
        server
            .write_all(&encode_early_payload(&early2))
            .await
            .unwrap();
        server.write_all(&big2).await.unwrap();
        server.flush().await.unwrap();
        let mut echo = vec![0u8; 5];
        server.read_exact(&mut echo).await.unwrap();
        server.shutdown().await.unwrap();
        echo
    });
    let got_early = with_timeout("early", client.read_early_payload())
        .await
        .unwrap();
    assert_eq!(got_early, Some(early));
    let mut got = vec![0u8; big.len()];
    with_timeout("read big", client.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(got, big);
    client.write_all(b"thank").await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(with_timeout("writer", writer).await.unwrap(), b"thank");
    let mut rest = Vec::new();
    with_timeout("eof", client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn stream_without_early_payload_keeps_bytes() {
    let (mut client, mut server) = stream_pair();
    server
        .write_all(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00rest")
        .await
        .unwrap();
    server.flush().await.unwrap();
    assert_eq!(
        with_timeout("early", client.read_early_payload())
            .await
            .unwrap(),
        None
    );
    let mut buf = [0u8; 13];
    with_timeout("read", client.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"\x00\x00\x12\x04\x00\x00\x00\x00\x00rest");
}

#[tokio::test]
async fn stream_read_error_on_garbage() {
    let (c, _) = session();
    let (a, mut b) = tokio::io::duplex(1000);
    let mut client = NoiseStream::new(a, c);
    b.write_all(&[4, 0, 20, 1, 2, 3]).await.unwrap();
    b.write_all(&[0; 17]).await.unwrap();
    let mut buf = [0u8; 10];
    let err = with_timeout("read", client.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

async fn echo_request(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
) {
    let (parts, mut body) = req.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let resp = http::Response::builder().status(200).body(()).unwrap();
    let mut send = respond.send_response(resp, false).expect("send response");
    let mut answer = format!("{} {} ", parts.method, parts.uri.path()).into_bytes();
    answer.extend_from_slice(&data);
    send.send_data(answer.into(), true).expect("send data");
}

#[tokio::test]
async fn h2_client_and_server_over_noise_streams() {
    let (client_io, server_io) = stream_pair();
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io)
            .await
            .expect("h2 server handshake");
        let mut handlers = Vec::new();
        while let Some(req) = conn.accept().await {
            let (req, respond) = req.expect("accept stream");
            // Each stream is served by its own task so the connection keeps being driven.
            handlers.push(tokio::spawn(echo_request(req, respond)));
        }
        let served = handlers.len();
        for h in handlers {
            h.await.expect("handler");
        }
        served
    });

    let (h2_client, conn) = with_timeout("h2 client handshake", h2::client::handshake(client_io))
        .await
        .expect("h2 client handshake");
    let conn_task = tokio::spawn(conn);
    let mut h2_client = with_timeout("ready", h2_client.ready()).await.unwrap();
    // A body larger than many records and than one HTTP/2 frame.
    let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let req = http::Request::builder()
        .method("POST")
        .uri("https://control.example/machine/map")
        .body(())
        .unwrap();
    let (resp, mut send) = h2_client.send_request(req, false).unwrap();
    send.send_data(body.clone().into(), true).unwrap();
    let resp = with_timeout("response", resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut resp_body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = with_timeout("body", resp_body.data()).await {
        let chunk = chunk.unwrap();
        let _ = resp_body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    let mut want = b"POST /machine/map ".to_vec();
    want.extend_from_slice(&body);
    assert_eq!(got.len(), want.len());
    assert!(got == want);
    drop((h2_client, send, resp_body));
    with_timeout("client conn end", conn_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(with_timeout("server end", server).await.unwrap(), 1);
}
