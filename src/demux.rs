//! Classification of datagrams on the shared UDP socket and of DERP payloads (Go
//! magicsock `packetLooksLike`, `receiveIP`). Pure functions.
//!
//! Order on UDP: STUN binding → Geneve (Tailscale protocols only) → naked disco → WireGuard.
//! The tests are unambiguous: disco starts with `0x54`, STUN needs byte 1 = `0x01`, Geneve needs the
//! low six bits of byte 1 clear, and WireGuard has bytes 1..4 zero.

use crate::disco;
use crate::relay::geneve::{self, Header as GeneveHeader};
use crate::stun;

/// WireGuard handshake initiation type (little-endian u32 1).
const WG_INITIATION_TYPE: [u8; 4] = [1, 0, 0, 0];
/// Size of a WireGuard handshake initiation.
pub const WG_INITIATION_LEN: usize = 148;

/// What an inbound datagram is, with the bytes the next layer should see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A STUN binding message (request or response), whole.
    Stun(&'a [u8]),
    /// A disco packet (starting at the magic); `geneve` is set when it came through a peer relay.
    Disco {
        geneve: Option<GeneveHeader>,
        packet: &'a [u8],
    },
    /// A WireGuard message, with any Geneve header already stripped.
    WireGuard {
        geneve: Option<GeneveHeader>,
        packet: &'a [u8],
    },
}

impl Inbound<'_> {
    /// Whether the datagram came inside a Geneve header (peer relay).
    pub fn is_geneve(&self) -> bool {
        matches!(
            self,
            Inbound::Disco {
                geneve: Some(_),
                ..
            } | Inbound::WireGuard {
                geneve: Some(_),
                ..
            }
        )
    }
}

/// Classifies a datagram received on the magicsock UDP socket.
pub fn classify_udp(b: &[u8]) -> Inbound<'_> {
    if is_stun_binding(b) {
        return Inbound::Stun(b);
    }
    if let Some(header) = geneve::looks_like_tailscale(b) {
        let inner = b.get(geneve::HEADER_LEN..).unwrap_or_default();
        match header.protocol {
            geneve::PROTOCOL_DISCO if disco::looks_like_disco(inner) => {
                return Inbound::Disco {
                    geneve: Some(header),
                    packet: inner,
                };
            }
            // Disco protocol without a disco packet inside: upstream hands the whole datagram to
            // WireGuard, which will reject it.
            geneve::PROTOCOL_DISCO => {
                return Inbound::WireGuard {
                    geneve: None,
                    packet: b,
                }
            }
            _ => {
                return Inbound::WireGuard {
                    geneve: Some(header),
                    packet: inner,
                }
            }
        }
    }
    classify_naked(b)
}

/// Classifies a DERP RecvPacket payload: disco or WireGuard (no STUN, and Geneve is never valid
/// over DERP, so it is left to WireGuard to reject).
pub fn classify_derp(b: &[u8]) -> Inbound<'_> {
    classify_naked(b)
}

fn classify_naked(b: &[u8]) -> Inbound<'_> {
    if disco::looks_like_disco(b) {
        Inbound::Disco {
            geneve: None,
            packet: b,
        }
    } else {
        Inbound::WireGuard {
            geneve: None,
            packet: b,
        }
    }
}

/// A STUN binding request or response (`stun.Is(b) && b[1] == 0x01`).
pub fn is_stun_binding(b: &[u8]) -> bool {
    stun::is(b) && b.get(1) == Some(&0x01)
}

