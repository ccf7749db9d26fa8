//! DERP frame codec (–2.7). Pure: no sockets, no clocks.
//!
//! A frame is `type[1] || length[u32 BE] || payload[length]`. [`decode`] takes frames off the
//! front of a stream buffer; [`parse`] reads one complete frame; [`Frame::encode`] writes one.
//! Parsing never panics: every malformed input is a [`FrameError`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::keys::{NodePublic, KEY_LEN};

/// Size of the frame header: type byte and big-endian u32 length.
pub const HEADER_LEN: usize = 5;
/// `DERP🔑`, the prefix of the ServerKey payload.
pub const MAGIC: [u8; 8] = *b"DERP\xf0\x9f\x94\x91";
/// DERP protocol version spoken here (v2: RecvPacket carries the source key).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest packet carried in SendPacket/RecvPacket/ForwardPacket (keys excluded).
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame payload a relay accepts after the handshake: a ForwardPacket of a maximal packet.
pub const MAX_FRAME_LEN: usize = 2 * KEY_LEN + MAX_PACKET_SIZE;
/// Largest ClientInfo payload the server accepts (Go: 256 KiB).
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
/// Largest frame payload a client accepts (Go: 1 MiB; also the ServerInfo limit).
pub const MAX_CLIENT_RECV_LEN: usize = 1 << 20;
/// Largest ServerKey payload a client accepts (Go: 1 KiB).
pub const MAX_SERVER_KEY_LEN: usize = 1 << 10;
/// Ping bodies the server accepts: 8 to 1000 bytes; only the first 8 are echoed.
pub const PING_LEN: usize = 8;
/// Upper bound on a Ping body (Go server).
pub const MAX_PING_LEN: usize = 1000;

/// Frame type numbers.
pub mod frame_type {
    pub const SERVER_KEY: u8 = 0x01;
    pub const CLIENT_INFO: u8 = 0x02;
    pub const SERVER_INFO: u8 = 0x03;
    pub const SEND_PACKET: u8 = 0x04;
    pub const RECV_PACKET: u8 = 0x05;
    pub const KEEP_ALIVE: u8 = 0x06;
    pub const NOTE_PREFERRED: u8 = 0x07;
    pub const PEER_GONE: u8 = 0x08;
    pub const PEER_PRESENT: u8 = 0x09;
    pub const FORWARD_PACKET: u8 = 0x0a;
    pub const WATCH_CONNS: u8 = 0x10;
    pub const CLOSE_PEER: u8 = 0x11;
    pub const PING: u8 = 0x12;
    pub const PONG: u8 = 0x13;
    pub const HEALTH: u8 = 0x14;
    pub const RESTARTING: u8 = 0x15;
}
use frame_type as ft;

/// Why a PeerGone was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// 0x00: the peer's last connection closed.
    Disconnected,
    /// 0x01: the server does not know the key a disco packet was sent to.
    NotHere,
    /// Any other byte, kept as received.
    Other(u8),
}

impl PeerGoneReason {
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => Self::Disconnected,
            1 => Self::NotHere,
            other => Self::Other(other),
        }
    }
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Disconnected => 0,
            Self::NotHere => 1,
            Self::Other(b) => b,
        }
    }
}

/// PeerPresent flag bits.
pub mod peer_present_flags {
    pub const IS_REGULAR: u8 = 1;
    pub const IS_MESH_PEER: u8 = 2;
    pub const IS_PROBER: u8 = 4;
    pub const NOT_IDEAL: u8 = 8;
}

/// One DERP frame. Payloads are `Bytes` so decoding from a stream buffer does not copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// S→C: the server's public key (bytes after the first 40 are ignored).
    ServerKey { key: NodePublic },
    /// C→S: the client's key and a box sealed to the server holding ClientInfo JSON.
    ClientInfo { key: NodePublic, sealed: Bytes },
    /// S→C: a box sealed to the client holding ServerInfo JSON.
    ServerInfo { sealed: Bytes },
    /// C→S: relay `packet` to `dst`.
    SendPacket { dst: NodePublic, packet: Bytes },
    /// S→C: `packet` from `src`.
    RecvPacket { src: NodePublic, packet: Bytes },
    /// S→C: liveness only.
    KeepAlive,
    /// C→S: whether this server is the client's home.
    NotePreferred { preferred: bool },
    /// S→C: `peer` is no longer (or not) connected.
    PeerGone {
        peer: NodePublic,
        reason: PeerGoneReason,
    },
    /// S→watcher: `peer` connected. `endpoint` and `flags` are absent in older servers' frames.
    PeerPresent {
        peer: NodePublic,
        endpoint: Option<SocketAddr>,
        flags: u8,
    },
    /// Mesh: a packet relayed from another server in the region.
    ForwardPacket {
        src: NodePublic,
        dst: NodePublic,
        packet: Bytes,
    },
    /// Mesh: subscribe to PeerPresent/PeerGone.
    WatchConns,
    /// Mesh: close every connection of `peer`.
    ClosePeer { peer: NodePublic },
    /// Either direction: asks for a Pong with the same 8 bytes.
    Ping { data: [u8; PING_LEN] },
    /// Either direction: answer to a Ping.
    Pong { data: [u8; PING_LEN] },
    /// S→C: a health problem text; empty means healthy again.
    Health { problem: String },
    /// S→C: the server is restarting; advisory reconnect timing.
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// A frame type this codec does not know; receivers skip it.
    Unknown { frame_type: u8, payload: Bytes },
}

