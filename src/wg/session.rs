//! [`BoringSession`]: boringtun's `Tunn` for crypto, our own clock-driven timers.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::consts::*;
use super::{after, min_deadline, DropReason, WgOutput, WgSession, WgStats};
use crate::keys::{NodePrivate, NodePublic};

const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_DATA: u8 = 4;

/// Timer state, all in caller time (`now`).
#[derive(Debug, Default, Clone)]
struct Timers {
    /// When the newest session key was made, and whether we initiated it.
    established: Option<Instant>,
    is_initiator: bool,
    /// A handshake we started: when the attempt began and when the last initiation left.
    attempt_started: Option<Instant>,
    last_init_sent: Option<Instant>,
    /// Any authenticated packet sent (for persistent keepalive).
    last_sent: Option<Instant>,
    /// First data sent since we last heard from the peer (→ new handshake after 15 s).
    unanswered_since: Option<Instant>,
    /// First data received since we last sent anything (→ keepalive after 10 s).
    keepalive_owed_since: Option<Instant>,
    /// A rekey is due at the next timer run.
    rekey_due: bool,
}

/// A WireGuard session with one peer.
pub struct BoringSession {
    /// boringtun's state, made on first use and dropped on reset: a `Tunn` is about 11 KB (eight
    /// inline key slots), and most peers of a large tailnet never exchange a packet with us.
    tunn: Option<Box<Tunn>>,
    local: StaticSecret,
    peer: PublicKey,
    index: u32,
    rate_limiter: Option<Arc<RateLimiter>>,
    persistent_keepalive: Option<std::time::Duration>,
    timers: Timers,
    stats: WgStats,
    /// Longest packet boringtun may hold in its queue (it panics on a too-small buffer).
    max_queued: usize,
}

impl BoringSession {
    /// A session from `local` to `peer`. `index` (24 bits) tags our receiver indices so a peer
    /// table can find this session from a datagram; `rate_limiter` may be shared by all peers.
    pub fn new(
        local: &NodePrivate,
        peer: &NodePublic,
        index: u32,
        rate_limiter: Option<Arc<RateLimiter>>,
    ) -> Self {
        let local = StaticSecret::from(*local.as_bytes());
        let peer = PublicKey::from(*peer.as_bytes());
        Self {
            tunn: None,
            local,
            peer,
            index,
            rate_limiter,
            persistent_keepalive: None,
            timers: Timers::default(),
            stats: WgStats::default(),
            max_queued: 0,
        }
    }

    /// Sends a keepalive whenever nothing was sent for `interval` (off by default, as in Tailscale).
    pub fn set_persistent_keepalive(&mut self, interval: Option<std::time::Duration>) {
        self.persistent_keepalive = interval;
    }

    /// boringtun's state, made now if this is its first use.
    fn tunn(&mut self) -> &mut Tunn {
        let Self {
            tunn,
            local,
            peer,
            index,
            rate_limiter,
            ..
        } = self;
        tunn.get_or_insert_with(|| Box::new(new_tunn(local, peer, *index, rate_limiter.clone())))
    }

    /// Drops every session key and pending packet; the next packet starts a fresh handshake.
    fn reset(&mut self) {
        self.tunn = None;
        self.timers = Timers::default();
        self.max_queued = 0;
    }

    /// Keys older than REJECT_AFTER_TIME must not be used (whitepaper §6.2).
    fn expire_if_stale(&mut self, now: Instant) {
        if let Some(est) = self.timers.established {
            if now >= est + REJECT_AFTER_TIME {
                tracing::debug!("wg: session expired (REJECT_AFTER_TIME), dropping keys");
                self.reset();
            }
        }
    }

    fn on_handshake_sent(&mut self, now: Instant) {
        self.timers.attempt_started.get_or_insert(now);
        self.timers.last_init_sent = Some(now);
        self.timers.last_sent = Some(now);
        self.stats.handshakes_sent += 1;
    }

    fn on_sent(&mut self, now: Instant, payload_len: usize) {
        self.timers.last_sent = Some(now);
        self.timers.keepalive_owed_since = None;
        if payload_len > 0 {
            self.timers.unanswered_since.get_or_insert(now);
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += payload_len as u64;
            self.check_rekey_on_send(now);
        }
    }

    fn on_received(&mut self, now: Instant, payload_len: usize) {
        self.timers.unanswered_since = None;
        if payload_len > 0 {
            self.timers.keepalive_owed_since.get_or_insert(now);
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += payload_len as u64;
            self.check_rekey_on_receive(now);
        }
    }

