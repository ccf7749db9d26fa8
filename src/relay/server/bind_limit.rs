//! The Challenge rate limit. A Bind is answered by a Challenge to the Bind's source address,
//! and a captured Bind stays valid, so replaying it with a spoofed source would make the relay
//! send Challenges to a victim. Each source (IPv4 address, IPv6 /64: spoofing other ports or
//! addresses of a /64 must not multiply the budget) gets a token bucket; the table of buckets is
//! bounded, so a flood from many spoofed sources cannot grow memory.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Challenges per second per source, after the burst.
pub const CHALLENGES_PER_SECOND: f64 = 10.0;
/// Challenges a source may get at once.
pub const CHALLENGE_BURST: f64 = 20.0;
/// Sources tracked at most. A new source while the table is full (and nothing in it is idle)
/// gets no Challenge: under such a flood, refusing is safer than reflecting.
pub const MAX_SOURCES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by source.
#[derive(Debug, Clone, Default)]
pub struct BindLimiter {
    buckets: HashMap<IpAddr, Bucket>,
    /// Last time the table was swept for idle entries (at most once a second when full).
    swept: Option<Instant>,
}

impl BindLimiter {
    /// Whether `source` may get one more Challenge now (takes a token if so).
    pub fn allow(&mut self, now: Instant, source: IpAddr) -> bool {
        let key = source_key(source);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_SOURCES {
            self.sweep(now);
            if self.buckets.len() >= MAX_SOURCES {
                return false;
            }
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: CHALLENGE_BURST,
            last: now,
        });
        let refill =
            now.saturating_duration_since(bucket.last).as_secs_f64() * CHALLENGES_PER_SECOND;
        bucket.tokens = (bucket.tokens + refill).min(CHALLENGE_BURST);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops sources whose bucket has refilled (they are as if never seen); the caller's
    /// periodic expiry.
    pub fn expire(&mut self, now: Instant) {
        self.swept = None;
        self.sweep(now);
    }

    /// [`Self::expire`] when the table is full, at most once a second (it walks every entry).
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.swept = Some(now);
        let full = Duration::from_secs_f64(CHALLENGE_BURST / CHALLENGES_PER_SECOND);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < full);
    }

    /// Sources tracked now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// IPv4 (and IPv4-mapped) by address, IPv6 by /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}
