//! Fuzz the DERP frame codec: arbitrary bytes must never panic, and whatever parses must
//! re-encode to bytes that parse to the same frame. Also the ClientInfo/ServerInfo JSON and the
//! meta-certificate key scan, which see untrusted bytes too.

use bytes::BytesMut;
use tern::derp::frame::{self, ClientInfo, ServerInfo};

pub fn run(data: &[u8]) {
    if let Ok(parsed) = frame::parse(data) {
        let wire = parsed.to_vec();
        assert_eq!(frame::parse(&wire).ok(), Some(parsed));
    }
    // As a stream, with a small limit and the relay's limit.
    for max in [64, frame::MAX_FRAME_LEN] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(f)) = frame::decode(&mut buf, max) {
            assert!(f.payload_len() <= frame::MAX_CLIENT_RECV_LEN);
        }
    }
    if let Ok(info) = ClientInfo::from_json(data) {
        assert_eq!(
            ClientInfo::from_json(info.to_json().as_bytes()).ok(),
            Some(info)
        );
    }
    let _ = ServerInfo::from_json(data);
    let _ = tern::derp::client::meta_cert_key(data);
}