/// What is wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces a payload longer than the reader allows.
    #[error("frame type {frame_type:#04x} length {len} exceeds limit {max}")]
    TooLong {
        frame_type: u8,
        len: usize,
        max: usize,
    },
    /// The buffer holds less than the header announces (only from [`parse`]).
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// [`parse`] was given bytes after the frame.
    #[error("{0} trailing bytes after frame")]
    Trailing(usize),
    /// The payload length is not valid for this frame type.
    #[error("frame type {frame_type:#04x}: invalid payload length {len}")]
    BadLength { frame_type: u8, len: usize },
    /// A packet over [`MAX_PACKET_SIZE`].
    #[error("packet of {0} bytes exceeds the {MAX_PACKET_SIZE}-byte limit")]
    PacketTooLarge(usize),
    /// ServerKey without the `DERP🔑` magic.
    #[error("ServerKey frame lacks the DERP magic")]
    BadMagic,
}

/// Reads a frame header: (type, payload length). `None` if fewer than 5 bytes.
pub fn parse_header(buf: &[u8]) -> Option<(u8, usize)> {
    let header: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    Some((header[0], len as usize))
}

/// Takes one complete frame off the front of `buf`.
///
/// `Ok(None)`: need more bytes (`buf` then has room for the rest of the frame). A header
/// announcing more than `max_len` is an error right away, before any payload is buffered. A
/// malformed frame is consumed from `buf` before its error is returned, so a caller may choose
/// to skip it.
pub fn decode(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, FrameError> {
    let frame = take(buf, max_len)?;
    if frame.is_none() {
        if let Some((_, len)) = parse_header(buf) {
            buf.reserve((HEADER_LEN + len).saturating_sub(buf.len()));
        }
    }
    Ok(frame)
}

/// [`decode`] for a caller that makes room for its reads itself: never allocates.
pub fn take(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, FrameError> {
    let Some((frame_type, len)) = parse_header(buf) else {
        return Ok(None);
    };
    if len > max_len {
        return Err(FrameError::TooLong {
            frame_type,
            len,
            max: max_len,
        });
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    parse_payload(frame_type, payload).map(Some)
}

/// Parses exactly one complete frame (header and payload, nothing after).
pub fn parse(bytes: &[u8]) -> Result<Frame, FrameError> {
    let Some((frame_type, len)) = parse_header(bytes) else {
        return Err(FrameError::Truncated {
            need: HEADER_LEN,
            have: bytes.len(),
        });
    };
    let total = HEADER_LEN.saturating_add(len);
    match bytes.len() {
        have if have < total => Err(FrameError::Truncated { need: total, have }),
        have if have > total => Err(FrameError::Trailing(have - total)),
        _ => parse_payload(frame_type, Bytes::copy_from_slice(&bytes[HEADER_LEN..])),
    }
}

/// Interprets a payload of the given frame type.
pub fn parse_payload(frame_type: u8, payload: Bytes) -> Result<Frame, FrameError> {
    let len = payload.len();
    let bad_len = || FrameError::BadLength { frame_type, len };
    let frame = match frame_type {
        ft::SERVER_KEY => {
            if len < MAGIC.len() + KEY_LEN {
                return Err(bad_len());
            }
            if payload[..MAGIC.len()] != MAGIC {
                return Err(FrameError::BadMagic);
            }
            Frame::ServerKey {
                key: key_at(&payload, MAGIC.len()).ok_or_else(bad_len)?,
            }
        }
        ft::CLIENT_INFO => {
            if len < KEY_LEN + crate::naclbox::NONCE_LEN {
                return Err(bad_len());
            }
            Frame::ClientInfo {
                key: key_at(&payload, 0).ok_or_else(bad_len)?,
                sealed: payload.slice(KEY_LEN..),
            }
        }
        ft::SERVER_INFO => {
            if len < crate::naclbox::NONCE_LEN {
                return Err(bad_len());
            }
            Frame::ServerInfo { sealed: payload }
        }
        ft::SEND_PACKET | ft::RECV_PACKET => {
            let key = key_at(&payload, 0).ok_or_else(bad_len)?;
            let packet = payload.slice(KEY_LEN..);
            check_packet_size(&packet)?;
            if frame_type == ft::SEND_PACKET {
                Frame::SendPacket { dst: key, packet }
            } else {
                Frame::RecvPacket { src: key, packet }
            }
        }
        ft::FORWARD_PACKET => {
            let src = key_at(&payload, 0).ok_or_else(bad_len)?;
            let dst = key_at(&payload, KEY_LEN).ok_or_else(bad_len)?;
            let packet = payload.slice(2 * KEY_LEN..);
            check_packet_size(&packet)?;
            Frame::ForwardPacket { src, dst, packet }
        }
        // Go clients treat KeepAlive as activity and ignore any body.
        ft::KEEP_ALIVE => Frame::KeepAlive,
        ft::NOTE_PREFERRED => match payload.as_ref() {
            [b] => Frame::NotePreferred { preferred: *b != 0 },
            _ => return Err(bad_len()),
        },
        ft::PEER_GONE => {
            let peer = key_at(&payload, 0).ok_or_else(bad_len)?;
            let reason = PeerGoneReason::from_byte(payload.get(KEY_LEN).copied().unwrap_or(0));
            Frame::PeerGone { peer, reason }
        }
        ft::PEER_PRESENT => parse_peer_present(&payload).ok_or_else(bad_len)?,
        ft::WATCH_CONNS if len == 0 => Frame::WatchConns,
        ft::WATCH_CONNS => return Err(bad_len()),
        ft::CLOSE_PEER if len == KEY_LEN => Frame::ClosePeer {
            peer: key_at(&payload, 0).ok_or_else(bad_len)?,
        },
        ft::CLOSE_PEER => return Err(bad_len()),
        ft::PING | ft::PONG => {
            if !(PING_LEN..=MAX_PING_LEN).contains(&len) {
                return Err(bad_len());
            }
            let data: [u8; PING_LEN] = payload[..PING_LEN].try_into().map_err(|_| bad_len())?;
            if frame_type == ft::PING {
                Frame::Ping { data }
            } else {
                Frame::Pong { data }
            }
        }
        ft::HEALTH => Frame::Health {
            problem: String::from_utf8_lossy(&payload).into_owned(),
        },
        ft::RESTARTING => {
            let reconnect_in_ms = be_u32_at(&payload, 0).ok_or_else(bad_len)?;
            let try_for_ms = be_u32_at(&payload, 4).ok_or_else(bad_len)?;
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            }
        }
        other => Frame::Unknown {
            frame_type: other,
            payload,
        },
    };
    Ok(frame)
}

fn check_packet_size(packet: &[u8]) -> Result<(), FrameError> {
    if packet.len() > MAX_PACKET_SIZE {
        return Err(FrameError::PacketTooLarge(packet.len()));
    }
    Ok(())
}

fn key_at(payload: &[u8], offset: usize) -> Option<NodePublic> {
    let raw: [u8; KEY_LEN] = payload
        .get(offset..offset.checked_add(KEY_LEN)?)?
        .try_into()
        .ok()?;
    Some(NodePublic::from_bytes(raw))
}

fn be_u32_at(payload: &[u8], offset: usize) -> Option<u32> {
    let raw: [u8; 4] = payload
        .get(offset..offset.checked_add(4)?)?
        .try_into()
        .ok()?;
    Some(u32::from_be_bytes(raw))
}

/// PeerPresent: key (32), then optionally ip (16) + port (2), then optionally flags (1).
fn parse_peer_present(payload: &[u8]) -> Option<Frame> {
    let peer = key_at(payload, 0)?;
    let mut endpoint = None;
    if let Some(addr) = payload.get(KEY_LEN..KEY_LEN + 18) {
        let ip: [u8; 16] = addr.get(..16)?.try_into().ok()?;
        let port = u16::from_be_bytes([*addr.get(16)?, *addr.get(17)?]);
        let ip = Ipv6Addr::from(ip);
        let ip = match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip),
        };
        endpoint = Some(SocketAddr::new(ip, port));
    }
    let flags = payload.get(KEY_LEN + 18).copied().unwrap_or(0);
    Some(Frame::PeerPresent {
        peer,
        endpoint,
        flags,
    })
}

