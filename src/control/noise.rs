//! ts2021 Noise IK handshake and transport records, sans-IO.
//!
//! The handshake is `Noise_IK_25519_ChaChaPoly_BLAKE2s` with the prologue
//! `Tailscale Control Protocol v<version>`; the symmetric state is written here because the
//! transport nonce is Tailscale-specific (4 zero bytes + u64 **big-endian** counter).
//! [`NoiseStream`] adapts a finished session onto any tokio byte stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::control::tailcfg::EarlyNoise;
use crate::keys::{KeyError, MachinePrivate, MachinePublic, KEY_LEN};

/// Noise protocol name.
pub const PROTOCOL_NAME: &[u8] = b"Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Prologue prefix; the decimal protocol version follows.
pub const PROLOGUE_PREFIX: &str = "Tailscale Control Protocol v";
/// Bytes of the initiation message (5-byte header + 96-byte Noise message).
pub const INITIATION_LEN: usize = 101;
/// Bytes of the response message (3-byte header + 48-byte Noise message).
pub const RESPONSE_LEN: usize = 51;
/// Header bytes of responses, errors and records: type + u16 BE length.
pub const HEADER_LEN: usize = 3;
/// Largest frame on the wire, header included.
pub const MAX_FRAME_LEN: usize = 4096;
/// Largest ciphertext (plaintext + tag) of one record.
pub const MAX_CIPHERTEXT_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;
/// Largest plaintext of one record.
pub const MAX_PLAINTEXT_LEN: usize = MAX_CIPHERTEXT_LEN - TAG_LEN;
/// ChaCha20-Poly1305 tag length.
pub const TAG_LEN: usize = 16;

/// Message type: initiation (client → server).
pub const MSG_INITIATION: u8 = 1;
/// Message type: response (server → client).
pub const MSG_RESPONSE: u8 = 2;
/// Message type: unauthenticated error text (server → client, instead of a response).
pub const MSG_ERROR: u8 = 3;
/// Message type: transport record.
pub const MSG_RECORD: u8 = 4;

/// Magic that starts the optional early payload (§3.5).
pub const EARLY_PAYLOAD_MAGIC: [u8; 5] = *b"\xff\xff\xffTS";
/// Largest early-payload JSON we accept (Go's limit).
pub const MAX_EARLY_PAYLOAD_LEN: usize = 10 << 20;

const NOISE_MSG1_LEN: usize = INITIATION_LEN - 5;
const NOISE_MSG2_LEN: usize = RESPONSE_LEN - HEADER_LEN;

/// Everything that can go wrong in the handshake, records or early payload. All are fatal for
/// the connection.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// A handshake message had the wrong size, type or length field.
    #[error("malformed handshake message: {0}")]
    MalformedHandshake(&'static str),
    /// The server sent an error frame instead of a response.
    #[error("server error: {0:?}")]
    ServerError(String),
    /// A handshake or record failed authentication.
    #[error("decryption failed")]
    Decrypt,
    /// A Diffie-Hellman step failed (low-order point).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A frame header announced more than [`MAX_FRAME_LEN`] bytes, or a record too short for a tag.
    #[error("bad record length {0}")]
    BadRecordLength(usize),
    /// A frame after the handshake had a type other than [`MSG_RECORD`].
    #[error("unexpected record type {0}")]
    UnexpectedRecordType(u8),
    /// A direction used up its 2^64-1 nonces.
    #[error("cipher nonce exhausted")]
    NonceExhausted,
    /// An earlier error poisoned this reader.
    #[error("connection poisoned by an earlier error")]
    Poisoned,
    /// The early payload was malformed.
    #[error("bad early payload: {0}")]
    BadEarlyPayload(String),
}

