//! Map-stream framing: `[u32 LITTLE-endian length][payload]…`, each
//! payload a zstd frame of the JSON `MapResponse` when the request said `Compress:"zstd"`, raw
//! JSON otherwise. Pure: bytes in, messages out.

use std::io::Read;

use crate::control::tailcfg::MapResponse;

/// Default bound on a payload, compressed or not (a 10,000-peer map is a few MiB).
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 64 << 20;
/// zstd level we compress with (zstd's default; the Go client accepts any level).
pub const ZSTD_LEVEL: i32 = 3;
const LEN_PREFIX: usize = 4;

/// How payloads are encoded on this stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw JSON (`Compress: ""`).
    None,
    /// One zstd frame per message (`Compress: "zstd"`).
    Zstd,
}

impl Compression {
    /// The encoding a `MapRequest.Compress` value asks for; unknown values are an error.
    pub fn from_request(compress: &str) -> Result<Compression, FrameError> {
        match compress {
            "" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            other => Err(FrameError::UnknownCompression(other.to_owned())),
        }
    }
}

/// Errors of the map stream; all end the stream (the client then restarts its poll).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A message (announced or decompressed) exceeds the size limit.
    #[error("map message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// A zero-length payload (Go clients fail on it too).
    #[error("empty map message")]
    EmptyPayload,
    /// zstd failed.
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    /// JSON encoding or decoding failed.
    #[error("map JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// `Compress` had a value we do not implement.
    #[error("unsupported compression {0:?}")]
    UnknownCompression(String),
    /// An earlier error poisoned this decoder.
    #[error("map stream poisoned by an earlier error")]
    Poisoned,
}

/// Encodes `payload` (already JSON) as one frame: length prefix plus (compressed) payload.
pub fn encode_frame(json: &[u8], compression: Compression) -> Result<Vec<u8>, FrameError> {
    let payload = match compression {
        Compression::None => json.to_vec(),
        Compression::Zstd => zstd::bulk::compress(json, ZSTD_LEVEL).map_err(FrameError::Zstd)?,
    };
    if payload.is_empty() {
        return Err(FrameError::EmptyPayload);
    }
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(LEN_PREFIX + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Encodes one `MapResponse` as a frame.
pub fn encode_map_response(
    resp: &MapResponse,
    compression: Compression,
) -> Result<Vec<u8>, FrameError> {
    encode_frame(&serde_json::to_vec(resp)?, compression)
}

/// Decompresses (if needed) one payload, bounded by `max_len` bytes of output.
pub fn decode_payload(
    payload: &[u8],
    compression: Compression,
    max_len: usize,
) -> Result<Vec<u8>, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::EmptyPayload);
    }
    match compression {
        Compression::None => Ok(payload.to_vec()),
        Compression::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::with_buffer(payload).map_err(FrameError::Zstd)?;
            let mut out = Vec::new();
            decoder
                .take(max_len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(FrameError::Zstd)?;
            if out.len() > max_len {
                return Err(FrameError::TooLarge {
                    len: out.len(),
                    max: max_len,
                });
            }
            Ok(out)
        }
    }
}

/// Incremental decoder of a map response body: push body bytes, pull messages.
/// The first error poisons it.
#[derive(Debug)]
pub struct MapFrameDecoder {
    compression: Compression,
    max_len: usize,
    buf: Vec<u8>,
    pos: usize,
    poisoned: bool,
}

impl MapFrameDecoder {
    /// A decoder with the default size limit.
    pub fn new(compression: Compression) -> Self {
        Self::with_max_len(compression, DEFAULT_MAX_MESSAGE_LEN)
    }

    /// A decoder that rejects messages above `max_len` bytes (compressed or decompressed).
    pub fn with_max_len(compression: Compression, max_len: usize) -> Self {
        MapFrameDecoder {
            compression,
            max_len,
            buf: Vec::new(),
            pos: 0,
            poisoned: false,
        }
    }

    /// Buffers body bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet consumed (non-zero at end of body = truncated message).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next message's JSON bytes (decompressed), or `None` if incomplete.
    pub fn next_json(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let result = self.next_json_inner();
        if result.is_err() {
            self.poisoned = true;
            self.buf = Vec::new();
            self.pos = 0;
        }
        result
    }

    fn next_json_inner(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let avail = &self.buf[self.pos..];
        let Some(prefix) = avail.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let Some(payload) = avail.get(LEN_PREFIX..LEN_PREFIX + len) else {
            return Ok(None);
        };
        let json = decode_payload(payload, self.compression, self.max_len)?;
        self.pos += LEN_PREFIX + len;
        Ok(Some(json))
    }

