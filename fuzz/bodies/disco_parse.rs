//! Fuzz the disco codec and the UDP demultiplexer: arbitrary bytes never panic, and every message
//! that has a canonical encoding parses back to itself after re-encoding.

use tern::disco::{self, Message};
use tern::{demux, relay::geneve};

/// Messages for which `parse(encode(m)) == m`. Like upstream, a Ping without node key whose
/// padding could hold one, and a relay endpoint without addresses (what a non-v0 relay message
/// decodes to), have no such encoding.
fn canonical(m: &Message) -> bool {
    match m {
        Message::Ping(p) => p.node_key.is_some() || p.padding < 32,
        Message::CallMeMaybeVia(ep) => !ep.addr_ports.is_empty(),
        Message::AllocateUdpRelayEndpointResponse(r) => !r.endpoint.addr_ports.is_empty(),
        _ => true,
    }
}

pub fn run(data: &[u8]) {
    if let Ok(msg) = disco::parse(data) {
        if canonical(&msg) {
            let wire = disco::to_vec(&msg);
            assert_eq!(disco::parse(&wire).as_ref(), Ok(&msg));
        }
    }
    if let Ok(packet) = disco::parse_packet(data) {
        assert_eq!(packet.sealed.len() + 38, data.len());
        // A fixed key pair: opening must fail cleanly (or, astronomically rarely, succeed).
        let shared = tern::naclbox::SharedBox::new(&[7; 32], &[9; 32]);
        let _ = disco::open(&shared, &packet);
    }
    match demux::classify_udp(data) {
        demux::Inbound::Stun(b) => assert!(tern::stun::is(b)),
        demux::Inbound::Disco { packet, .. } => assert!(disco::looks_like_disco(packet)),
        demux::Inbound::WireGuard { packet, .. } => assert!(packet.len() <= data.len()),
    }
    let _ = demux::classify_derp(data);
    if let Ok(h) = geneve::parse(data) {
        let bytes = h.to_bytes().expect("a decoded header re-encodes");
        assert_eq!(geneve::parse(&bytes), Ok(h));
    }
}