impl From<NoiseError> for io::Error {
    fn from(e: NoiseError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

// ---------------------------------------------------------------------------------------------
// Symmetric state

type Hash = [u8; 32];

fn blake2s(parts: &[&[u8]]) -> Hash {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// HMAC-BLAKE2s (RFC 2104, block size 64). Keys here are at most 32 bytes.
fn hmac_blake2s(key: &[u8; 32], parts: &[&[u8]]) -> Hash {
    const BLOCK: usize = 64;
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Blake2s256::new();
    inner.update(ipad);
    for p in parts {
        inner.update(p);
    }
    let inner: Hash = inner.finalize().into();
    blake2s(&[&opad, &inner])
}

/// Noise HKDF with two outputs: `(HMAC(t, 0x01), HMAC(t, out1 || 0x02))`, `t = HMAC(ck, ikm)`.
fn hkdf2(ck: &Hash, ikm: &[u8]) -> (Hash, Hash) {
    let temp = hmac_blake2s(ck, &[ikm]);
    let out1 = hmac_blake2s(&temp, &[&[1u8]]);
    let out2 = hmac_blake2s(&temp, &[&out1, &[2u8]]);
    (out1, out2)
}

fn aead(key: &[u8; 32]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key))
}

/// Tailscale's transport nonce: 4 zero bytes then the counter big-endian.
fn transport_nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    *Nonce::from_slice(&n)
}

/// The prologue for a protocol version: `Tailscale Control Protocol v<version>`.
pub fn prologue(version: u16) -> String {
    format!("{PROLOGUE_PREFIX}{version}")
}

struct SymmetricState {
    h: Hash,
    ck: Hash,
    k: Option<[u8; 32]>,
}

impl SymmetricState {
    /// Initialize + prologue + pre-message `<- s`.
    fn new(prologue: &[u8], responder_static: &MachinePublic) -> Self {
        let h = blake2s(&[PROTOCOL_NAME]);
        let mut s = SymmetricState { h, ck: h, k: None };
        s.mix_hash(prologue);
        s.mix_hash(responder_static.as_bytes());
        s
    }

    fn mix_hash(&mut self, data: &[u8]) {
        self.h = blake2s(&[&self.h, data]);
    }

    fn mix_dh(&mut self, dh: [u8; 32]) {
        let (ck, k) = hkdf2(&self.ck, &dh);
        self.ck = ck;
        self.k = Some(k);
    }

    /// Every handshake key encrypts exactly once, so the nonce is always zero.
    fn encrypt_and_hash(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let mut buf = plaintext.to_vec();
        if let Some(k) = self.k {
            // Encryption into a Vec cannot fail for these sizes.
            if aead(&k)
                .encrypt_in_place(&transport_nonce(0), &self.h, &mut buf)
                .is_err()
            {
                buf.clear();
            }
        }
        self.mix_hash(&buf);
        buf
    }

    fn decrypt_and_hash(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let mut buf = ciphertext.to_vec();
        if let Some(k) = self.k {
            aead(&k)
                .decrypt_in_place(&transport_nonce(0), &self.h, &mut buf)
                .map_err(|_| NoiseError::Decrypt)?;
        }
        self.mix_hash(ciphertext);
        Ok(buf)
    }

    fn split(&self) -> (Hash, Hash) {
        hkdf2(&self.ck, &[])
    }
}

/// X25519 of raw bytes, rejecting the all-zero result.
fn dh(private: &[u8; 32], public: &[u8; 32]) -> Result<[u8; 32], NoiseError> {
    Ok(MachinePrivate::from_bytes(*private).shared_secret(&MachinePublic::from_bytes(*public))?)
}

fn public_of(private: &[u8; 32]) -> [u8; 32] {
    *MachinePrivate::from_bytes(*private).public().as_bytes()
}

fn random_ephemeral() -> [u8; 32] {
    *MachinePrivate::generate().as_bytes()
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Session keys after a successful handshake, from one side's point of view.
#[derive(Clone)]
pub struct TransportKeys {
    /// Key this side encrypts with.
    pub tx: [u8; 32],
    /// Key this side decrypts with.
    pub rx: [u8; 32],
    /// Final handshake hash (exposed by Go as `HandshakeHash`; unused by control).
    pub handshake_hash: [u8; 32],
}

impl fmt::Debug for TransportKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportKeys")
            .field("handshake_hash", &hex::encode(self.handshake_hash))
            .finish_non_exhaustive()
    }
}

