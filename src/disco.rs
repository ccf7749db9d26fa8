//! Disco (discovery) messages, byte-compatible with Tailscale's `disco` package.
//!
//! Two layers, both pure:
//! * the outer packet `magic "TS💬" (6) || sender disco public key (32) || nonce (24) || box`,
//!   sealed and opened with [`crate::naclbox`] ([`seal`], [`open`], [`parse_packet`]);
//! * the inner plaintext `type (1) || version (1) || body` ([`Message`], [`parse`], [`encode`]).
//!
//! Parsers never panic; trailing bytes a message does not use are ignored, as upstream requires.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::BufMut;

use crate::keys::{DiscoPrivate, DiscoPublic, NodePublic, KEY_LEN};
use crate::naclbox::{self, BoxError, SharedBox, NONCE_LEN};
pub use crate::stun::TxId;

/// The 6-byte magic every disco packet starts with ("TS💬").
pub const MAGIC: [u8; 6] = [0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac];
/// Magic + sender key: what the UDP classifier checks (`packetLooksLike`).
pub const CLASSIFY_LEN: usize = MAGIC.len() + KEY_LEN;
/// Magic + sender key + nonce: the shortest packet worth opening.
pub const HEADER_LEN: usize = CLASSIFY_LEN + NONCE_LEN;
/// Length of the encoded endpoint ("ep18"): 16-byte IPv6 (IPv4 mapped) + 2-byte port.
pub const EP_LEN: usize = 18;
/// Length of a transaction ID.
pub const TX_ID_LEN: usize = 12;
/// Wire size of an unpadded Ping with node key (`discoPingSize`).
pub const PING_WIRE_LEN: usize = HEADER_LEN + naclbox::TAG_LEN + 2 + TX_ID_LEN + KEY_LEN;
/// Largest disco message accepted for a padded ping (`MaxDiscoPingSize`).
pub const MAX_PING_SIZE: usize = 65475;
/// Length of the Bind/Challenge/Answer body.
pub const BIND_BODY_LEN: usize = 72;
/// Fixed part of a `UDPRelayEndpoint` body (before the address list).
pub const RELAY_ENDPOINT_FIXED_LEN: usize = 124;
/// Length of the AllocateUDPRelayEndpointRequest body.
pub const ALLOCATE_REQUEST_LEN: usize = 68;

/// Message type bytes.
pub mod msg_type {
    pub const PING: u8 = 0x01;
    pub const PONG: u8 = 0x02;
    pub const CALL_ME_MAYBE: u8 = 0x03;
    pub const BIND_UDP_RELAY_ENDPOINT: u8 = 0x04;
    pub const BIND_UDP_RELAY_ENDPOINT_CHALLENGE: u8 = 0x05;
    pub const BIND_UDP_RELAY_ENDPOINT_ANSWER: u8 = 0x06;
    pub const CALL_ME_MAYBE_VIA: u8 = 0x07;
    pub const ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST: u8 = 0x08;
    pub const ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE: u8 = 0x09;
}

/// Why bytes are not a disco packet or message we can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    /// The packet does not start with the disco magic.
    #[error("not a disco packet (no magic)")]
    NoMagic,
    /// Fewer bytes than the named part needs.
    #[error("disco {what} too short: {len} bytes")]
    TooShort { what: &'static str, len: usize },
    /// A message type this implementation does not know.
    #[error("unknown disco message type {0:#04x}")]
    UnknownType(u8),
    /// A relay endpoint whose address list is empty or not a multiple of 18 bytes.
    #[error("malformed disco UDPRelayEndpoint ({0} bytes)")]
    BadRelayEndpoint(usize),
    /// The NaCl box did not open (wrong keys, tampering, or a peer that restarted).
    #[error("disco box: {0}")]
    Box(#[from] BoxError),
}

/// Ping (0x01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    pub tx_id: TxId,
    /// Sender's node key; a hint only. Encoded only when present.
    pub node_key: Option<NodePublic>,
    /// Zero bytes after the fixed part, for path-MTU probing.
    pub padding: usize,
}

