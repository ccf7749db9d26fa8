//! The host's resolver pointed at quad-100 (`--accept-dns`, on by default as in Go), applied
//! after the routes (quad-100 must be reachable first) and taken back before anything else on
//! the way out (Drop covers an aborted or panicking engine; the next start covers SIGKILL).
//!
//! Three managers are driven: **direct** (/etc/resolv.conf rewritten, [`crate::dns::os`]),
//! **systemd-resolved** over D-Bus (the TUN link's DNS, [`crate::dns::resolved`]) and
//! **openresolv** (`resolvconf -x -a tailscale`, [`crate::dns::resolvconf`]); with
//! NetworkManager or Debian's resolvconf owning the file the host is left alone, with a note in
//! status. A file that names resolvconf while no `resolvconf` is installed is handled directly,
//! as Go does.

use crate::dns::os::{BaseConfig, DirectFiles, Manager, OsDnsConfig};
use crate::dns::resolvconf::{self, Flavor};
use crate::dns::resolved::{LinkConfig, Resolved};
use crate::dns::MagicDnsConfig;
use crate::status::DnsStatus;

enum Backend {
    Direct(DirectFiles),
    Resolved {
        bus: Resolved,
        ifindex: i32,
    },
    /// openresolv's `resolvconf`: tern's record is the `tailscale` interface.
    Openresolv,
    /// A manager tern does not drive (the reason, for status).
    Unsupported(String),
}

/// What was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Applied {
    File(OsDnsConfig),
    Link(LinkConfig),
}

pub(super) struct OsDns {
    backend: Backend,
    manager: Manager,
    /// What the host had, read before tern wrote anything (direct mode only: resolved keeps
    /// routing what is not ours to the other links).
    base: BaseConfig,
    applied: Option<Applied>,
    error: Option<String>,
}