impl TransportKeys {
    /// The record sealer (outgoing) and opener (incoming) of this side.
    pub fn into_ciphers(self) -> (RecordSealer, RecordOpener) {
        (RecordSealer::new(&self.tx), RecordOpener::new(&self.rx))
    }
}

/// Client side of the handshake, waiting for the server's response.
pub struct Initiator {
    state: SymmetricState,
    machine: MachinePrivate,
    ephemeral: [u8; 32],
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Initiator")
    }
}

impl Initiator {
    /// Builds the 101-byte initiation with a fresh ephemeral key. `version` is the capability
    /// version (see [`crate::control::CAPABILITY_VERSION`]); it goes into the header and prologue.
    pub fn start(
        machine: &MachinePrivate,
        server: &MachinePublic,
        version: u16,
    ) -> Result<(Initiator, [u8; INITIATION_LEN]), NoiseError> {
        Self::start_with_ephemeral(machine, server, version, random_ephemeral())
    }

    /// As [`Initiator::start`] with a caller-chosen ephemeral private key (known-answer tests).
    pub fn start_with_ephemeral(
        machine: &MachinePrivate,
        server: &MachinePublic,
        version: u16,
        ephemeral: [u8; 32],
    ) -> Result<(Initiator, [u8; INITIATION_LEN]), NoiseError> {
        Self::start_with_prologue(
            machine,
            server,
            version,
            ephemeral,
            prologue(version).as_bytes(),
        )
    }

    /// The handshake with an arbitrary prologue (the generic Noise IK known-answer vector).
    fn start_with_prologue(
        machine: &MachinePrivate,
        server: &MachinePublic,
        version: u16,
        ephemeral: [u8; 32],
        prologue: &[u8],
    ) -> Result<(Initiator, [u8; INITIATION_LEN]), NoiseError> {
        let mut state = SymmetricState::new(prologue, server);
        let e_pub = public_of(&ephemeral);
        state.mix_hash(&e_pub);
        state.mix_dh(dh(&ephemeral, server.as_bytes())?);
        let enc_static = state.encrypt_and_hash(machine.public().as_bytes());
        state.mix_dh(machine.shared_secret(server)?);
        let enc_payload = state.encrypt_and_hash(&[]);

        let mut msg = [0u8; INITIATION_LEN];
        msg[0..2].copy_from_slice(&version.to_be_bytes());
        msg[2] = MSG_INITIATION;
        msg[3..5].copy_from_slice(&(NOISE_MSG1_LEN as u16).to_be_bytes());
        msg[5..37].copy_from_slice(&e_pub);
        msg[37..85].copy_from_slice(&enc_static);
        msg[85..101].copy_from_slice(&enc_payload);
        let initiator = Initiator {
            state,
            machine: machine.clone(),
            ephemeral,
        };
        Ok((initiator, msg))
    }

    /// Processes the server's answer: a 51-byte response, or an error frame
    /// (reported as [`NoiseError::ServerError`]).
    pub fn finish(mut self, response: &[u8]) -> Result<TransportKeys, NoiseError> {
        if response.first() == Some(&MSG_ERROR) {
            return Err(NoiseError::ServerError(parse_error_frame(response)?));
        }
        if response.len() != RESPONSE_LEN {
            return Err(NoiseError::MalformedHandshake("response is not 51 bytes"));
        }
        if response[0] != MSG_RESPONSE {
            return Err(NoiseError::MalformedHandshake("unexpected response type"));
        }
        if u16::from_be_bytes([response[1], response[2]]) as usize != NOISE_MSG2_LEN {
            return Err(NoiseError::MalformedHandshake("response length is not 48"));
        }
        let mut re = [0u8; 32];
        re.copy_from_slice(&response[3..35]);
        self.state.mix_hash(&re);
        self.state.mix_dh(dh(&self.ephemeral, &re)?);
        self.state
            .mix_dh(self.machine.shared_secret(&MachinePublic::from_bytes(re))?);
        self.state.decrypt_and_hash(&response[35..51])?;
        let (k1, k2) = self.state.split();
        Ok(TransportKeys {
            tx: k1,
            rx: k2,
            handshake_hash: self.state.h,
        })
    }
}