/// Pong (0x02).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    pub tx_id: TxId,
    /// Where the responder saw the ping come from (`127.3.3.40:<region>` over DERP).
    pub src: SocketAddr,
}

/// Body shared by Bind (0x04), Challenge (0x05) and Answer (0x06).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindBody {
    /// Full 32 bits as on the wire; valid VNIs are 1 … 2²⁴−1.
    pub vni: u32,
    pub generation: u32,
    /// Disco key of the other relay client.
    pub remote_key: DiscoPublic,
    /// Server cookie in Challenge and Answer; zero padding in Bind.
    pub challenge: [u8; 32],
}

/// A peer relay server endpoint (body of CallMeMaybeVia, tail of the allocation response).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UdpRelayEndpoint {
    pub server_disco: DiscoPublic,
    /// The two clients' disco keys, smaller first.
    pub client_disco: [DiscoPublic; 2],
    pub lamport_id: u64,
    pub vni: u32,
    /// Go `time.Duration` (int64 nanoseconds) as an unsigned count of nanoseconds.
    pub bind_lifetime: Duration,
    pub steady_state_lifetime: Duration,
    /// Candidate addresses of the relay server; at least one on the wire.
    pub addr_ports: Vec<SocketAddr>,
}

/// AllocateUDPRelayEndpointRequest (0x08).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllocateRequest {
    pub client_disco: [DiscoPublic; 2],
    pub generation: u32,
}

/// AllocateUDPRelayEndpointResponse (0x09).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllocateResponse {
    pub generation: u32,
    pub endpoint: UdpRelayEndpoint,
}

/// A disco message (the plaintext inside the box).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ping(Ping),
    Pong(Pong),
    /// The sender's endpoints (`MyNumber`).
    CallMeMaybe(Vec<SocketAddr>),
    BindUdpRelayEndpoint(BindBody),
    BindUdpRelayEndpointChallenge(BindBody),
    BindUdpRelayEndpointAnswer(BindBody),
    CallMeMaybeVia(UdpRelayEndpoint),
    AllocateUdpRelayEndpointRequest(AllocateRequest),
    AllocateUdpRelayEndpointResponse(AllocateResponse),
}