    fn on_established(&mut self, now: Instant, initiator: bool) {
        self.timers.established = Some(now);
        self.timers.is_initiator = initiator;
        self.timers.rekey_due = false;
        if initiator {
            self.timers.attempt_started = None;
            self.timers.last_init_sent = None;
        }
        self.stats.handshakes_completed += 1;
    }

    fn check_rekey_on_send(&mut self, now: Instant) {
        if let (true, Some(est)) = (self.timers.is_initiator, self.timers.established) {
            if now >= est + REKEY_AFTER_TIME {
                self.timers.rekey_due = true;
            }
        }
    }

    fn check_rekey_on_receive(&mut self, now: Instant) {
        if let (true, Some(est)) = (self.timers.is_initiator, self.timers.established) {
            if now >= est + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT {
                self.timers.rekey_due = true;
            }
        }
    }

    fn drop(&mut self, reason: DropReason) -> WgOutput {
        match reason {
            DropReason::Malformed => self.stats.malformed += 1,
            _ => self.stats.dropped += 1,
        }
        WgOutput::Dropped(reason)
    }

    /// Starts (or with `force`, retransmits) a handshake initiation.
    fn initiate(&mut self, now: Instant, out: &mut [u8], force: bool) -> WgOutput {
        match self.tunn().format_handshake_initiation(out, force) {
            TunnResult::WriteToNetwork(p) => {
                let n = p.len();
                self.on_handshake_sent(now);
                WgOutput::ToNetwork(n)
            }
            TunnResult::Err(e) => {
                tracing::debug!(error = ?e, "wg: cannot format handshake initiation");
                WgOutput::Done
            }
            _ => WgOutput::Done,
        }
    }

    fn send_keepalive(&mut self, now: Instant, out: &mut [u8]) -> WgOutput {
        match self.tunn().encapsulate(&[], out) {
            TunnResult::WriteToNetwork(p) if p.first() == Some(&MSG_DATA) => {
                let n = p.len();
                self.on_sent(now, 0);
                WgOutput::ToNetwork(n)
            }
            TunnResult::WriteToNetwork(p) => {
                // No session: boringtun started a handshake instead.
                let n = p.len();
                self.on_handshake_sent(now);
                WgOutput::ToNetwork(n)
            }
            _ => WgOutput::Done,
        }
    }

    fn has_session(&self) -> bool {
        self.timers.established.is_some()
    }
}

fn new_tunn(
    local: &StaticSecret,
    peer: &PublicKey,
    index: u32,
    rate_limiter: Option<Arc<RateLimiter>>,
) -> Tunn {
    Tunn::new(local.clone(), *peer, None, None, index, rate_limiter)
}

impl WgSession for BoringSession {
    fn encapsulate(&mut self, now: Instant, ip_packet: &[u8], out: &mut [u8]) -> WgOutput {
        if out.len() < (ip_packet.len() + DATA_OVERHEAD).max(MIN_OUT_BUF) {
            return self.drop(DropReason::BufferTooSmall);
        }
        self.expire_if_stale(now);
        match self.tunn().encapsulate(ip_packet, out) {
            TunnResult::WriteToNetwork(p) => {
                let n = p.len();
                if p.first() == Some(&MSG_INIT) {
                    // boringtun queued the packet behind the handshake.
                    self.max_queued = self.max_queued.max(ip_packet.len());
                    self.on_handshake_sent(now);
                } else {
                    self.on_sent(now, ip_packet.len());
                }
                WgOutput::ToNetwork(n)
            }
            TunnResult::Err(_) => self.drop(DropReason::Refused),
            // Queued until the handshake in flight completes.
            _ => {
                self.max_queued = self.max_queued.max(ip_packet.len());
                WgOutput::Done
            }
        }
    }

