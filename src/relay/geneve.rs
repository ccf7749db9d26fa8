//! The Geneve header (RFC 8926 fixed part, no options) that peer relays put in front of disco and
//! WireGuard datagrams. Pure codec.
//!
//! ```text
//! byte 0   version (2 bits) | options length (6 bits, 0)
//! byte 1   0x80 = control (O bit); other bits 0
//! 2..4     protocol, BE: 0x7A11 disco, 0x7A12 WireGuard
//! 4..7     VNI, 24-bit BE
//! byte 7   reserved, 0
//! ```

use bytes::BufMut;

/// Length of the header we read and write (no options).
pub const HEADER_LEN: usize = 8;
/// Protocol type of a disco payload.
pub const PROTOCOL_DISCO: u16 = 0x7A11;
/// Protocol type of a WireGuard payload.
pub const PROTOCOL_WIREGUARD: u16 = 0x7A12;
/// Bit of byte 1 that marks a control packet (Bind, Challenge, Answer).
const CONTROL_BIT: u8 = 0x80;
/// Largest VNI (24 bits).
pub const VNI_MAX: u32 = 0x00ff_ffff;

/// A Geneve virtual network identifier: 24 bits, with "unset" distinct from 0 (Go
/// `packet.VirtualNetworkID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Vni(Option<u32>);

impl Vni {
    /// No VNI.
    pub const UNSET: Vni = Vni(None);

    /// A set VNI; values above 24 bits are masked to their low 24 bits (as upstream does).
    pub const fn new(value: u32) -> Vni {
        Vni(Some(value & VNI_MAX))
    }

    /// The 24-bit value (0 when unset).
    pub fn get(self) -> u32 {
        self.0.unwrap_or(0)
    }

    /// Whether a value was set.
    pub fn is_set(self) -> bool {
        self.0.is_some()
    }
}

/// Why a Geneve header cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeneveError {
    /// Fewer than 8 bytes.
    #[error("Geneve header too short ({0} bytes)")]
    TooShort(usize),
    /// Encoding needs a VNI.
    #[error("Geneve VNI unset")]
    VniUnset,
    /// The version field has 2 bits.
    #[error("Geneve version {0} does not fit in 2 bits")]
    BadVersion(u8),
}

/// The fixed Geneve header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 0 for everything Tailscale sends; the decoder does not check it.
    pub version: u8,
    pub protocol: u16,
    /// The O bit: set only on Bind, Challenge and Answer.
    pub control: bool,
    pub vni: Vni,
}

impl Header {
    /// The 8 header bytes.
    pub fn to_bytes(&self) -> Result<[u8; HEADER_LEN], GeneveError> {
        if !self.vni.is_set() {
            return Err(GeneveError::VniUnset);
        }
        if self.version > 3 {
            return Err(GeneveError::BadVersion(self.version));
        }
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.version << 6;
        if self.control {
            b[1] = CONTROL_BIT;
        }
        b[2..4].copy_from_slice(&self.protocol.to_be_bytes());
        b[4..8].copy_from_slice(&(self.vni.get() << 8).to_be_bytes());
        Ok(b)
    }
}

/// Appends the header.
pub fn encode(header: &Header, out: &mut impl BufMut) -> Result<(), GeneveError> {
    out.put_slice(&header.to_bytes()?);
    Ok(())
}

/// Reads the fixed header from the start of `b`, as upstream does: version, control bit, protocol
/// and VNI; options length and reserved bits are not validated (see [`looks_like_tailscale`]).
pub fn parse(b: &[u8]) -> Result<Header, GeneveError> {
    let h: &[u8; HEADER_LEN] = b.first_chunk().ok_or(GeneveError::TooShort(b.len()))?;
    Ok(Header {
        version: h[0] >> 6,
        protocol: u16::from_be_bytes([h[2], h[3]]),
        control: h[1] & CONTROL_BIT != 0,
        vni: Vni::new(u32::from_be_bytes([h[4], h[5], h[6], h[7]]) >> 8),
    })
}

/// The strict check the UDP classifier applies before treating bytes as Geneve (magicsock
/// `packetLooksLike`): version 0, reserved bits of byte 1 and byte 7 zero, and a Tailscale
/// protocol. (Like upstream, the options-length bits are not checked.)
pub fn looks_like_tailscale(b: &[u8]) -> Option<Header> {
    let h: &[u8; HEADER_LEN] = b.first_chunk()?;
    let clean = h[0] & 0xc0 == 0 && h[1] & 0x3f == 0 && h[7] == 0;
    let header = parse(b).ok()?;
    let known = matches!(header.protocol, PROTOCOL_DISCO | PROTOCOL_WIREGUARD);
    (clean && known).then_some(header)
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

    #[test]
    fn header_vectors() {
        let v = vectors();
        let cases = v["header_vectors"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let f = &case["fields"];
            let header = Header {
                version: f["Version"].as_u64().unwrap() as u8,
                protocol: f["Protocol"].as_u64().unwrap() as u16,
                control: f["Control"].as_bool().unwrap(),
                vni: Vni::new(f["VNI"].as_u64().unwrap() as u32),
            };
            let want = case["encoded_hex"].as_str().unwrap();
            let mut out = Vec::new();
            encode(&header, &mut out).unwrap();
            assert_eq!(hex::encode(&out), want);
            assert_eq!(parse(&out), Ok(header));
        }
    }

    #[test]
    fn vni_vectors() {
        let v = vectors();
        for case in v["vni_vectors"].as_array().unwrap() {
            let vni = match case["set"].as_u64() {
                None => Vni::UNSET,
                Some(x) => Vni::new(u32::try_from(x).unwrap()),
            };
            let name = case["name"].as_str().unwrap();
            assert_eq!(
                u64::from(vni.get()),
                case["want_get"].as_u64().unwrap(),
                "{name}"
            );
            assert_eq!(
                vni.is_set(),
                case["want_is_set"].as_bool().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn encode_errors_and_short_input() {
        let mut h = Header {
            version: 0,
            protocol: PROTOCOL_DISCO,
            control: false,
            vni: Vni::UNSET,
        };
        assert_eq!(h.to_bytes(), Err(GeneveError::VniUnset));
        h.vni = Vni::new(7);
        assert_eq!(hex::encode(h.to_bytes().unwrap()), "00007a1100000700");
        h.control = true;
        assert_eq!(hex::encode(h.to_bytes().unwrap()), "00807a1100000700");
        h.version = 4;
        assert_eq!(h.to_bytes(), Err(GeneveError::BadVersion(4)));
        assert_eq!(parse(&[0; 7]), Err(GeneveError::TooShort(7)));
        assert_eq!(looks_like_tailscale(&[0; 7]), None);
    }

    #[test]
    fn strict_check_rejects_unclean_headers() {
        let good = hex::decode("00007a1200000700").unwrap();
        assert!(looks_like_tailscale(&good).is_some());
        for (i, bits) in [
            (0usize, 0x40u8),
            (0, 0x80),
            (1, 0x01),
            (1, 0x20),
            (7, 0x01),
            (2, 0x01),
        ] {
            let mut b = good.clone();
            b[i] |= bits;
            assert_eq!(looks_like_tailscale(&b), None, "byte {i} |= {bits:#x}");
        }
    }
}