/// Writes a frame header.
pub fn put_header(out: &mut impl BufMut, frame_type: u8, len: usize) {
    out.put_u8(frame_type);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// Writes a RecvPacket frame without building a [`Frame`] (the relay's hot path).
pub fn put_recv_packet(out: &mut impl BufMut, src: &NodePublic, packet: &[u8]) {
    put_header(out, ft::RECV_PACKET, KEY_LEN + packet.len());
    out.put_slice(src.as_bytes());
    out.put_slice(packet);
}

/// Writes a SendPacket frame without building a [`Frame`].
pub fn put_send_packet(out: &mut impl BufMut, dst: &NodePublic, packet: &[u8]) {
    put_header(out, ft::SEND_PACKET, KEY_LEN + packet.len());
    out.put_slice(dst.as_bytes());
    out.put_slice(packet);
}

impl Frame {
    /// The frame type byte.
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::ServerKey { .. } => ft::SERVER_KEY,
            Frame::ClientInfo { .. } => ft::CLIENT_INFO,
            Frame::ServerInfo { .. } => ft::SERVER_INFO,
            Frame::SendPacket { .. } => ft::SEND_PACKET,
            Frame::RecvPacket { .. } => ft::RECV_PACKET,
            Frame::KeepAlive => ft::KEEP_ALIVE,
            Frame::NotePreferred { .. } => ft::NOTE_PREFERRED,
            Frame::PeerGone { .. } => ft::PEER_GONE,
            Frame::PeerPresent { .. } => ft::PEER_PRESENT,
            Frame::ForwardPacket { .. } => ft::FORWARD_PACKET,
            Frame::WatchConns => ft::WATCH_CONNS,
            Frame::ClosePeer { .. } => ft::CLOSE_PEER,
            Frame::Ping { .. } => ft::PING,
            Frame::Pong { .. } => ft::PONG,
            Frame::Health { .. } => ft::HEALTH,
            Frame::Restarting { .. } => ft::RESTARTING,
            Frame::Unknown { frame_type, .. } => *frame_type,
        }
    }

    /// Payload length on the wire.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::ServerKey { .. } => MAGIC.len() + KEY_LEN,
            Frame::ClientInfo { sealed, .. } => KEY_LEN + sealed.len(),
            Frame::ServerInfo { sealed } => sealed.len(),
            Frame::SendPacket { packet, .. } | Frame::RecvPacket { packet, .. } => {
                KEY_LEN + packet.len()
            }
            Frame::KeepAlive | Frame::WatchConns => 0,
            Frame::NotePreferred { .. } => 1,
            Frame::PeerGone { .. } => KEY_LEN + 1,
            Frame::PeerPresent {
                endpoint: None,
                flags: 0,
                ..
            } => KEY_LEN,
            Frame::PeerPresent { .. } => KEY_LEN + 16 + 2 + 1,
            Frame::ForwardPacket { packet, .. } => 2 * KEY_LEN + packet.len(),
            Frame::ClosePeer { .. } => KEY_LEN,
            Frame::Ping { .. } | Frame::Pong { .. } => PING_LEN,
            Frame::Health { problem } => problem.len(),
            Frame::Restarting { .. } => 8,
            Frame::Unknown { payload, .. } => payload.len(),
        }
    }

    /// Appends the frame (header and payload) to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        put_header(out, self.frame_type(), self.payload_len());
        match self {
            Frame::ServerKey { key } => {
                out.put_slice(&MAGIC);
                out.put_slice(key.as_bytes());
            }
            Frame::ClientInfo { key, sealed } => {
                out.put_slice(key.as_bytes());
                out.put_slice(sealed);
            }
            Frame::ServerInfo { sealed } => out.put_slice(sealed),
            Frame::SendPacket { dst: key, packet } | Frame::RecvPacket { src: key, packet } => {
                out.put_slice(key.as_bytes());
                out.put_slice(packet);
            }
            Frame::KeepAlive | Frame::WatchConns => {}
            Frame::NotePreferred { preferred } => out.put_u8(u8::from(*preferred)),
            Frame::PeerGone { peer, reason } => {
                out.put_slice(peer.as_bytes());
                out.put_u8(reason.to_byte());
            }
            Frame::PeerPresent {
                peer,
                endpoint: None,
                flags: 0,
            } => out.put_slice(peer.as_bytes()),
            Frame::PeerPresent {
                peer,
                endpoint,
                flags,
            } => {
                out.put_slice(peer.as_bytes());
                let (ip, port) = match endpoint {
                    Some(SocketAddr::V4(a)) => (a.ip().to_ipv6_mapped(), a.port()),
                    Some(SocketAddr::V6(a)) => (*a.ip(), a.port()),
                    None => (Ipv6Addr::UNSPECIFIED, 0),
                };
                out.put_slice(&ip.octets());
                out.put_u16(port);
                out.put_u8(*flags);
            }
            Frame::ForwardPacket { src, dst, packet } => {
                out.put_slice(src.as_bytes());
                out.put_slice(dst.as_bytes());
                out.put_slice(packet);
            }
            Frame::ClosePeer { peer } => out.put_slice(peer.as_bytes()),
            Frame::Ping { data } | Frame::Pong { data } => out.put_slice(data),
            Frame::Health { problem } => out.put_slice(problem.as_bytes()),
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                out.put_u32(*reconnect_in_ms);
                out.put_u32(*try_for_ms);
            }
            Frame::Unknown { payload, .. } => out.put_slice(payload),
        }
    }

    /// The encoded frame as a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload_len());
        self.encode(&mut out);
        out
    }
}

