//! Fuzz the STUN codec: arbitrary bytes never panic, and whatever parses as a binding request or
//! response re-encodes (in Tailscale's form) to bytes that parse to the same values.

use tern::stun;

pub fn run(data: &[u8]) {
    let _ = stun::is(data);
    if let Ok(msg) = stun::parse_message(data) {
        let _ = stun::attributes(&msg);
    }
    if let Ok(tx) = stun::parse_binding_request(data) {
        assert_eq!(stun::parse_binding_request(&stun::request(tx)), Ok(tx));
    }
    if let Ok((tx, addr)) = stun::parse_response(data) {
        assert_eq!(
            stun::parse_response(&stun::response(tx, addr)),
            Ok((tx, addr))
        );
    }
}