    /// The next decoded `MapResponse`, or `None` if incomplete.
    pub fn next_frame(&mut self) -> Result<Option<MapResponse>, FrameError> {
        let Some(json) = self.next_json()? else {
            return Ok(None);
        };
        match serde_json::from_slice(&json) {
            Ok(resp) => Ok(Some(resp)),
            Err(e) => {
                self.poisoned = true;
                Err(FrameError::Json(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tailcfg::{Node, PeerChange};

    fn sample_messages() -> Vec<MapResponse> {
        let full = MapResponse {
            node: Some(Node {
                id: 1,
                stable_id: "n1".into(),
                name: "a.tailnet.example.".into(),
                ..Node::default()
            }),
            peers: (2..50)
                .map(|id| Node {
                    id,
                    stable_id: format!("n{id}"),
                    ..Node::default()
                })
                .collect(),
            ..MapResponse::default()
        };
        let patch = MapResponse {
            peers_changed_patch: vec![PeerChange {
                node_id: 7,
                derp_region: 900,
                ..PeerChange::default()
            }],
            ..MapResponse::default()
        };
        vec![full, MapResponse::keep_alive(), patch]
    }

    #[test]
    fn length_prefix_is_little_endian() {
        let frame = encode_frame(b"{\"KeepAlive\":true}", Compression::None).unwrap();
        assert_eq!(frame[..4], [18, 0, 0, 0]);
        assert_eq!(&frame[4..], b"{\"KeepAlive\":true}");
        let z = encode_map_response(&MapResponse::keep_alive(), Compression::Zstd).unwrap();
        let len = u32::from_le_bytes([z[0], z[1], z[2], z[3]]) as usize;
        assert_eq!(len, z.len() - 4);
        assert_eq!(z[4..8], [0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    }

    #[test]
    fn round_trip_byte_by_byte_both_compressions() {
        for compression in [Compression::None, Compression::Zstd] {
            let msgs = sample_messages();
            let mut wire = Vec::new();
            for m in &msgs {
                wire.extend(encode_map_response(m, compression).unwrap());
            }
            let mut dec = MapFrameDecoder::new(compression);
            let mut got = Vec::new();
            for b in &wire {
                dec.push(std::slice::from_ref(b));
                while let Some(m) = dec.next_frame().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs);
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn raw_json_on_zstd_stream_fails_like_go() {
        let mut dec = MapFrameDecoder::new(Compression::Zstd);
        dec.push(&encode_frame(b"{\"KeepAlive\":true}", Compression::None).unwrap());
        assert!(matches!(dec.next_frame(), Err(FrameError::Zstd(_))));
        assert!(matches!(dec.next_frame(), Err(FrameError::Poisoned)));
    }

    #[test]
    fn empty_and_oversized_messages_are_rejected() {
        let mut dec = MapFrameDecoder::new(Compression::Zstd);
        dec.push(&[0, 0, 0, 0]);
        assert!(matches!(dec.next_frame(), Err(FrameError::EmptyPayload)));

        // Announced length above the limit fails before the payload arrives.
        let mut dec = MapFrameDecoder::with_max_len(Compression::None, 100);
        dec.push(&101u32.to_le_bytes());
        assert!(matches!(
            dec.next_frame(),
            Err(FrameError::TooLarge { len: 101, .. })
        ));

        // A small zstd frame that expands beyond the limit (decompression bomb).
        let big = vec![b' '; 10_000];
        let frame = encode_frame(&big, Compression::Zstd).unwrap();
        assert!(frame.len() < 200);
        let mut dec = MapFrameDecoder::with_max_len(Compression::Zstd, 1000);
        dec.push(&frame);
        assert!(matches!(
            dec.next_frame(),
            Err(FrameError::TooLarge { max: 1000, .. })
        ));
    }

    #[test]
    fn bad_json_is_an_error() {
        let mut dec = MapFrameDecoder::new(Compression::None);
        dec.push(&encode_frame(b"{\"Peers\":7}", Compression::None).unwrap());
        assert!(matches!(dec.next_frame(), Err(FrameError::Json(_))));
    }

    #[test]
    fn compression_from_request() {
        assert_eq!(
            Compression::from_request("zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(Compression::from_request("").unwrap(), Compression::None);
        assert!(Compression::from_request("gzip").is_err());
    }
}