/// Whether a relayed packet is a disco message (magic `TS💬` and at least the 62-byte minimum).
pub fn looks_like_disco(packet: &[u8]) -> bool {
    const DISCO_MAGIC: &[u8] = b"TS\xf0\x9f\x92\xac";
    packet.len() >= 62 && packet.starts_with(DISCO_MAGIC)
}

/// The JSON inside a ClientInfo box (Go `derp.ClientInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Mesh key of a privileged client (other servers in the region), if any.
    pub mesh_key: Option<[u8; 32]>,
    /// Protocol version; Go clients send 2.
    pub version: i64,
    /// The client answers Ping frames.
    pub can_ack_pings: bool,
    /// The client is a prober (affects PeerPresent flags only).
    pub is_prober: bool,
}

/// The JSON inside a ServerInfo box (Go `derp.ServerInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: i64,
    /// Optional client send rate limit (Go never sends it); 0 = none.
    pub token_bucket_bytes_per_second: i64,
    pub token_bucket_bytes_burst: i64,
}

/// Why ClientInfo/ServerInfo JSON was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("JSON value is not an object")]
    NotObject,
    #[error("field {0} has the wrong type")]
    WrongType(&'static str),
    #[error("invalid mesh key: want 64 hex digits")]
    BadMeshKey,
}

