//! STUN (RFC 5389) binding requests and responses, byte-compatible with Tailscale's `net/stun`.
//!
//! Pure codec: no sockets, no clocks. `parse_*` never panic on any input.
//!
//! Header: type (2) | length (2, bytes after the header) | magic cookie 0x2112a442 | transaction id (12).
//! Requests are Tailscale's 40-byte form: SOFTWARE "tailnode" then FINGERPRINT. Responses carry one
//! XOR-MAPPED-ADDRESS; parsing also takes the 0x8020 variant and falls back to MAPPED-ADDRESS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The RFC 5389 magic cookie.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Header size in bytes.
pub const HEADER_LEN: usize = 20;
/// Message type of a binding request.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Message type of a binding success response.
pub const BINDING_SUCCESS: u16 = 0x0101;
/// MAPPED-ADDRESS attribute.
pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS attribute.
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// XOR-MAPPED-ADDRESS as some pre-RFC servers number it.
pub const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
/// SOFTWARE attribute.
pub const ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT attribute.
pub const ATTR_FINGERPRINT: u16 = 0x8028;
/// What Tailscale puts in SOFTWARE.
pub const SOFTWARE: &[u8] = b"tailnode";
/// XORed into the CRC-32 of a FINGERPRINT ("STUN").
const FINGERPRINT_XOR: u32 = 0x5354_554e;

const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// A 12-byte transaction ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxId(pub [u8; 12]);

impl TxId {
    /// A fresh random transaction ID.
    pub fn random() -> TxId {
        TxId(rand::random())
    }
}

/// Why a packet is not the STUN message we wanted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Shorter than a header, or than its length field says.
    #[error("STUN message truncated")]
    Truncated,
    /// Missing magic cookie or non-zero top bits: not STUN.
    #[error("not a STUN message")]
    NotStun,
    /// A STUN message of another type.
    #[error("unexpected STUN message type {0:#06x}")]
    WrongType(u16),
    /// The length field is not a multiple of 4.
    #[error("STUN length {0} is not a multiple of 4")]
    BadLength(u16),
    /// An attribute runs past the message.
    #[error("STUN attribute {0:#06x} runs past the message")]
    BadAttribute(u16),
    /// A request without SOFTWARE "tailnode".
    #[error("STUN request lacks SOFTWARE \"tailnode\"")]
    NotTailnode,
    /// FINGERPRINT missing, not last, or wrong.
    #[error("STUN FINGERPRINT missing, misplaced or wrong")]
    BadFingerprint,
    /// An address attribute with an unknown family or wrong size.
    #[error("malformed STUN address attribute")]
    BadAddress,
    /// A response without any mapped address.
    #[error("STUN response has no mapped address")]
    NoMappedAddress,
}

/// Whether `b` looks like a STUN message (Tailscale's `stun.Is`): a header with the magic cookie and
/// the top two bits of the type clear.
pub fn is(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] & 0xc0 == 0 && b[4..8] == MAGIC_COOKIE
}

/// Append Tailscale's 40-byte binding request for `tx`.
pub fn encode_request(tx: TxId, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    out.extend_from_slice(&20u16.to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(&tx.0);
    out.extend_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    out.extend_from_slice(&(SOFTWARE.len() as u16).to_be_bytes());
    out.extend_from_slice(SOFTWARE);
    let crc = crc32(&out[start..]) ^ FINGERPRINT_XOR;
    out.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Tailscale's binding request for `tx`.
pub fn request(tx: TxId) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    encode_request(tx, &mut out);
    out
}

/// Append a binding success response for `tx` telling the client it was seen as `addr`.
pub fn encode_response(tx: TxId, addr: SocketAddr, out: &mut Vec<u8>) {
    let ip = canonical_ip(addr.ip());
    let (family, raw): (u8, Vec<u8>) = match ip {
        IpAddr::V4(v4) => (FAMILY_IPV4, v4.octets().to_vec()),
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets().to_vec()),
    };
    let attr_len = 4 + raw.len();
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(&tx.0);
    out.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr_len as u16).to_be_bytes());
    out.push(0);
    out.push(family);
    out.extend_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    let key = xor_key(tx);
    out.extend(raw.iter().zip(key.iter()).map(|(a, k)| a ^ k));
}

