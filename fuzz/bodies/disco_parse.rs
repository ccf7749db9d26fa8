//! Fuzz the disco codec, the UDP demultiplexer and the path machines behind real sealed disco.
//!
//! Even first byte (codec mode): the rest goes through the codec and classifiers as it is:
//! arbitrary bytes never panic, and every message that has a canonical encoding parses back to
//! itself after re-encoding.
//!
//! Odd first byte (ops mode, `ops`): a `PeerTable` with a fixed disco key and two peers with
//! fixed disco keys; the rest is a sequence of ops. Peers send fuzzer-chosen plaintext or
//! well-formed messages built from fuzzer fields, sealed with their real keys, over UDP or DERP,
//! so Ping, Pong (also echoing our own pings), CallMeMaybe(Via), Bind* and allocation messages
//! reach `Peer::handle_disco`; raw bytes, time and outgoing traffic drive the rest. Checked:
//! * the counters add up (every handled packet is accepted or counted under one drop reason),
//!   and `Ok(node)` names the peer that sealed it;
//! * a peer's own sealed, parseable message over UDP is accepted; over DERP from another node key
//!   it is refused; bytes no peer sealed are never accepted and cause no packet and no event;
//! * every outgoing packet opens with its peer's key and parses;
//! * a Ping over DERP is answered by a Pong over DERP, a new Ping over UDP by a Pong to its
//!   source carrying that source; an allocation request over DERP naming the sender becomes a
//!   `RelayAllocRequest` event, over UDP never.

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
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 1 => super::disco_ops::run(rest),
        Some((_, rest)) => codec(rest),
        None => {}
    }
}

fn codec(data: &[u8]) {
    if let Ok(msg) = disco::parse(data) {
        if canonical(&msg) {
            let wire = disco::to_vec(&msg);
            assert_eq!(disco::parse(&wire).as_ref(), Ok(&msg));
        }
    }
    if let Ok(packet) = disco::parse_packet(data) {
        assert_eq!(packet.sealed.len() + 38, data.len());
        // A fixed key pair: opening must fail cleanly (or, astronomically rarely, succeed).
        // Built once: X25519 per input would dominate the run time.
        static SHARED: std::sync::OnceLock<tern::naclbox::SharedBox> = std::sync::OnceLock::new();
        let shared = SHARED.get_or_init(|| tern::naclbox::SharedBox::new(&[7; 32], &[9; 32]));
        let _ = disco::open(shared, &packet);
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