/// Whether `b` is exactly a WireGuard handshake initiation (Go `looksLikeInitiationMsg`).
pub fn looks_like_wireguard_initiation(b: &[u8]) -> bool {
    b.len() == WG_INITIATION_LEN && b.starts_with(&WG_INITIATION_TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/geneve.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        serde_json::from_str(&text).expect("geneve.json is JSON")
    }

    fn kind(i: &Inbound<'_>) -> &'static str {
        match i {
            Inbound::Stun(_) => "STUNBinding",
            Inbound::Disco { .. } => "Disco",
            Inbound::WireGuard { .. } => "WireGuard",
        }
    }

    #[test]
    fn packet_looks_like_vectors() {
        let v = vectors();
        let cases = v["packet_looks_like_vectors"].as_array().unwrap();
        assert_eq!(cases.len(), 12);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            // The STUN case has no fixed bytes upstream (random TxID): build one like it.
            let packet = match case["packet_hex"].as_str() {
                Some(h) => hex::decode(h).unwrap(),
                None => stun::response(stun::TxId::random(), "127.0.0.1:1".parse().unwrap()),
            };
            let got = classify_udp(&packet);
            assert_eq!(kind(&got), case["want_type"].as_str().unwrap(), "{name}");
            assert_eq!(
                got.is_geneve(),
                case["want_is_geneve_encap"].as_bool().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn stun_requests_and_every_response_vector_are_stun() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/stun.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut n = 0;
        for key in ["request_vectors", "response_vectors"] {
            for case in v[key].as_array().unwrap() {
                let b = hex::decode(case["packet_hex"].as_str().unwrap()).unwrap();
                assert!(matches!(classify_udp(&b), Inbound::Stun(_)), "{key} {case}");
                n += 1;
            }
        }
        assert!(n >= 7);
    }

    #[test]
    fn wireguard_initiation_vectors() {
        let v = vectors();
        let cases = v["wireguard_initiation_vectors"]["cases"]
            .as_array()
            .unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let b = hex::decode(case["packet_hex"].as_str().unwrap()).unwrap();
            assert_eq!(
                looks_like_wireguard_initiation(&b),
                case["want"].as_bool().unwrap(),
                "{}",
                case["name"]
            );
            // A real initiation never collides with the other classes.
            assert!(matches!(
                classify_udp(&b),
                Inbound::WireGuard { geneve: None, .. }
            ));
        }
    }

    /// `receive_ip`: what WireGuard gets (`want_ok`, `want_size`) and whether it was Geneve.
    #[test]
    fn receive_ip_vectors() {
        let v = vectors();
        let cases = v["receive_ip_vectors"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let b = hex::decode(case["packet_hex"].as_str().unwrap()).unwrap();
            let (ok, size, geneve) = match classify_udp(&b) {
                Inbound::WireGuard { geneve, packet } => (true, packet.len(), geneve.is_some()),
                _ => (false, 0, false),
            };
            assert_eq!(ok, case["want_ok"].as_bool().unwrap(), "{name}");
            assert_eq!(size as u64, case["want_size"].as_u64().unwrap(), "{name}");
            assert_eq!(
                geneve,
                case["want_is_geneve_encap"].as_bool().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn geneve_disco_hands_over_the_inner_packet() {
        let naked = hex::decode(
            "5453f09f92ac0001000000000000000000000000000000000000000000000000000000001e1f",
        )
        .unwrap();
        let mut b = hex::decode("00007a1100000700").unwrap();
        b.extend_from_slice(&naked);
        match classify_udp(&b) {
            Inbound::Disco {
                geneve: Some(h),
                packet,
            } => {
                assert_eq!(packet, &naked[..]);
                assert_eq!(h.vni.get(), 7);
                assert!(!h.control);
            }
            other => panic!("{other:?}"),
        }
        // Over DERP a Geneve header is not honoured.
        assert!(matches!(
            classify_derp(&b),
            Inbound::WireGuard { geneve: None, .. }
        ));
        assert!(matches!(
            classify_derp(&naked),
            Inbound::Disco { geneve: None, .. }
        ));
        // STUN over DERP is not STUN.
        let stun = stun::request(stun::TxId([1; 12]));
        assert!(matches!(classify_derp(&stun), Inbound::WireGuard { .. }));
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = classify_udp(&b);
            let _ = classify_derp(&b);
        }
    }
}