/// A binding success response for `tx` and `addr`.
pub fn response(tx: TxId, addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(44);
    encode_response(tx, addr, &mut out);
    out
}

/// A parsed header and the attribute bytes it covers (anything past its length is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Message type (class and method).
    pub msg_type: u16,
    /// Transaction ID.
    pub tx: TxId,
    /// The attributes, exactly as many bytes as the length field says.
    pub attrs: &'a [u8],
    /// Header plus attributes (what a FINGERPRINT covers a prefix of).
    pub whole: &'a [u8],
}

/// Parse a STUN header; bytes beyond the declared length are dropped.
pub fn parse_message(b: &[u8]) -> Result<Message<'_>, StunError> {
    if b.len() < HEADER_LEN {
        return Err(StunError::Truncated);
    }
    if !is(b) {
        return Err(StunError::NotStun);
    }
    let msg_type = u16::from_be_bytes([b[0], b[1]]);
    let length = u16::from_be_bytes([b[2], b[3]]);
    if length & 3 != 0 {
        return Err(StunError::BadLength(length));
    }
    let end = HEADER_LEN + usize::from(length);
    let whole = b.get(..end).ok_or(StunError::Truncated)?;
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&b[8..20]);
    Ok(Message {
        msg_type,
        tx: TxId(tx),
        attrs: &whole[HEADER_LEN..],
        whole,
    })
}

/// One attribute: its type, value, and offset of its header within the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Attribute type.
    pub kind: u16,
    /// Value (without padding).
    pub value: &'a [u8],
    /// Offset of the attribute's header from the start of the message.
    pub offset: usize,
}

/// The message's attributes in order; an attribute that runs past the end is an error.
pub fn attributes<'a>(msg: &Message<'a>) -> Result<Vec<Attr<'a>>, StunError> {
    let mut out = Vec::new();
    let mut rest = msg.attrs;
    let mut offset = HEADER_LEN;
    while !rest.is_empty() {
        let (head, tail) = rest.split_at_checked(4).ok_or(StunError::BadAttribute(0))?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let padded = len.div_ceil(4) * 4;
        let value = tail.get(..len).ok_or(StunError::BadAttribute(kind))?;
        out.push(Attr {
            kind,
            value,
            offset,
        });
        rest = tail.get(padded..).ok_or(StunError::BadAttribute(kind))?;
        offset += 4 + padded;
    }
    Ok(out)
}

/// Parse a binding request as Tailscale's STUN server does: SOFTWARE "tailnode" and a correct
/// FINGERPRINT as the last attribute are required. Returns the transaction ID to answer.
pub fn parse_binding_request(b: &[u8]) -> Result<TxId, StunError> {
    let msg = parse_message(b)?;
    if msg.msg_type != BINDING_REQUEST {
        return Err(StunError::WrongType(msg.msg_type));
    }
    let attrs = attributes(&msg)?;
    if !attrs
        .iter()
        .any(|a| a.kind == ATTR_SOFTWARE && a.value == SOFTWARE)
    {
        return Err(StunError::NotTailnode);
    }
    match attrs.last() {
        Some(last) if last.kind == ATTR_FINGERPRINT => check_fingerprint(&msg, last)?,
        _ => return Err(StunError::BadFingerprint),
    }
    Ok(msg.tx)
}