    fn decapsulate(&mut self, now: Instant, datagram: &[u8], out: &mut [u8]) -> WgOutput {
        let Some(&msg_type) = datagram.first() else {
            return self.drop(DropReason::Malformed);
        };
        if out.len() < datagram.len().max(MIN_OUT_BUF) {
            return self.drop(DropReason::BufferTooSmall);
        }
        self.expire_if_stale(now);
        let src: Option<IpAddr> = None;
        match self.tunn().decapsulate(src, datagram, out) {
            TunnResult::WriteToNetwork(p) => {
                let (n, sent_type) = (p.len(), p.first().copied());
                match (msg_type, sent_type) {
                    (MSG_INIT, Some(MSG_RESPONSE)) => {
                        self.on_established(now, false);
                        self.on_received(now, 0);
                        self.timers.last_sent = Some(now);
                    }
                    (MSG_RESPONSE, _) => {
                        self.on_established(now, true);
                        self.on_received(now, 0);
                        self.on_sent(now, 0); // boringtun answers with a keepalive
                    }
                    _ => {} // cookie reply under load
                }
                WgOutput::ToNetwork(n)
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                let n = p.len();
                self.on_received(now, n);
                WgOutput::ToTunnel(n)
            }
            TunnResult::Done => {
                if msg_type == MSG_DATA {
                    self.on_received(now, 0); // keepalive
                }
                WgOutput::Done
            }
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, "wg: dropping datagram");
                self.drop(DropReason::Malformed)
            }
        }
    }

    fn drain(&mut self, now: Instant, out: &mut [u8]) -> WgOutput {
        if out.len() < (self.max_queued + DATA_OVERHEAD).max(MIN_OUT_BUF) {
            return self.drop(DropReason::BufferTooSmall);
        }
        // Without boringtun's state nothing can be queued: do not make it just to look.
        let Some(tunn) = self.tunn.as_mut() else {
            return WgOutput::Done;
        };
        match tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(p) => {
                let n = p.len();
                self.on_sent(now, n.saturating_sub(DATA_OVERHEAD));
                WgOutput::ToNetwork(n)
            }
            _ => {
                self.max_queued = 0;
                WgOutput::Done
            }
        }
    }

    fn update_timers(&mut self, now: Instant, out: &mut [u8]) -> WgOutput {
        if out.len() < MIN_OUT_BUF {
            return self.drop(DropReason::BufferTooSmall);
        }
        self.expire_if_stale(now);
        if let Some(started) = self.timers.attempt_started {
            if now >= started + REKEY_ATTEMPT_TIME {
                tracing::debug!("wg: handshake gave up after REKEY_ATTEMPT_TIME");
                // Drops the queue too; the next packet starts a fresh attempt.
                self.reset();
                return WgOutput::Done;
            }
            if after(self.timers.last_init_sent, REKEY_TIMEOUT).is_some_and(|t| now >= t) {
                return self.initiate(now, out, true);
            }
        } else if self.timers.rekey_due
            || after(
                self.timers.unanswered_since,
                KEEPALIVE_TIMEOUT + REKEY_TIMEOUT,
            )
            .is_some_and(|t| now >= t)
        {
            self.timers.rekey_due = false;
            self.timers.unanswered_since = None;
            return self.initiate(now, out, false);
        }
        if !self.has_session() {
            return WgOutput::Done;
        }
        if after(self.timers.keepalive_owed_since, KEEPALIVE_TIMEOUT).is_some_and(|t| now >= t) {
            return self.send_keepalive(now, out);
        }
        if let Some(interval) = self.persistent_keepalive {
            if after(self.timers.last_sent, interval).is_some_and(|t| now >= t) {
                return self.send_keepalive(now, out);
            }
        }
        WgOutput::Done
    }

    fn next_deadline(&self) -> Option<Instant> {
        let t = &self.timers;
        let mut d = after(t.established, REJECT_AFTER_TIME);
        if let Some(started) = t.attempt_started {
            d = min_deadline(d, Some(started + REKEY_ATTEMPT_TIME));
            d = min_deadline(d, after(t.last_init_sent, REKEY_TIMEOUT));
        } else {
            if t.rekey_due {
                // Due now: the caller runs timers right away.
                d = min_deadline(d, t.last_sent.or(t.established));
            }
            d = min_deadline(
                d,
                after(t.unanswered_since, KEEPALIVE_TIMEOUT + REKEY_TIMEOUT),
            );
        }
        if self.has_session() {
            d = min_deadline(d, after(t.keepalive_owed_since, KEEPALIVE_TIMEOUT));
            if let Some(interval) = self.persistent_keepalive {
                d = min_deadline(d, after(t.last_sent, interval));
            }
        }
        d
    }

    fn is_established(&self, now: Instant) -> bool {
        self.timers
            .established
            .is_some_and(|est| now < est + REJECT_AFTER_TIME)
    }

    fn last_handshake(&self) -> Option<Instant> {
        self.timers.established
    }

    fn stats(&self) -> WgStats {
        self.stats
    }

    fn is_dormant(&self) -> bool {
        self.tunn.is_none()
    }

    fn initiate_handshake(&mut self, now: Instant, out: &mut [u8]) -> WgOutput {
        self.expire_if_stale(now);
        if self.has_session() || self.timers.last_init_sent.is_some() {
            return WgOutput::Done;
        }
        self.initiate(now, out, false)
    }

    fn retry_handshake_now(&mut self, now: Instant, out: &mut [u8]) -> WgOutput {
        if self.has_session() || self.timers.last_init_sent.is_none() {
            return WgOutput::Done;
        }
        self.initiate(now, out, true)
    }
}