/// Object members with Go's key matching: case-insensitive, later duplicates win, `null` skipped.
fn members(json: &[u8]) -> Result<Vec<(String, serde_json::Value)>, InfoError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| InfoError::Json(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(InfoError::NotObject);
    };
    Ok(map
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect())
}

fn int_field(v: &serde_json::Value, name: &'static str) -> Result<i64, InfoError> {
    v.as_i64().ok_or(InfoError::WrongType(name))
}

fn bool_field(v: &serde_json::Value, name: &'static str) -> Result<bool, InfoError> {
    v.as_bool().ok_or(InfoError::WrongType(name))
}

impl ClientInfo {
    /// What a regular tern client sends: `{"version":2,"CanAckPings":true}`.
    pub fn regular() -> Self {
        ClientInfo {
            mesh_key: None,
            version: i64::from(PROTOCOL_VERSION),
            can_ack_pings: true,
            is_prober: false,
        }
    }

    /// Parses the JSON the way Go's `encoding/json` does for this struct.
    pub fn from_json(json: &[u8]) -> Result<Self, InfoError> {
        let mut info = ClientInfo::default();
        for (key, value) in members(json)? {
            match key.as_str() {
                "meshkey" => {
                    let text = value.as_str().ok_or(InfoError::WrongType("meshKey"))?;
                    let key =
                        crate::keys::parse_bare_hex(text).map_err(|_| InfoError::BadMeshKey)?;
                    info.mesh_key = Some(key);
                }
                "version" => info.version = int_field(&value, "version")?,
                "canackpings" => info.can_ack_pings = bool_field(&value, "CanAckPings")?,
                "isprober" => info.is_prober = bool_field(&value, "IsProber")?,
                _ => {}
            }
        }
        Ok(info)
    }

    /// Encodes exactly as Go's `json.Marshal` does (field order and omitempty rules).
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        if let Some(key) = &self.mesh_key {
            out.push_str(&format!("\"meshKey\":\"{}\",", hex::encode(key)));
        }
        if self.version != 0 {
            out.push_str(&format!("\"version\":{},", self.version));
        }
        out.push_str(&format!("\"CanAckPings\":{}", self.can_ack_pings));
        if self.is_prober {
            out.push_str(",\"IsProber\":true");
        }
        out.push('}');
        out
    }
}

impl ServerInfo {
    /// What the server sends: `{"version":2}`.
    pub fn current() -> Self {
        ServerInfo {
            version: i64::from(PROTOCOL_VERSION),
            ..Default::default()
        }
    }