/// Parse a binding success response: its transaction ID and the address the server saw.
/// XOR-MAPPED-ADDRESS (0x0020 or 0x8020) wins over MAPPED-ADDRESS; IPv4-mapped IPv6 is unmapped.
/// A FINGERPRINT, if present, must be last and correct.
pub fn parse_response(b: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    let msg = parse_message(b)?;
    if msg.msg_type != BINDING_SUCCESS {
        return Err(StunError::WrongType(msg.msg_type));
    }
    let attrs = attributes(&msg)?;
    let mut xor = None;
    let mut plain = None;
    for (i, attr) in attrs.iter().enumerate() {
        match attr.kind {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT if xor.is_none() => {
                xor = Some(decode_address(attr.value, Some(msg.tx))?);
            }
            ATTR_MAPPED_ADDRESS if plain.is_none() => {
                plain = Some(decode_address(attr.value, None)?);
            }
            ATTR_FINGERPRINT => {
                if i + 1 != attrs.len() {
                    return Err(StunError::BadFingerprint);
                }
                check_fingerprint(&msg, attr)?;
            }
            _ => {}
        }
    }
    let addr = xor.or(plain).ok_or(StunError::NoMappedAddress)?;
    Ok((msg.tx, addr))
}

fn check_fingerprint(msg: &Message<'_>, attr: &Attr<'_>) -> Result<(), StunError> {
    let value: [u8; 4] = attr
        .value
        .try_into()
        .map_err(|_| StunError::BadFingerprint)?;
    let covered = msg
        .whole
        .get(..attr.offset)
        .ok_or(StunError::BadFingerprint)?;
    if u32::from_be_bytes(value) == crc32(covered) ^ FINGERPRINT_XOR {
        Ok(())
    } else {
        Err(StunError::BadFingerprint)
    }
}