impl Message {
    /// The type byte of this message.
    pub fn type_byte(&self) -> u8 {
        match self {
            Message::Ping(_) => msg_type::PING,
            Message::Pong(_) => msg_type::PONG,
            Message::CallMeMaybe(_) => msg_type::CALL_ME_MAYBE,
            Message::BindUdpRelayEndpoint(_) => msg_type::BIND_UDP_RELAY_ENDPOINT,
            Message::BindUdpRelayEndpointChallenge(_) => {
                msg_type::BIND_UDP_RELAY_ENDPOINT_CHALLENGE
            }
            Message::BindUdpRelayEndpointAnswer(_) => msg_type::BIND_UDP_RELAY_ENDPOINT_ANSWER,
            Message::CallMeMaybeVia(_) => msg_type::CALL_ME_MAYBE_VIA,
            Message::AllocateUdpRelayEndpointRequest(_) => {
                msg_type::ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST
            }
            Message::AllocateUdpRelayEndpointResponse(_) => {
                msg_type::ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE
            }
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Ping(_) => "ping",
            Message::Pong(_) => "pong",
            Message::CallMeMaybe(_) => "call-me-maybe",
            Message::BindUdpRelayEndpoint(_) => "bind",
            Message::BindUdpRelayEndpointChallenge(_) => "bind-challenge",
            Message::BindUdpRelayEndpointAnswer(_) => "bind-answer",
            Message::CallMeMaybeVia(_) => "call-me-maybe-via",
            Message::AllocateUdpRelayEndpointRequest(_) => "allocate-request",
            Message::AllocateUdpRelayEndpointResponse(_) => "allocate-response",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plaintext codec
// ---------------------------------------------------------------------------------------------

/// Appends the plaintext `type || version 0 || body` of `msg`.
pub fn encode(msg: &Message, out: &mut impl BufMut) {
    out.put_u8(msg.type_byte());
    out.put_u8(0);
    match msg {
        Message::Ping(p) => {
            out.put_slice(&p.tx_id.0);
            if let Some(key) = p.node_key.filter(|k| !k.is_zero()) {
                out.put_slice(key.as_bytes());
            }
            out.put_bytes(0, p.padding);
        }
        Message::Pong(p) => {
            out.put_slice(&p.tx_id.0);
            put_endpoint(out, p.src);
        }
        Message::CallMeMaybe(eps) => eps.iter().for_each(|ep| put_endpoint(out, *ep)),
        Message::BindUdpRelayEndpoint(b)
        | Message::BindUdpRelayEndpointChallenge(b)
        | Message::BindUdpRelayEndpointAnswer(b) => {
            out.put_u32(b.vni);
            out.put_u32(b.generation);
            out.put_slice(b.remote_key.as_bytes());
            out.put_slice(&b.challenge);
        }
        Message::CallMeMaybeVia(ep) => put_relay_endpoint(out, ep),
        Message::AllocateUdpRelayEndpointRequest(r) => {
            out.put_slice(r.client_disco[0].as_bytes());
            out.put_slice(r.client_disco[1].as_bytes());
            out.put_u32(r.generation);
        }
        Message::AllocateUdpRelayEndpointResponse(r) => {
            out.put_u32(r.generation);
            put_relay_endpoint(out, &r.endpoint);
        }
    }
}

/// The plaintext of `msg` as a new vector.
pub fn to_vec(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out);
    out
}

/// Parses a plaintext message. Versions other than 0 are handled as upstream does.
pub fn parse(b: &[u8]) -> Result<Message, DiscoError> {
    let [kind, version, body @ ..] = b else {
        return Err(DiscoError::TooShort {
            what: "message header",
            len: b.len(),
        });
    };
    let (kind, version) = (*kind, *version);
    match kind {
        msg_type::PING => parse_ping(body).map(Message::Ping),
        msg_type::PONG => parse_pong(body).map(Message::Pong),
        msg_type::CALL_ME_MAYBE => Ok(Message::CallMeMaybe(parse_call_me_maybe(version, body))),
        msg_type::BIND_UDP_RELAY_ENDPOINT => parse_bind(body).map(Message::BindUdpRelayEndpoint),
        msg_type::BIND_UDP_RELAY_ENDPOINT_CHALLENGE => {
            parse_bind(body).map(Message::BindUdpRelayEndpointChallenge)
        }
        msg_type::BIND_UDP_RELAY_ENDPOINT_ANSWER => {
            parse_bind(body).map(Message::BindUdpRelayEndpointAnswer)
        }
        msg_type::CALL_ME_MAYBE_VIA if version != 0 => {
            Ok(Message::CallMeMaybeVia(UdpRelayEndpoint::default()))
        }
        msg_type::CALL_ME_MAYBE_VIA => parse_relay_endpoint(body).map(Message::CallMeMaybeVia),
        msg_type::ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST if version != 0 => Ok(
            Message::AllocateUdpRelayEndpointRequest(AllocateRequest::default()),
        ),
        msg_type::ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST => {
            parse_allocate_request(body).map(Message::AllocateUdpRelayEndpointRequest)
        }
        msg_type::ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE if version != 0 => Ok(
            Message::AllocateUdpRelayEndpointResponse(AllocateResponse::default()),
        ),
        msg_type::ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE => {
            parse_allocate_response(body).map(Message::AllocateUdpRelayEndpointResponse)
        }
        other => Err(DiscoError::UnknownType(other)),
    }
}

fn parse_ping(body: &[u8]) -> Result<Ping, DiscoError> {
    let (tx, rest) = take::<TX_ID_LEN>(body, "ping")?;
    // Upstream: if a whole key follows the TxID it is the node key, whatever its value.
    let (node_key, padding) = match take::<KEY_LEN>(rest, "ping") {
        Ok((key, pad)) => {
            let key = NodePublic::from_bytes(key);
            ((!key.is_zero()).then_some(key), pad.len())
        }
        Err(_) => (None, rest.len()),
    };
    Ok(Ping {
        tx_id: TxId(tx),
        node_key,
        padding,
    })
}

fn parse_pong(body: &[u8]) -> Result<Pong, DiscoError> {
    let (tx, rest) = take::<TX_ID_LEN>(body, "pong")?;
    let (ep, _) = take::<EP_LEN>(rest, "pong")?;
    Ok(Pong {
        tx_id: TxId(tx),
        src: endpoint_from(ep),
    })
}

/// Upstream decodes a malformed or non-v0 CallMeMaybe as an empty list, not an error.
fn parse_call_me_maybe(version: u8, body: &[u8]) -> Vec<SocketAddr> {
    if version != 0 || body.is_empty() || !body.len().is_multiple_of(EP_LEN) {
        return Vec::new();
    }
    endpoints_from(body)
}

fn parse_bind(body: &[u8]) -> Result<BindBody, DiscoError> {
    let (vni, rest) = take::<4>(body, "bind")?;
    let (generation, rest) = take::<4>(rest, "bind")?;
    let (remote_key, rest) = take::<KEY_LEN>(rest, "bind")?;
    let (challenge, _) = take::<32>(rest, "bind")?;
    Ok(BindBody {
        vni: u32::from_be_bytes(vni),
        generation: u32::from_be_bytes(generation),
        remote_key: DiscoPublic::from_bytes(remote_key),
        challenge,
    })
}

fn parse_allocate_request(body: &[u8]) -> Result<AllocateRequest, DiscoError> {
    let (a, rest) = take::<KEY_LEN>(body, "allocate request")?;
    let (b, rest) = take::<KEY_LEN>(rest, "allocate request")?;
    let (generation, _) = take::<4>(rest, "allocate request")?;
    Ok(AllocateRequest {
        client_disco: [DiscoPublic::from_bytes(a), DiscoPublic::from_bytes(b)],
        generation: u32::from_be_bytes(generation),
    })
}

fn parse_allocate_response(body: &[u8]) -> Result<AllocateResponse, DiscoError> {
    let (generation, rest) = take::<4>(body, "allocate response")?;
    Ok(AllocateResponse {
        generation: u32::from_be_bytes(generation),
        endpoint: parse_relay_endpoint(rest)?,
    })
}

/// The relay endpoint is the whole rest of the body: no trailing bytes allowed, N ≥ 1 addresses.
fn parse_relay_endpoint(b: &[u8]) -> Result<UdpRelayEndpoint, DiscoError> {
    let addrs_len = b.len().checked_sub(RELAY_ENDPOINT_FIXED_LEN);
    if !matches!(addrs_len, Some(n) if n >= EP_LEN && n.is_multiple_of(EP_LEN)) {
        return Err(DiscoError::BadRelayEndpoint(b.len()));
    }
    let (server, rest) = take::<KEY_LEN>(b, "relay endpoint")?;
    let (c0, rest) = take::<KEY_LEN>(rest, "relay endpoint")?;
    let (c1, rest) = take::<KEY_LEN>(rest, "relay endpoint")?;
    let (lamport, rest) = take::<8>(rest, "relay endpoint")?;
    let (vni, rest) = take::<4>(rest, "relay endpoint")?;
    let (bind, rest) = take::<8>(rest, "relay endpoint")?;
    let (steady, rest) = take::<8>(rest, "relay endpoint")?;
    Ok(UdpRelayEndpoint {
        server_disco: DiscoPublic::from_bytes(server),
        client_disco: [DiscoPublic::from_bytes(c0), DiscoPublic::from_bytes(c1)],
        lamport_id: u64::from_be_bytes(lamport),
        vni: u32::from_be_bytes(vni),
        bind_lifetime: Duration::from_nanos(u64::from_be_bytes(bind)),
        steady_state_lifetime: Duration::from_nanos(u64::from_be_bytes(steady)),
        addr_ports: endpoints_from(rest),
    })
}

fn put_relay_endpoint(out: &mut impl BufMut, ep: &UdpRelayEndpoint) {
    out.put_slice(ep.server_disco.as_bytes());
    out.put_slice(ep.client_disco[0].as_bytes());
    out.put_slice(ep.client_disco[1].as_bytes());
    out.put_u64(ep.lamport_id);
    out.put_u32(ep.vni);
    out.put_u64(duration_nanos(ep.bind_lifetime));
    out.put_u64(duration_nanos(ep.steady_state_lifetime));
    ep.addr_ports.iter().for_each(|a| put_endpoint(out, *a));
}

/// Nanoseconds as a u64, saturating (a Go `time.Duration` cannot be longer anyway).
fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Writes an ep18: IPv6 (IPv4 as `::ffff:a.b.c.d`) and a big-endian port.
pub fn put_endpoint(out: &mut impl BufMut, ep: SocketAddr) {
    let v6 = match ep.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.put_slice(&v6.octets());
    out.put_u16(ep.port());
}

/// Reads an ep18, un-mapping IPv4-mapped addresses.
pub fn endpoint_from(b: [u8; EP_LEN]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let ip = Ipv6Addr::from(ip);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

/// All whole ep18 entries in `b`.
fn endpoints_from(b: &[u8]) -> Vec<SocketAddr> {
    b.chunks_exact(EP_LEN)
        .filter_map(|c| <[u8; EP_LEN]>::try_from(c).ok())
        .map(endpoint_from)
        .collect()
}

/// Splits off the first `N` bytes as an array.
fn take<'a, const N: usize>(
    b: &'a [u8],
    what: &'static str,
) -> Result<([u8; N], &'a [u8]), DiscoError> {
    let (head, rest) = b
        .split_first_chunk::<N>()
        .ok_or(DiscoError::TooShort { what, len: b.len() })?;
    Ok((*head, rest))
}

// ---------------------------------------------------------------------------------------------
// Outer packet
// ---------------------------------------------------------------------------------------------

/// Whether `b` is classified as disco on the UDP socket: magic and a whole sender key.
pub fn looks_like_disco(b: &[u8]) -> bool {
    b.len() >= CLASSIFY_LEN && b.starts_with(&MAGIC)
}

/// The clear header of a disco packet, borrowed from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Sender's disco public key: picks the shared key for [`open`].
    pub sender: DiscoPublic,
    /// `nonce || tag || ciphertext`.
    pub sealed: &'a [u8],
}

/// Splits a disco packet into sender key and sealed box (needs at least [`HEADER_LEN`] bytes).
pub fn parse_packet(b: &[u8]) -> Result<Packet<'_>, DiscoError> {
    if !b.starts_with(&MAGIC) {
        return Err(DiscoError::NoMagic);
    }
    if b.len() < HEADER_LEN {
        return Err(DiscoError::TooShort {
            what: "packet",
            len: b.len(),
        });
    }
    let (sender, _) = take::<KEY_LEN>(&b[MAGIC.len()..], "packet")?;
    Ok(Packet {
        sender: DiscoPublic::from_bytes(sender),
        sealed: &b[MAGIC.len() + KEY_LEN..],
    })
}

/// Opens a packet with the shared key for its sender and parses the message.
pub fn open(shared: &SharedBox, packet: &Packet<'_>) -> Result<Message, DiscoError> {
    let plain = shared.open(packet.sealed)?;
    parse(&plain)
}

/// Builds a whole disco packet from `sender` (our disco public key) with a precomputed box.
pub fn seal_with(shared: &SharedBox, sender: &DiscoPublic, msg: &Message) -> Vec<u8> {
    let sealed = shared.seal(&to_vec(msg));
    let mut out = Vec::with_capacity(MAGIC.len() + KEY_LEN + sealed.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(&sealed);
    out
}

/// Builds a whole disco packet from `me` to `peer`.
pub fn seal(me: &DiscoPrivate, peer: &DiscoPublic, msg: &Message) -> Vec<u8> {
    seal_with(&shared_box(me, peer), &me.public(), msg)
}

/// The precomputed box between our disco key and a peer's (cache it per peer).
pub fn shared_box(me: &DiscoPrivate, peer: &DiscoPublic) -> SharedBox {
    SharedBox::new(me.as_bytes(), peer.as_bytes())
}

#[cfg(test)]
mod tests;
