//! `tern derp --verify-clients`: only nodes of our tailnet may use the relay. After a client's
//! ClientInfo the server asks the local tern daemon (LocalAPI `whois`) whether the client's node
//! key is the daemon's own or one of its netmap peers, as Go's derper asks tailscaled.
//!
//! Answers are cached for [`CACHE_TTL`] so a reconnect storm does not hammer the daemon. A daemon
//! that cannot be asked means refusal (fail closed); that is not cached, so the relay recovers as
//! soon as the daemon is back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::limits::RateLimitedLog;
use crate::keys::NodePublic;
use crate::localapi::{self, LocalApiError};

/// How long a yes or no from the daemon is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Keys remembered at most; a flood of random keys cannot grow the cache past this.
const CACHE_MAX: usize = 4096;
/// "Daemon unreachable" is logged at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a client may not use the relay.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("node key {0} is not in the tailnet of the local tern daemon")]
    NotInTailnet(NodePublic),
    #[error("cannot verify the client: {0}")]
    Daemon(#[from] LocalApiError),
}

/// Asks the daemon, with a small cache.
pub struct Verifier {
    api: localapi::Client,
    socket: PathBuf,
    cache: Mutex<HashMap<NodePublic, (bool, Instant)>>,
    error_log: Mutex<RateLimitedLog>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier asking the daemon on this LocalAPI socket.
    pub fn new(socket: PathBuf) -> Verifier {
        Verifier {
            api: localapi::Client::new(socket.clone()),
            socket,
            cache: Mutex::new(HashMap::new()),
            error_log: Mutex::new(RateLimitedLog::new(ERROR_LOG_EVERY)),
        }
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<NodePublic, (bool, Instant)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok` when `key` is the daemon's or one of its peers'.
    pub async fn check(&self, key: &NodePublic) -> Result<(), VerifyError> {
        let allowed = match self.cached(key, Instant::now()) {
            Some(allowed) => allowed,
            None => self.ask(key).await?,
        };
        if allowed {
            Ok(())
        } else {
            Err(VerifyError::NotInTailnet(*key))
        }
    }

    fn cached(&self, key: &NodePublic, now: Instant) -> Option<bool> {
        let (allowed, at) = *self.cache().get(key)?;
        (now.saturating_duration_since(at) < CACHE_TTL).then_some(allowed)
    }

    async fn ask(&self, key: &NodePublic) -> Result<bool, VerifyError> {
        match self.api.whois(key).await {
            Ok(found) => {
                let allowed = found.is_some();
                self.remember(*key, allowed, Instant::now());
                Ok(allowed)
            }
            Err(e) => {
                let mut log = self.error_log.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(suppressed) = log.allow(Instant::now()) {
                    tracing::warn!(
                        socket = %self.socket.display(), error = %e, suppressed,
                        "derp: --verify-clients cannot ask the tern daemon; refusing clients"
                    );
                }
                Err(e.into())
            }
        }
    }

    fn remember(&self, key: NodePublic, allowed: bool, now: Instant) {
        let mut cache = self.cache();
        if cache.len() >= CACHE_MAX && !cache.contains_key(&key) {
            cache.retain(|_, (_, at)| now.saturating_duration_since(*at) < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                // All fresh: a flood of distinct keys. Start over rather than grow.
                cache.clear();
            }
        }
        cache.insert(key, (allowed, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stand-in for the daemon's LocalAPI: knows `known`, counts requests.
    async fn fake_daemon(dir: &std::path::Path, known: NodePublic) -> (PathBuf, Arc<AtomicUsize>) {
        let path = dir.join("tern.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (status, body) = if head.contains(&known.to_string()) {
                    let json = format!(
                        r#"{{"node_key":"{known}","hostname":"h","name":"h.ts","is_self":false}}"#
                    );
                    ("200 OK", json)
                } else {
                    (
                        "404 Not Found",
                        r#"{"error":"no node with that key"}"#.to_string(),
                    )
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        (path, asked)
    }

    #[tokio::test]
    async fn known_keys_pass_unknown_are_refused_and_answers_are_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let known = crate::keys::NodePrivate::generate().public();
        let stranger = crate::keys::NodePrivate::generate().public();
        let (socket, asked) = fake_daemon(tmp.path(), known).await;
        let verifier = Verifier::new(socket);
        for _ in 0..5 {
            verifier.check(&known).await.expect("a tailnet node");
            assert!(matches!(
                verifier.check(&stranger).await,
                Err(VerifyError::NotInTailnet(k)) if k == stranger
            ));
        }
        assert_eq!(asked.load(Ordering::Relaxed), 2, "one question per key");
        // Stale answers are asked again.
        let old = Instant::now() - CACHE_TTL - Duration::from_secs(1);
        verifier.remember(known, true, old);
        verifier.check(&known).await.unwrap();
        assert_eq!(asked.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn no_daemon_means_refusal_and_is_not_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let key = crate::keys::NodePrivate::generate().public();
        let verifier = Verifier::new(tmp.path().join("nobody.sock"));
        assert!(matches!(
            verifier.check(&key).await,
            Err(VerifyError::Daemon(_))
        ));
        assert!(verifier.cached(&key, Instant::now()).is_none());
    }

    #[test]
    fn the_cache_is_bounded() {
        let verifier = Verifier::new(PathBuf::from("/nonexistent"));
        let now = Instant::now();
        for i in 0..(CACHE_MAX + 10) {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
            verifier.remember(NodePublic::from_bytes(bytes), false, now);
        }
        assert!(verifier.cache().len() <= CACHE_MAX);
    }
}