    pub fn from_json(json: &[u8]) -> Result<Self, InfoError> {
        let mut info = ServerInfo::default();
        for (key, value) in members(json)? {
            match key.as_str() {
                "version" => info.version = int_field(&value, "version")?,
                "tokenbucketbytespersecond" => {
                    info.token_bucket_bytes_per_second =
                        int_field(&value, "TokenBucketBytesPerSecond")?
                }
                "tokenbucketbytesburst" => {
                    info.token_bucket_bytes_burst = int_field(&value, "TokenBucketBytesBurst")?
                }
                _ => {}
            }
        }
        Ok(info)
    }

    pub fn to_json(&self) -> String {
        let mut parts = Vec::new();
        if self.version != 0 {
            parts.push(format!("\"version\":{}", self.version));
        }
        if self.token_bucket_bytes_per_second != 0 {
            parts.push(format!(
                "\"TokenBucketBytesPerSecond\":{}",
                self.token_bucket_bytes_per_second
            ));
        }
        if self.token_bucket_bytes_burst != 0 {
            parts.push(format!(
                "\"TokenBucketBytesBurst\":{}",
                self.token_bucket_bytes_burst
            ));
        }
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/derp.json");
        let text = std::fs::read_to_string(path).expect("read derp.json vectors");
        serde_json::from_str(&text).expect("parse derp.json")
    }

    fn hexbytes(v: &Value) -> Vec<u8> {
        hex::decode(v.as_str().expect("hex string")).expect("valid hex")
    }

    fn key_hex(v: &Value) -> NodePublic {
        NodePublic::from_bytes(hexbytes(v).try_into().expect("32-byte key"))
    }

    #[test]
    fn client_recv_vectors() {
        let v = vectors();
        let cases = v["client_recv_vectors"].as_array().unwrap();
        assert_eq!(cases.len(), 5);
        for case in cases {
            let bytes = hexbytes(&case["frame_hex"]);
            let frame = parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
            let want = &case["want"];
            let data8 = |w: &Value| -> [u8; 8] { hexbytes(&w["data_hex"]).try_into().unwrap() };
            let expected = match want["message"].as_str().unwrap() {
                "PingMessage" => Frame::Ping { data: data8(want) },
                "PongMessage" => Frame::Pong { data: data8(want) },
                "HealthMessage" => Frame::Health {
                    problem: want["Problem"].as_str().unwrap().to_string(),
                },
                "ServerRestartingMessage" => Frame::Restarting {
                    reconnect_in_ms: want["ReconnectIn_ms"].as_u64().unwrap() as u32,
                    try_for_ms: want["TryFor_ms"].as_u64().unwrap() as u32,
                },
                other => panic!("unexpected message {other}"),
            };
            assert_eq!(frame, expected, "{}", case["name"]);
            assert_eq!(frame.to_vec(), bytes, "re-encode {}", case["name"]);
        }
    }

    #[test]
    fn client_send_vectors() {
        let v = vectors();
        for case in v["client_send_vectors"].as_array().unwrap() {
            let data: [u8; 8] = hexbytes(&case["input"]["data_hex"]).try_into().unwrap();
            let frame = match case["name"].as_str().unwrap() {
                "ping" => Frame::Ping { data },
                "pong" => Frame::Pong { data },
                other => panic!("unexpected {other}"),
            };
            assert_eq!(frame.to_vec(), hexbytes(&case["frame_hex"]));
        }
    }