impl OsDns {
    /// Finds who owns /etc/resolv.conf (a crashed run was undone at the daemon's start);
    /// `ifindex` is the TUN's, for resolved.
    pub(super) async fn start(ifindex: u32) -> Self {
        let files = DirectFiles::system();
        let text = std::fs::read_to_string(&files.path).unwrap_or_default();
        let manager = Manager::detect(&text);
        let (backend, base) = match manager {
            Manager::Direct => {
                let base = files.base();
                (Backend::Direct(files), base)
            }
            Manager::SystemdResolved => match Resolved::connect().await {
                Ok(bus) => (
                    Backend::Resolved {
                        bus,
                        ifindex: i32::try_from(ifindex).unwrap_or(0),
                    },
                    BaseConfig::default(),
                ),
                Err(e) => (
                    Backend::Unsupported(format!(
                        "/etc/resolv.conf says systemd-resolved manages it, but resolved does \
                         not answer on the system bus ({e}); the host's DNS is left alone"
                    )),
                    BaseConfig::default(),
                ),
            },
            Manager::Resolvconf => match resolvconf::flavor().await {
                Some(Flavor::Openresolv) => (Backend::Openresolv, resolvconf::base().await),
                Some(Flavor::Debian) => (
                    Backend::Unsupported(
                        "Debian's resolvconf manages /etc/resolv.conf; tern drives direct \
                         files, systemd-resolved and openresolv, so the host's DNS is left \
                         alone (ask quad-100 directly: 100.100.100.100)"
                            .into(),
                    ),
                    BaseConfig::default(),
                ),
                // The comment names resolvconf but none is installed: the file is ours to write.
                None => {
                    let base = files.base();
                    (Backend::Direct(files), base)
                }
            },
            other => (
                Backend::Unsupported(format!(
                    "{} manages /etc/resolv.conf; tern drives direct files, systemd-resolved \
                     and openresolv, so the host's DNS is left alone (ask quad-100 \
                     directly: 100.100.100.100)",
                    other.name()
                )),
                BaseConfig::default(),
            ),
        };
        OsDns {
            backend,
            manager,
            base,
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
    pub(super) async fn apply(&mut self, magic: &MagicDnsConfig, accept: bool) {
        let wanted = match &self.backend {
            Backend::Direct(_) if accept => {
                Some(Applied::File(OsDnsConfig::compile(magic, &self.base)))
            }
            Backend::Resolved { .. } if accept => Some(Applied::Link(LinkConfig::compile(magic))),
            Backend::Openresolv if accept => {
                Some(Applied::File(OsDnsConfig::compile(magic, &self.base)))
            }
            Backend::Unsupported(why) => {
                self.error = accept.then(|| why.clone());
                return;
            }
            _ => None,
        }
        .filter(|w| !is_empty(w));
        if wanted == self.applied {
            return;
        }
        let result = match (&self.backend, &wanted) {
            (Backend::Direct(files), Some(Applied::File(cfg))) => {
                files.apply(cfg).map_err(|e| e.to_string())
            }
            (Backend::Resolved { bus, ifindex }, Some(Applied::Link(cfg))) => {
                bus.set_link(*ifindex, cfg).await.map_err(|e| e.to_string())
            }
            (Backend::Openresolv, Some(Applied::File(cfg))) => {
                resolvconf::set(cfg).await.map_err(|e| e.to_string())
            }
            _ => {
                self.restore().await;
                return;
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(manager = self.manager.name(), config = ?wanted, "OS DNS set");
                self.applied = wanted;
                self.error = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, manager = self.manager.name(), "OS DNS");
                self.error = Some(format!("{}: {e}", self.manager.name()));
            }
        }
    }

    /// Puts the host's own configuration back.
    pub(super) async fn restore(&mut self) {
        if self.applied.is_none() {
            return;
        }
        // `applied` is cleared only once the host has its configuration back: an engine
        // aborted during the await below leaves it set, and `Drop` does the work instead.
        let result = match &self.backend {
            Backend::Direct(files) => files.restore().map(drop).map_err(|e| e.to_string()),
            Backend::Resolved { bus, ifindex } => {
                bus.revert(*ifindex).await.map_err(|e| e.to_string())
            }
            Backend::Openresolv => resolvconf::clear().await.map_err(|e| e.to_string()),
            Backend::Unsupported(_) => Ok(()),
        };
        self.applied = None;
        match result {
            Ok(()) => tracing::info!(manager = self.manager.name(), "OS DNS restored"),
            Err(e) => tracing::warn!(error = %e, "restoring the host's DNS"),
        }
    }

    pub(super) fn status(&self, accept: bool) -> DnsStatus {
        let (nameservers, search_domains) = match &self.applied {
            Some(Applied::File(c)) => (
                c.nameservers.iter().map(ToString::to_string).collect(),
                c.search.clone(),
            ),
            Some(Applied::Link(c)) => (
                c.nameservers.iter().map(ToString::to_string).collect(),
                c.domains
                    .iter()
                    .map(
                        |(d, routing)| {
                            if *routing {
                                format!("~{d}")
                            } else {
                                d.clone()
                            }
                        },
                    )
                    .collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let manager = match self.backend {
            Backend::Openresolv => "openresolv",
            _ => self.manager.name(),
        };
        DnsStatus {
            accept_dns: accept,
            manager: manager.to_string(),
            nameservers,
            search_domains,
            error: self.error.clone(),
            exit_node_doh: None, // the engine adds it
        }
    }
}

fn is_empty(applied: &Applied) -> bool {
    match applied {
        Applied::File(c) => c.is_empty(),
        Applied::Link(c) => c.is_empty(),
    }
}

impl Drop for OsDns {
    /// The direct file and openresolv's record are put back at once; resolved forgets a
    /// link's settings when the TUN goes away with the engine.
    fn drop(&mut self) {
        match (&self.backend, self.applied.take()) {
            (Backend::Direct(files), Some(_)) => {
                if let Err(e) = files.restore() {
                    tracing::warn!(error = %e, "restoring /etc/resolv.conf");
                }
            }
            (Backend::Openresolv, Some(_)) => resolvconf::clear_blocking(),
            _ => {}
        }
    }
}
