//! WireGuard sessions (one per peer) behind a small sans-IO trait, the peer table, and the
//! AllowedIPs route table.
//!
//! The crypto and wire format come from boringtun's `noise::Tunn`. Its timers read boringtun's own
//! clock, so we do not use them: [`BoringSession`] keeps the WireGuard timer rules (whitepaper §6)
//! itself, driven by the `now` the caller hands in, and exposes [`WgSession::next_deadline`] so an
//! I/O task sleeps until the earliest deadline. Tests therefore simulate minutes in milliseconds.

mod peers;
mod route;
mod session;

#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use peers::{PeerId, WgPeers};
pub use route::AllowedIps;
pub use session::BoringSession;

/// WireGuard protocol timing constants (whitepaper §6.1).
pub mod consts {
    use std::time::Duration;
    /// Initiator starts a new handshake when its session is this old and it sends.
    pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
    /// A session older than this is never used.
    pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
    /// Give up retrying a handshake after this long.
    pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
    /// Retransmit an unanswered handshake initiation after this long.
    pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
    /// Send a keepalive when we received data and sent nothing for this long.
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    /// The smallest output buffer any call may need (a handshake initiation).
    pub const MIN_OUT_BUF: usize = 148;
    /// Bytes a data message adds to the IP packet (header 16 + tag 16).
    pub const DATA_OVERHEAD: usize = 32;
}

/// What the caller must do after a session call. Byte counts index the `out` buffer it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgOutput {
    /// Nothing to send.
    Done,
    /// Send `out[..n]` to the peer (handshake, keepalive or data).
    ToNetwork(usize),
    /// Write `out[..n]` (a decrypted IP packet) to the TUN.
    ToTunnel(usize),
    /// The input was dropped (and counted).
    Dropped(DropReason),
}

/// Why a packet was dropped; counted in [`WgStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a WireGuard message, wrong length, bad MAC/tag, replay, unknown index.
    Malformed,
    /// Decrypted packet's source is outside the peer's AllowedIPs.
    NotAllowed,
    /// The caller's buffer is too small for the result.
    BufferTooSmall,
    /// No peer matches (unknown key, receiver index or destination).
    NoPeer,
    /// The handshake was rate limited or otherwise refused.
    Refused,
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WgStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub handshakes_sent: u64,
    pub handshakes_completed: u64,
    pub malformed: u64,
    pub dropped: u64,
}

/// One WireGuard peer session, sans-IO. The engine behind it can be swapped.
///
/// After a call returns [`WgOutput::ToNetwork`] from `decapsulate`, call [`WgSession::drain`] until
/// it returns `Done`: packets queued while a handshake ran are sent then.
pub trait WgSession: Send {
    /// Encrypts an IP packet for the peer (or queues it and starts a handshake).
    fn encapsulate(&mut self, now: Instant, ip_packet: &[u8], out: &mut [u8]) -> WgOutput;
    /// Handles a WireGuard datagram from the peer.
    fn decapsulate(&mut self, now: Instant, datagram: &[u8], out: &mut [u8]) -> WgOutput;
    /// Emits packets queued during a handshake, one per call.
    fn drain(&mut self, now: Instant, out: &mut [u8]) -> WgOutput;
    /// Runs due timers; call it at [`WgSession::next_deadline`]. One output per call: call again
    /// while it returns something other than `Done`.
    fn update_timers(&mut self, now: Instant, out: &mut [u8]) -> WgOutput;
    /// The earliest instant at which `update_timers` has work; `None` when idle.
    fn next_deadline(&self) -> Option<Instant>;
    /// Whether a session key exists that can carry data now.
    fn is_established(&self, now: Instant) -> bool;
    /// When the last handshake completed.
    fn last_handshake(&self) -> Option<Instant>;
    /// Counters.
    fn stats(&self) -> WgStats;
    /// Holds no key material or queued packets (never used, or reset since): nothing but the
    /// peer's identity in memory.
    fn is_dormant(&self) -> bool;
    /// Starts a handshake now unless a session exists or one is under way (a peer that tried to
    /// reach us before we knew it would otherwise wait for its 5 s retransmission).
    fn initiate_handshake(&mut self, now: Instant, out: &mut [u8]) -> WgOutput;
    /// Retransmits an unanswered handshake initiation now instead of at its 5 s timer (the
    /// peer's reachability just changed, e.g. it came up); nothing when no handshake is pending.
    fn retry_handshake_now(&mut self, now: Instant, out: &mut [u8]) -> WgOutput;
}

/// Errors when configuring peers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WgError {
    #[error("peer table full")]
    TableFull,
    #[error("peer key is the all-zero key")]
    ZeroKey,
}

fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn after(t: Option<Instant>, d: Duration) -> Option<Instant> {
    t.map(|t| t + d)
}