/// How many bytes the server's handshake answer has in total, from its first 3 bytes: 51 for a
/// response, `3 + len` for an error frame. Lets a client read exactly the answer.
pub fn handshake_answer_len(header: [u8; HEADER_LEN]) -> Result<usize, NoiseError> {
    let len = u16::from_be_bytes([header[1], header[2]]) as usize;
    match header[0] {
        MSG_RESPONSE if len == NOISE_MSG2_LEN => Ok(RESPONSE_LEN),
        MSG_RESPONSE => Err(NoiseError::MalformedHandshake("response length is not 48")),
        MSG_ERROR => Ok(HEADER_LEN + len),
        _ => Err(NoiseError::MalformedHandshake("unexpected response type")),
    }
}

/// Encodes an error frame (`0x03 || u16 BE len || text`), truncating the text to fit.
pub fn encode_error_frame(text: &str) -> Vec<u8> {
    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(HEADER_LEN + bytes.len());
    out.push(MSG_ERROR);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Parses an error frame into its (lossily decoded) text.
pub fn parse_error_frame(frame: &[u8]) -> Result<String, NoiseError> {
    match frame {
        [MSG_ERROR, hi, lo, rest @ ..] if u16::from_be_bytes([*hi, *lo]) as usize == rest.len() => {
            Ok(String::from_utf8_lossy(rest).into_owned())
        }
        _ => Err(NoiseError::MalformedHandshake("bad error frame")),
    }
}

/// Result of a server accepting an initiation.
#[derive(Debug)]
pub struct Accepted {
    /// The 51-byte response to write after the HTTP 101 headers.
    pub response: [u8; RESPONSE_LEN],
    /// The client's machine key, the peer identity for this session.
    pub peer: MachinePublic,
    /// Protocol (capability) version from the initiation header.
    pub version: u16,
    /// Server-side session keys.
    pub keys: TransportKeys,
}

/// Server side of the handshake (stateless: one message in, one out).
pub struct Responder;

impl Responder {
    /// Validates an initiation and builds the response with a fresh ephemeral key.
    pub fn accept(server: &MachinePrivate, initiation: &[u8]) -> Result<Accepted, NoiseError> {
        Self::accept_with_ephemeral(server, initiation, random_ephemeral())
    }

    /// As [`Responder::accept`] with a caller-chosen ephemeral private key (known-answer tests).
    pub fn accept_with_ephemeral(
        server: &MachinePrivate,
        initiation: &[u8],
        ephemeral: [u8; 32],
    ) -> Result<Accepted, NoiseError> {
        Self::accept_with_prologue(server, initiation, ephemeral, None)
    }

    /// The handshake with a prologue override (the generic Noise IK known-answer vector).
    fn accept_with_prologue(
        server: &MachinePrivate,
        initiation: &[u8],
        ephemeral: [u8; 32],
        prologue_override: Option<&[u8]>,
    ) -> Result<Accepted, NoiseError> {
        if initiation.len() != INITIATION_LEN {
            return Err(NoiseError::MalformedHandshake(
                "initiation is not 101 bytes",
            ));
        }
        if initiation[2] != MSG_INITIATION {
            return Err(NoiseError::MalformedHandshake("unexpected initiation type"));
        }
        if u16::from_be_bytes([initiation[3], initiation[4]]) as usize != NOISE_MSG1_LEN {
            return Err(NoiseError::MalformedHandshake(
                "initiation length is not 96",
            ));
        }
        let version = u16::from_be_bytes([initiation[0], initiation[1]]);
        let default_prologue = prologue(version);
        let prologue = prologue_override.unwrap_or(default_prologue.as_bytes());
        let mut state = SymmetricState::new(prologue, &server.public());
        let mut ie = [0u8; 32];
        ie.copy_from_slice(&initiation[5..37]);
        state.mix_hash(&ie);
        state.mix_dh(dh(server.as_bytes(), &ie)?);
        let static_plain = state.decrypt_and_hash(&initiation[37..85])?;
        let mut is = [0u8; KEY_LEN];
        is.copy_from_slice(&static_plain);
        let peer = MachinePublic::from_bytes(is);
        state.mix_dh(server.shared_secret(&peer)?);
        state.decrypt_and_hash(&initiation[85..101])?;

        let re_pub = public_of(&ephemeral);
        state.mix_hash(&re_pub);
        state.mix_dh(dh(&ephemeral, &ie)?);
        state.mix_dh(dh(&ephemeral, &is)?);
        let tag = state.encrypt_and_hash(&[]);
        let (k1, k2) = state.split();

        let mut response = [0u8; RESPONSE_LEN];
        response[0] = MSG_RESPONSE;
        response[1..3].copy_from_slice(&(NOISE_MSG2_LEN as u16).to_be_bytes());
        response[3..35].copy_from_slice(&re_pub);
        response[35..51].copy_from_slice(&tag);
        Ok(Accepted {
            response,
            peer,
            version,
            keys: TransportKeys {
                tx: k2,
                rx: k1,
                handshake_hash: state.h,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Transport records

/// Encrypts outgoing plaintext into records.
pub struct RecordSealer {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl RecordSealer {
    /// A sealer starting at counter 0.
    pub fn new(key: &[u8; 32]) -> Self {
        RecordSealer {
            cipher: aead(key),
            counter: 0,
        }
    }

    /// Appends one record holding `plaintext` (at most [`MAX_PLAINTEXT_LEN`] bytes) to `out`.
    pub fn seal_record_into(
        &mut self,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(NoiseError::BadRecordLength(
                plaintext.len() + HEADER_LEN + TAG_LEN,
            ));
        }
        if self.counter == u64::MAX {
            return Err(NoiseError::NonceExhausted);
        }
        let start = out.len();
        out.push(MSG_RECORD);
        out.extend_from_slice(&((plaintext.len() + TAG_LEN) as u16).to_be_bytes());
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                &transport_nonce(self.counter),
                &[],
                &mut out[start + HEADER_LEN..],
            )
            .map_err(|_| NoiseError::Decrypt)?;
        out.extend_from_slice(&tag);
        self.counter += 1;
        Ok(())
    }

    /// Appends records for all of `plaintext`, split into chunks of [`MAX_PLAINTEXT_LEN`].
    /// An empty input produces no record.
    pub fn seal_into(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT_LEN) {
            self.seal_record_into(chunk, out)?;
        }
        Ok(())
    }

    /// Records for all of `plaintext` as one byte vector.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let records = plaintext.len().div_ceil(MAX_PLAINTEXT_LEN);
        let mut out = Vec::with_capacity(plaintext.len() + records * (HEADER_LEN + TAG_LEN));
        self.seal_into(plaintext, &mut out)?;
        Ok(out)
    }
}

/// Incremental decoder of incoming records: push wire bytes, pull plaintext.
/// The first error poisons it, as in Go.
pub struct RecordOpener {
    cipher: ChaCha20Poly1305,
    counter: u64,
    pending: Vec<u8>,
    poisoned: bool,
}

impl RecordOpener {
    /// An opener starting at counter 0.
    pub fn new(key: &[u8; 32]) -> Self {
        RecordOpener {
            cipher: aead(key),
            counter: 0,
            pending: Vec::new(),
            poisoned: false,
        }
    }

    /// Buffers wire bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Wire bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Decrypts the next complete record. Zero-length records are skipped. `Ok(None)` means more
    /// bytes are needed.
    pub fn next_plaintext(&mut self) -> Result<Option<Vec<u8>>, NoiseError> {
        if self.poisoned {
            return Err(NoiseError::Poisoned);
        }
        let result = self.next_plaintext_inner();
        if result.is_err() {
            self.poisoned = true;
            self.pending = Vec::new();
        }
        result
    }

    fn next_plaintext_inner(&mut self) -> Result<Option<Vec<u8>>, NoiseError> {
        loop {
            let Some(total) = self.complete_frame_len()? else {
                return Ok(None);
            };
            let frame: Vec<u8> = self.pending.drain(..total).collect();
            let plaintext = self.open_frame(&frame)?;
            if !plaintext.is_empty() {
                return Ok(Some(plaintext));
            }
        }
    }

    /// Length of the complete frame at the front of the buffer, if there is one.
    fn complete_frame_len(&self) -> Result<Option<usize>, NoiseError> {
        let [ty, hi, lo, ..] = self.pending[..] else {
            return Ok(None);
        };
        if ty != MSG_RECORD {
            return Err(NoiseError::UnexpectedRecordType(ty));
        }
        let len = u16::from_be_bytes([hi, lo]) as usize;
        if !(TAG_LEN..=MAX_CIPHERTEXT_LEN).contains(&len) {
            return Err(NoiseError::BadRecordLength(len));
        }
        Ok((self.pending.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
    }

    /// Decrypts one whole frame (header included) and advances the counter.
    fn open_frame(&mut self, frame: &[u8]) -> Result<Vec<u8>, NoiseError> {
        if self.counter == u64::MAX {
            return Err(NoiseError::NonceExhausted);
        }
        let mut buf = frame.get(HEADER_LEN..).unwrap_or_default().to_vec();
        self.cipher
            .decrypt_in_place(&transport_nonce(self.counter), &[], &mut buf)
            .map_err(|_| NoiseError::Decrypt)?;
        self.counter += 1;
        Ok(buf)
    }
}

// ---------------------------------------------------------------------------------------------
// Early payload

/// Encodes the early payload: magic, u32 BE length, JSON.
pub fn encode_early_payload(early: &EarlyNoise) -> Vec<u8> {
    let json = serde_json::to_vec(early).unwrap_or_default();
    let mut out = Vec::with_capacity(9 + json.len());
    out.extend_from_slice(&EARLY_PAYLOAD_MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// What the first plaintext bytes from the server are.
#[derive(Debug, PartialEq)]
pub enum EarlyPayloadStatus {
    /// Not enough bytes yet to decide or to finish parsing.
    Incomplete,
    /// No early payload: the bytes are the start of HTTP/2 and must be kept.
    Absent,
    /// An early payload occupying the first `consumed` bytes.
    Present {
        /// Decoded JSON.
        payload: EarlyNoise,
        /// Bytes to drop before HTTP/2 starts.
        consumed: usize,
    },
}

/// Inspects the start of the server's plaintext stream for an early payload.
pub fn parse_early_payload(buf: &[u8]) -> Result<EarlyPayloadStatus, NoiseError> {
    let n = buf.len().min(EARLY_PAYLOAD_MAGIC.len());
    if buf[..n] != EARLY_PAYLOAD_MAGIC[..n] {
        return Ok(EarlyPayloadStatus::Absent);
    }
    let Some(len_bytes) = buf.get(5..9) else {
        return Ok(EarlyPayloadStatus::Incomplete);
    };
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if len > MAX_EARLY_PAYLOAD_LEN {
        return Err(NoiseError::BadEarlyPayload(format!(
            "length {len} too large"
        )));
    }
    let Some(json) = buf.get(9..9 + len) else {
        return Ok(EarlyPayloadStatus::Incomplete);
    };
    let payload: EarlyNoise =
        serde_json::from_slice(json).map_err(|e| NoiseError::BadEarlyPayload(e.to_string()))?;
    Ok(EarlyPayloadStatus::Present {
        payload,
        consumed: 9 + len,
    })
}

// ---------------------------------------------------------------------------------------------
// Async stream adapter

/// A byte stream over Noise records, for running HTTP/2 (client or server) after the handshake.
/// Writes are split into records of at most [`MAX_PLAINTEXT_LEN`] bytes; reads yield plaintext
/// across record boundaries. Any decoding error is fatal and returned as `InvalidData`.
pub struct NoiseStream<S> {
    io: S,
    sealer: RecordSealer,
    opener: RecordOpener,
    /// Decrypted plaintext not yet handed to the reader.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Sealed records not yet written to `io`.
    out: Vec<u8>,
    out_pos: usize,
    read_eof: bool,
}

impl<S> fmt::Debug for NoiseStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseStream").finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> NoiseStream<S> {
    /// Wraps `io` with this side's session keys.
    pub fn new(io: S, keys: TransportKeys) -> Self {
        Self::with_buffered(io, keys, &[])
    }

    /// As [`NoiseStream::new`], with wire bytes already read from `io` past the handshake
    /// (e.g. left in an HTTP parser's buffer).
    pub fn with_buffered(io: S, keys: TransportKeys, buffered: &[u8]) -> Self {
        let (sealer, mut opener) = keys.into_ciphers();
        opener.push(buffered);
        NoiseStream {
            io,
            sealer,
            opener,
            plain: Vec::new(),
            plain_pos: 0,
            out: Vec::new(),
            out_pos: 0,
            read_eof: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Client side: reads the optional early payload (§3.5). Bytes that turn out to be HTTP/2
    /// stay buffered for the next reads. Returns `None` if the server sent none.
    pub async fn read_early_payload(&mut self) -> Result<Option<EarlyNoise>, io::Error> {
        loop {
            match parse_early_payload(&self.plain[self.plain_pos..])? {
                EarlyPayloadStatus::Absent => return Ok(None),
                EarlyPayloadStatus::Present { payload, consumed } => {
                    self.plain_pos += consumed;
                    return Ok(Some(payload));
                }
                EarlyPayloadStatus::Incomplete => {
                    if !self.fill_plain_more().await? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside the early payload",
                        ));
                    }
                }
            }
        }
    }

    /// Reads and decrypts at least one more plaintext record into `plain`. False on EOF.
    async fn fill_plain_more(&mut self) -> Result<bool, io::Error> {
        let mut buf = [0u8; MAX_FRAME_LEN];
        loop {
            if let Some(p) = self.opener.next_plaintext()? {
                if self.plain_pos > 0 {
                    self.plain.drain(..self.plain_pos);
                    self.plain_pos = 0;
                }
                self.plain.extend_from_slice(&p);
                return Ok(true);
            }
            let n = self.io.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            self.opener.push(&buf[..n]);
        }
    }

    /// Writes as much of the sealed output as `io` takes now.
    fn poll_drain_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = match Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let avail = &this.plain[this.plain_pos..];
                let n = avail.len().min(buf.remaining());
                buf.put_slice(&avail[..n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain.clear();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(p) = this.opener.next_plaintext()? {
                this.plain = p;
                this.plain_pos = 0;
                continue;
            }
            if this.read_eof {
                if this.opener.buffered() > 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a Noise record",
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; MAX_FRAME_LEN];
            let mut raw_buf = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.io).poll_read(cx, &mut raw_buf) {
                Poll::Ready(Ok(())) => {
                    let filled = raw_buf.filled();
                    if filled.is_empty() {
                        this.read_eof = true;
                    } else {
                        this.opener.push(filled);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Previous records must be on their way before we accept more plaintext.
        if let Poll::Ready(Err(e)) = this.poll_drain_out(cx) {
            return Poll::Ready(Err(e));
        }
        if this.out_pos < this.out.len() {
            return Poll::Pending;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_PLAINTEXT_LEN);
        this.sealer.seal_record_into(&buf[..n], &mut this.out)?;
        // Start sending right away; completion is reported by flush or the next write.
        if let Poll::Ready(Err(e)) = this.poll_drain_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