/// Decode a (XOR-)MAPPED-ADDRESS value; `tx` given means XORed.
fn decode_address(value: &[u8], tx: Option<TxId>) -> Result<SocketAddr, StunError> {
    let (head, raw) = value.split_at_checked(4).ok_or(StunError::BadAddress)?;
    let mut port = u16::from_be_bytes([head[2], head[3]]);
    let key = tx.map(xor_key);
    if key.is_some() {
        port ^= 0x2112;
    }
    let unxor = |i: usize, byte: u8| key.map_or(byte, |k| byte ^ k[i]);
    let ip = match (head[1], raw.len()) {
        (FAMILY_IPV4, 4) => {
            let mut o = [0u8; 4];
            for (i, byte) in raw.iter().enumerate() {
                o[i] = unxor(i, *byte);
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (FAMILY_IPV6, 16) => {
            let mut o = [0u8; 16];
            for (i, byte) in raw.iter().enumerate() {
                o[i] = unxor(i, *byte);
            }
            canonical_ip(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => return Err(StunError::BadAddress),
    };
    Ok(SocketAddr::new(ip, port))
}

/// cookie || transaction id: what XOR-MAPPED-ADDRESS is XORed with.
fn xor_key(tx: TxId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&tx.0);
    key
}

/// IPv4-mapped IPv6 becomes IPv4 (Go's `Unmap`).
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// CRC-32 (IEEE 802.3, reflected, as in zlib and Go's `crc32.ChecksumIEEE`).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/stun.json");
        let text = std::fs::read_to_string(path).expect("read stun.json");
        serde_json::from_str(&text).expect("parse stun.json")
    }

    fn group(name: &str) -> Vec<Value> {
        let all = vectors()[name].as_array().cloned().expect("vector group");
        assert!(!all.is_empty(), "{name} is empty");
        all
    }

    fn bytes(v: &Value, key: &str) -> Vec<u8> {
        hex::decode(v[key].as_str().expect(key)).expect("hex")
    }

    fn txid(v: &Value, key: &str) -> TxId {
        TxId(bytes(v, key).try_into().expect("12-byte txid"))
    }

    fn socket(v: &Value, addr_key: &str, port_key: &str) -> SocketAddr {
        let ip: IpAddr = v[addr_key].as_str().expect("addr").parse().expect("ip");
        SocketAddr::new(ip, v[port_key].as_u64().expect("port") as u16)
    }

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn is_vectors() {
        for v in group("is_vectors") {
            let packet = bytes(&v, "packet_hex");
            assert_eq!(is(&packet), v["want_is_stun"].as_bool().unwrap(), "{v}");
        }
    }

    #[test]
    fn parse_response_vectors() {
        for v in group("parse_response_vectors") {
            let packet = bytes(&v, "packet_hex");
            let (tx, addr) =
                parse_response(&packet).unwrap_or_else(|e| panic!("{}: {e}", v["name"]));
            assert_eq!(tx, txid(&v, "want_txid_hex"), "{}", v["name"]);
            assert_eq!(addr, socket(&v, "want_addr", "want_port"), "{}", v["name"]);
        }
    }

    #[test]
    fn request_vectors() {
        for v in group("request_vectors") {
            let tx = txid(&v, "txid_hex");
            let want = bytes(&v, "packet_hex");
            assert_eq!(request(tx), want);
            assert_eq!(parse_binding_request(&want), Ok(tx));
            assert!(is(&want));
        }
    }

    #[test]
    fn response_vectors() {
        for v in group("response_vectors") {
            let tx = txid(&v, "txid_hex");
            let addr = socket(&v, "addr", "port");
            let want = bytes(&v, "packet_hex");
            assert_eq!(response(tx, addr), want, "{}", v["name"]);
            assert_eq!(parse_response(&want), Ok((tx, addr)), "{}", v["name"]);
        }
    }

    #[test]
    fn request_checks_are_strict() {
        let tx = TxId([7; 12]);
        let good = request(tx);
        let mut bad_crc = good.clone();
        bad_crc[39] ^= 1;
        assert_eq!(
            parse_binding_request(&bad_crc),
            Err(StunError::BadFingerprint)
        );
        let mut other_software = good.clone();
        other_software[24] = b'T';
        assert_eq!(
            parse_binding_request(&other_software),
            Err(StunError::NotTailnode)
        );
        // Without the FINGERPRINT (length fixed up to match).
        let mut no_fp = good[..32].to_vec();
        no_fp[3] = 12;
        assert_eq!(
            parse_binding_request(&no_fp),
            Err(StunError::BadFingerprint)
        );
        assert_eq!(
            parse_binding_request(&response(tx, "1.2.3.4:5".parse().unwrap())),
            Err(StunError::WrongType(BINDING_SUCCESS))
        );
        assert_eq!(
            parse_response(&good),
            Err(StunError::WrongType(BINDING_REQUEST))
        );
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let tx = TxId([1; 12]);
        let good = response(tx, "1.2.3.4:254".parse().unwrap());
        assert_eq!(parse_response(&good[..19]), Err(StunError::Truncated));
        assert_eq!(parse_response(&good[..31]), Err(StunError::Truncated));
        let mut long = good.clone();
        long[3] = 16; // claims 4 more bytes than there are
        assert_eq!(parse_response(&long), Err(StunError::Truncated));
        let mut odd = good.clone();
        odd[3] = 10;
        assert_eq!(parse_response(&odd), Err(StunError::BadLength(10)));
        let mut family = good.clone();
        family[25] = 9;
        assert_eq!(parse_response(&family), Err(StunError::BadAddress));
        let mut attr_len = good.clone();
        attr_len[23] = 12; // attribute runs past the message
        assert_eq!(
            parse_response(&attr_len),
            Err(StunError::BadAttribute(ATTR_XOR_MAPPED_ADDRESS))
        );
        let empty = [&good[..2], &[0, 0], &good[4..20]].concat();
        assert_eq!(parse_response(&empty), Err(StunError::NoMappedAddress));
        let mut not_stun = good.clone();
        not_stun[4] = 0;
        assert_eq!(parse_response(&not_stun), Err(StunError::NotStun));
    }

    #[test]
    fn never_panics_on_prefixes_and_bit_flips() {
        let tx = TxId::random();
        for packet in [
            request(tx),
            response(tx, "[2001:db8::1]:9".parse().unwrap()),
        ] {
            for len in 0..=packet.len() {
                let _ = parse_response(&packet[..len]);
                let _ = parse_binding_request(&packet[..len]);
            }
            for bit in 0..packet.len() * 8 {
                let mut flipped = packet.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                let _ = parse_response(&flipped);
                let _ = parse_binding_request(&flipped);
            }
        }
    }
}
