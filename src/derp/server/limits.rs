//! Admission control for `tern derp`: a cap on open connections, a cap per source on
//! connections that have not finished the DERP handshake, and the pause after a failed accept.
//!
//! IPv6 sources count per /64 (one host usually owns a whole /64, so per-address counting
//! would not limit it); IPv4-mapped addresses count as their IPv4 address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many open connections")]
    MaxConns,
    #[error("too many unauthenticated connections from this source")]
    UnauthPerSource,
}

#[derive(Default)]
struct State {
    open: usize,
    unauth: HashMap<IpAddr, usize>,
}

/// The counters behind the caps. Shared by every connection's [`Permit`].
pub(super) struct Limits {
    max_conns: usize,
    max_unauth_per_source: usize,
    state: Mutex<State>,
}

impl Limits {
    pub(super) fn new(max_conns: usize, max_unauth_per_source: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max_conns,
            max_unauth_per_source,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection from `ip`, counted as unauthenticated until
    /// [`Permit::authenticated`].
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let source = source_key(ip);
        let mut state = self.state();
        if state.open >= self.max_conns {
            return Err(Refusal::MaxConns);
        }
        let unauth = state.unauth.entry(source).or_default();
        if *unauth >= self.max_unauth_per_source {
            return Err(Refusal::UnauthPerSource);
        }
        *unauth += 1;
        state.open += 1;
        Ok(Permit {
            limits: self.clone(),
            source,
            unauth: true,
        })
    }

    /// Connections open now.
    pub(super) fn open(&self) -> usize {
        self.state().open
    }

    fn release_unauth(&self, state: &mut State, source: IpAddr) {
        if let Some(n) = state.unauth.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Keeps the map as small as the set of sources mid-handshake.
                state.unauth.remove(&source);
            }
        }
    }
}

/// One admitted connection; dropping it frees its slots.
pub(super) struct Permit {
    limits: Arc<Limits>,
    source: IpAddr,
    unauth: bool,
}

impl Permit {
    /// The DERP handshake finished: the connection no longer counts against its source.
    pub(super) fn authenticated(&mut self) {
        if std::mem::take(&mut self.unauth) {
            let mut state = self.limits.state();
            self.limits.release_unauth(&mut state, self.source);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.limits.state();
        state.open = state.open.saturating_sub(1);
        if self.unauth {
            self.limits.release_unauth(&mut state, self.source);
        }
    }
}

/// What a source is counted as: IPv4 itself, IPv6 its /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// How long to wait before the next accept after `error`. Out of descriptors or memory the
/// listener stays readable, so retrying at once would spin; a connection reset before we took
/// it concerns only that connection.
pub(super) fn accept_pause(error: &std::io::Error) -> Duration {
    match error.raw_os_error() {
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM) => Duration::ZERO,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            Duration::from_millis(100)
        }
        _ => Duration::from_millis(50),
    }
}

/// A warning at most once per period, with how many were left out in between.
pub(super) struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub(super) fn new(every: Duration) -> Self {
        RateLimitedLog {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when it is time to log (`n` = messages suppressed since the last one).
    pub(super) fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unauthenticated_cap_is_per_source_and_freed_by_auth_or_drop() {
        let limits = Limits::new(100, 2);
        let mut a1 = limits.admit(ip("192.0.2.1")).unwrap();
        let a2 = limits.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(
            limits.admit(ip("192.0.2.1")).err(),
            Some(Refusal::UnauthPerSource)
        );
        // Another source is not affected.
        let _b = limits.admit(ip("192.0.2.2")).unwrap();
        a1.authenticated();
        let a3 = limits.admit(ip("192.0.2.1")).unwrap();
        drop(a2);
        drop(a3);
        assert_eq!(limits.open(), 2);
        drop(a1);
        assert_eq!(limits.open(), 1);
        assert!(!limits.state().unauth.contains_key(&ip("192.0.2.1")));
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let limits = Limits::new(100, 1);
        let _a = limits.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(limits.admit(ip("2001:db8:1:2:ffff::9")).is_err());
        assert!(limits.admit(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn total_cap_counts_authenticated_connections_too() {
        let limits = Limits::new(2, 10);
        let mut a = limits.admit(ip("192.0.2.1")).unwrap();
        a.authenticated();
        let _b = limits.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(limits.admit(ip("192.0.2.3")).err(), Some(Refusal::MaxConns));
        drop(a);
        assert!(limits.admit(ip("192.0.2.3")).is_ok());
    }

    #[test]
    fn accept_pauses_longer_when_out_of_descriptors() {
        let err = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(accept_pause(&err(libc::ECONNABORTED)), Duration::ZERO);
        assert!(accept_pause(&err(libc::EMFILE)) > accept_pause(&err(libc::EINVAL)));
        assert!(accept_pause(&err(libc::EINVAL)) > Duration::ZERO);
    }

    #[test]
    fn log_is_rate_limited_and_counts_what_it_left_out() {
        let mut log = RateLimitedLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(log.allow(t0), Some(0));
        assert_eq!(log.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(6)), Some(2));
    }
}