    #[test]
    fn derived_frame_vectors() {
        let v = vectors();
        let k = |b: u8| NodePublic::from_bytes([b; 32]);
        let hello = Bytes::from_static(b"hello 0->1\n");
        let server_key: NodePublic =
            "nodekey:50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765"
                .parse()
                .unwrap();
        let cases = v["derived_frame_vectors"].as_array().unwrap();
        assert_eq!(cases.len(), 12);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let bytes = hexbytes(&case["frame_hex"]);
            assert_eq!(bytes.len() as u64, case["length"].as_u64().unwrap());
            let expected = match name {
                "server_key" => Frame::ServerKey { key: server_key },
                "send_packet" => Frame::SendPacket {
                    dst: k(2),
                    packet: hello.clone(),
                },
                "recv_packet_v2" => {
                    let want = &case["want"];
                    assert_eq!(want["Data_utf8"].as_str().unwrap().as_bytes(), &hello[..]);
                    Frame::RecvPacket {
                        src: key_hex(&want["Source_hex"]),
                        packet: hello.clone(),
                    }
                }
                "forward_packet" => Frame::ForwardPacket {
                    src: k(1),
                    dst: k(2),
                    packet: hello.clone(),
                },
                "note_preferred_true" => Frame::NotePreferred { preferred: true },
                "note_preferred_false" => Frame::NotePreferred { preferred: false },
                "keep_alive" => Frame::KeepAlive,
                "watch_conns" => Frame::WatchConns,
                "close_peer" => Frame::ClosePeer { peer: k(3) },
                "peer_gone_not_here" | "peer_gone_legacy_no_reason" => {
                    let want = &case["want"];
                    Frame::PeerGone {
                        peer: key_hex(&want["Peer_hex"]),
                        reason: PeerGoneReason::from_byte(want["Reason"].as_u64().unwrap() as u8),
                    }
                }
                "peer_present" => {
                    let want = &case["want"];
                    Frame::PeerPresent {
                        peer: key_hex(&want["Key_hex"]),
                        endpoint: Some(want["IPPort"].as_str().unwrap().parse().unwrap()),
                        flags: want["Flags"].as_u64().unwrap() as u8,
                    }
                }
                other => panic!("unexpected vector {other}"),
            };
            assert_eq!(parse(&bytes).unwrap(), expected, "parse {name}");
            if name != "peer_gone_legacy_no_reason" {
                assert_eq!(expected.to_vec(), bytes, "encode {name}");
            }
        }
    }

    #[test]
    fn peer_present_short_forms() {
        let key = [7u8; 32];
        let only_key = [&[ft::PEER_PRESENT, 0, 0, 0, 32][..], &key].concat();
        assert_eq!(
            parse(&only_key).unwrap(),
            Frame::PeerPresent {
                peer: NodePublic::from_bytes(key),
                endpoint: None,
                flags: 0
            }
        );
        let mut no_flags = vec![ft::PEER_PRESENT, 0, 0, 0, 50];
        no_flags.extend_from_slice(&key);
        no_flags.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        no_flags.extend_from_slice(&[0x01, 0xbb]);
        assert_eq!(
            parse(&no_flags).unwrap(),
            Frame::PeerPresent {
                peer: NodePublic::from_bytes(key),
                endpoint: Some("[::1]:443".parse().unwrap()),
                flags: 0
            }
        );
    }

    #[test]
    fn length_rules() {
        let bad = |bytes: &[u8]| parse(bytes).unwrap_err();
        assert!(matches!(
            bad(&[ft::NOTE_PREFERRED, 0, 0, 0, 2, 1, 1]),
            FrameError::BadLength { .. }
        ));
        assert!(matches!(
            bad(&[ft::NOTE_PREFERRED, 0, 0, 0, 0]),
            FrameError::BadLength { .. }
        ));
        assert!(matches!(
            bad(&[ft::WATCH_CONNS, 0, 0, 0, 1, 0]),
            FrameError::BadLength { .. }
        ));
        assert!(matches!(
            bad(&[ft::PING, 0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7]),
            FrameError::BadLength { .. }
        ));
        assert!(matches!(
            bad(&[ft::SEND_PACKET, 0, 0, 0, 3, 1, 2, 3]),
            FrameError::BadLength { .. }
        ));
        assert!(matches!(
            bad(&[ft::CLOSE_PEER, 0, 0, 0, 1, 1]),
            FrameError::BadLength { .. }
        ));
        assert!(matches!(
            bad(&[ft::RESTARTING, 0, 0, 0, 4, 0, 0, 0, 1]),
            FrameError::BadLength { .. }
        ));
        let mut bad_magic = vec![ft::SERVER_KEY, 0, 0, 0, 40];
        bad_magic.extend_from_slice(&[0u8; 40]);
        assert_eq!(bad(&bad_magic), FrameError::BadMagic);
        // A long ping is accepted; its first 8 bytes are the data.
        let mut long_ping = vec![ft::PING, 0, 0, 0, 20];
        long_ping.extend(1..=20u8);
        assert_eq!(
            parse(&long_ping).unwrap(),
            Frame::Ping {
                data: [1, 2, 3, 4, 5, 6, 7, 8]
            }
        );
        let mut too_long_ping = vec![ft::PING, 0, 0, 3, 0xe9];
        too_long_ping.resize(HEADER_LEN + 1001, 0);
        assert!(matches!(bad(&too_long_ping), FrameError::BadLength { .. }));
    }

    #[test]
    fn oversize_packet_rejected() {
        let mut frame = Vec::new();
        put_send_packet(
            &mut frame,
            &NodePublic::from_bytes([1; 32]),
            &vec![0u8; MAX_PACKET_SIZE + 1],
        );
        assert_eq!(
            parse(&frame).unwrap_err(),
            FrameError::PacketTooLarge(MAX_PACKET_SIZE + 1)
        );
        let mut buf = BytesMut::from(&frame[..]);
        assert!(matches!(
            decode(&mut buf, MAX_FRAME_LEN),
            Err(FrameError::PacketTooLarge(_))
        ));
        let mut buf = BytesMut::from(&frame[..HEADER_LEN]);
        assert!(matches!(
            decode(&mut buf, MAX_PACKET_SIZE),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn stream_decode_handles_partial_frames_and_unknown_types() {
        let mut wire = Vec::new();
        Frame::KeepAlive.encode(&mut wire);
        Frame::Unknown {
            frame_type: 0x0b,
            payload: Bytes::from_static(b"xyz"),
        }
        .encode(&mut wire);
        put_recv_packet(&mut wire, &NodePublic::from_bytes([9; 32]), b"payload");
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(frame) = decode(&mut buf, MAX_FRAME_LEN).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[1],
            Frame::Unknown {
                frame_type: 0x0b,
                payload: Bytes::from_static(b"xyz")
            }
        );
        assert_eq!(
            got[2],
            Frame::RecvPacket {
                src: NodePublic::from_bytes([9; 32]),
                packet: Bytes::from_static(b"payload")
            }
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn parse_rejects_truncated_and_trailing() {
        assert!(matches!(parse(&[]), Err(FrameError::Truncated { .. })));
        assert!(matches!(
            parse(&[ft::PING, 0, 0, 0, 8, 1]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&[ft::KEEP_ALIVE, 0, 0, 0, 0, 1]),
            Err(FrameError::Trailing(1))
        ));
        assert!(matches!(
            parse(&[ft::PING, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn client_info_unmarshal_vectors() {
        let v = vectors();
        let cases = v["client_info_unmarshal_vectors"].as_array().unwrap();
        assert_eq!(cases.len(), 5);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let got = ClientInfo::from_json(case["json"].as_str().unwrap().as_bytes());
            if let Some(err) = case["want_error_contains"].as_str() {
                let e = got.expect_err(name);
                assert!(e.to_string().contains(err), "{name}: {e}");
                continue;
            }
            let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = &case["want"];
            let mesh = want["MeshKey_hex"]
                .as_str()
                .map(|h| <[u8; 32]>::try_from(hex::decode(h).unwrap()).unwrap());
            assert_eq!(
                got,
                ClientInfo {
                    mesh_key: mesh,
                    version: want["Version"].as_i64().unwrap(),
                    can_ack_pings: want["CanAckPings"].as_bool().unwrap(),
                    is_prober: want["IsProber"].as_bool().unwrap(),
                },
                "{name}"
            );
        }
    }

    #[test]
    fn derived_json_vectors() {
        let v = vectors();
        let mut seen = 0;
        for case in v["derived_json_vectors"].as_array().unwrap() {
            let json = case["json"].as_str().unwrap();
            let name = case["name"].as_str().unwrap();
            if name == "server_info" {
                assert_eq!(ServerInfo::current().to_json(), json);
                assert_eq!(
                    ServerInfo::from_json(json.as_bytes()).unwrap(),
                    ServerInfo::current()
                );
            } else {
                let info = ClientInfo::from_json(json.as_bytes()).unwrap();
                assert_eq!(info.to_json(), json, "{name}");
                if name == "client_info_regular_client" {
                    assert_eq!(info, ClientInfo::regular());
                }
            }
            seen += 1;
        }
        assert_eq!(seen, 4);
    }

    #[test]
    fn info_json_errors() {
        assert!(matches!(
            ClientInfo::from_json(b"[1]"),
            Err(InfoError::NotObject)
        ));
        assert!(matches!(
            ClientInfo::from_json(b"{"),
            Err(InfoError::Json(_))
        ));
        assert!(matches!(
            ClientInfo::from_json(br#"{"meshKey":""}"#),
            Err(InfoError::BadMeshKey)
        ));
        assert!(matches!(
            ClientInfo::from_json(br#"{"version":"2"}"#),
            Err(InfoError::WrongType(_))
        ));
        // Go ignores snake_case spellings and unknown keys.
        assert_eq!(
            ClientInfo::from_json(br#"{"can_ack_pings":true,"x":1}"#).unwrap(),
            ClientInfo::default()
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&data);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode(&mut buf, 100) {}
        }

        #[test]
        fn encode_parse_round_trip(ty in proptest::num::u8::ANY, body in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
            if let Ok(frame) = parse_payload(ty, Bytes::from(body)) {
                let wire = frame.to_vec();
                proptest::prop_assert_eq!(parse(&wire).unwrap(), frame);
            }
        }
    }
}
