//! The host's resolver pointed at quad-100 (`--accept-dns`, on by default as in Go), applied
//! after the routes (quad-100 must be reachable first) and taken back before anything else on
//! the way out (Drop covers an aborted or panicking engine; the next start covers SIGKILL).

use crate::dns::os::{BaseConfig, DirectFiles, Manager, OsDnsConfig};
use crate::dns::MagicDnsConfig;
use crate::status::DnsStatus;

pub(super) struct OsDns {
    files: DirectFiles,
    manager: Manager,
    /// What the host had, read before tern wrote anything.
    base: BaseConfig,
    applied: Option<OsDnsConfig>,
    error: Option<String>,
}

impl OsDns {
    /// Reads who owns /etc/resolv.conf and what it says now (a crashed run was undone at the
    /// daemon's start).
    pub(super) fn start() -> Self {
        let files = DirectFiles::system();
        let text = std::fs::read_to_string(&files.path).unwrap_or_default();
        OsDns {
            manager: Manager::detect(&text),
            base: files.base(),
            files,
            applied: None,
            error: None,
        }
    }

    /// What the host had (the forwarder's upstreams of last resort).
    pub(super) fn base(&self) -> &BaseConfig {
        &self.base
    }

    /// Points the host at quad-100 for `magic` (or restores it when `accept` is off or there is
    /// nothing to point at).
    pub(super) fn apply(&mut self, magic: &MagicDnsConfig, accept: bool) {
        let wanted = if accept {
            OsDnsConfig::compile(magic, &self.base)
        } else {
            OsDnsConfig::default()
        };
        if self.applied.as_ref() == Some(&wanted) || (self.applied.is_none() && wanted.is_empty()) {
            return;
        }
        if self.manager != Manager::Direct {
            self.error = Some(format!(
                "{} manages /etc/resolv.conf; tern supports only the direct mode yet, so the \
                 host's DNS is left alone (ask quad-100 directly: 100.100.100.100)",
                self.manager.name()
            ));
            return;
        }
        match self.files.apply(&wanted) {
            Ok(()) => {
                tracing::info!(config = ?wanted, "OS DNS set (direct /etc/resolv.conf)");
                self.applied = (!wanted.is_empty()).then_some(wanted);
                self.error = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing /etc/resolv.conf");
                self.error = Some(format!("writing {}: {e}", self.files.path.display()));
            }
        }
    }

    /// Puts the host's own file back.
    pub(super) fn restore(&mut self) {
        if self.applied.take().is_some() {
            if let Err(e) = self.files.restore() {
                tracing::warn!(error = %e, "restoring /etc/resolv.conf");
            }
        }
    }

    pub(super) fn status(&self, accept: bool) -> DnsStatus {
        DnsStatus {
            accept_dns: accept,
            manager: self.manager.name().to_string(),
            nameservers: self
                .applied
                .iter()
                .flat_map(|c| c.nameservers.iter().map(ToString::to_string))
                .collect(),
            search_domains: self
                .applied
                .iter()
                .flat_map(|c| c.search.iter().cloned())
                .collect(),
            error: self.error.clone(),
        }
    }
}

impl Drop for OsDns {
    fn drop(&mut self) {
        self.restore();
    }
}
