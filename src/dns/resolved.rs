//! systemd-resolved over D-Bus (`org.freedesktop.resolve1`), as tailscaled's `net/dns/resolved.go`
//! drives it: per-link DNS server 100.100.100.100 on the TUN, its domains (search domains, and
//! the MagicDNS/split-DNS suffixes as routing-only `~domain`, or `~.` to take all queries), the
//! link as default route only then, LLMNR and mDNS off, caches flushed; `RevertLink` on the way
//! out (Go's own revert never reaches resolved; tern sends it). The system bus address comes from
//! `DBUS_SYSTEM_BUS_ADDRESS` when set (zbus), as with resolvectl.

use std::net::IpAddr;
use std::time::Duration;

use zbus::Connection;

use super::config::MagicDnsConfig;

const DEST: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";
/// One deadline for a whole reconfiguration (Go: 1 s; a little more for a loaded machine).
const DEADLINE: Duration = Duration::from_secs(3);

/// What resolved is told about the TUN link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkConfig {
    pub nameservers: Vec<IpAddr>,
    /// (domain with the final dot, routing only)
    pub domains: Vec<(String, bool)>,
    pub default_route: bool,
}

impl LinkConfig {
    /// Go's resolved mode: quad-100 as the link's server; search domains as search domains;
    /// MagicDNS and split-DNS suffixes as routing-only domains; with resolvers for "." (or
    /// nothing but search domains) the link takes all queries (`~.`, default route).
    pub fn compile(magic: &MagicDnsConfig) -> LinkConfig {
        if magic.local_domains.is_empty() && magic.routes.is_empty() {
            return LinkConfig::default();
        }
        let mut domains: Vec<(String, bool)> = magic
            .search_domains
            .iter()
            .map(|d| (with_dot(d), false))
            .collect();
        let takes_all = magic.routes.contains_key(super::config::ROOT);
        let mut match_domains: Vec<String> = magic.local_domains.clone();
        match_domains.extend(
            magic
                .routes
                .keys()
                .filter(|k| k.as_str() != super::config::ROOT)
                .cloned(),
        );
        if takes_all || match_domains.is_empty() {
            domains.push((".".into(), true));
        } else {
            for d in match_domains {
                let d = with_dot(&d);
                if !domains.iter().any(|(known, _)| *known == d) {
                    domains.push((d, true));
                }
            }
        }
        LinkConfig {
            nameservers: vec![IpAddr::from([100, 100, 100, 100])],
            default_route: domains.iter().any(|(d, _)| d == "."),
            domains,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
    }
}

fn with_dot(domain: &str) -> String {
    format!("{}.", domain.trim_end_matches('.'))
}

/// Errors talking to resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolvedError {
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("systemd-resolved did not answer within {0:?}")]
    Timeout(Duration),
}

/// A connection to resolved on the system bus.
pub struct Resolved {
    conn: Connection,
}

impl Resolved {
    /// Connects to the system bus and pings resolved.
    pub async fn connect() -> Result<Resolved, ResolvedError> {
        let conn = within(Connection::system()).await?;
        let resolved = Resolved { conn };
        within(resolved.conn.call_method(
            Some(DEST),
            PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        ))
        .await?;
        Ok(resolved)
    }

    async fn call<B>(&self, method: &str, body: &B) -> Result<(), ResolvedError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        within(
            self.conn
                .call_method(Some(DEST), PATH, Some(MANAGER), method, body),
        )
        .await
        .map(drop)
    }

    /// Sets the TUN link's DNS (an empty config reverts it).
    pub async fn set_link(&self, ifindex: i32, config: &LinkConfig) -> Result<(), ResolvedError> {
        if config.is_empty() {
            return self.revert(ifindex).await;
        }
        let servers: Vec<(i32, Vec<u8>)> = config
            .nameservers
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => (libc::AF_INET, v4.octets().to_vec()),
                IpAddr::V6(v6) => (libc::AF_INET6, v6.octets().to_vec()),
            })
            .collect();
        self.call("SetLinkDNS", &(ifindex, servers)).await?;
        self.call("SetLinkDomains", &(ifindex, config.domains.clone()))
            .await?;
        if let Err(e) = self
            .call("SetLinkDefaultRoute", &(ifindex, config.default_route))
            .await
        {
            // systemd 237 has no such method: Go ignores it too.
            tracing::debug!(error = %e, "SetLinkDefaultRoute");
        }
        for (method, value) in [("SetLinkLLMNR", "no"), ("SetLinkMulticastDNS", "no")] {
            if let Err(e) = self.call(method, &(ifindex, value)).await {
                tracing::debug!(error = %e, method, "best effort");
            }
        }
        if let Err(e) = self.call("FlushCaches", &()).await {
            tracing::debug!(error = %e, "FlushCaches");
        }
        Ok(())
    }

    /// Forgets everything set on the link.
    pub async fn revert(&self, ifindex: i32) -> Result<(), ResolvedError> {
        self.call("RevertLink", &(ifindex,)).await
    }
}

async fn within<T>(
    fut: impl std::future::Future<Output = Result<T, zbus::Error>>,
) -> Result<T, ResolvedError> {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(result) => result.map_err(ResolvedError::from),
        Err(_) => Err(ResolvedError::Timeout(DEADLINE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn magic(local: &[&str], routes: &[&str], search: &[&str]) -> MagicDnsConfig {
        MagicDnsConfig {
            local_domains: local.iter().map(|s| s.to_string()).collect(),
            routes: routes
                .iter()
                .map(|s| (s.to_string(), vec!["192.0.2.53:53".parse().unwrap()]))
                .collect(),
            search_domains: search.iter().map(|s| s.to_string()).collect(),
            ..MagicDnsConfig::default()
        }
    }

    #[test]
    fn magic_dns_alone_routes_only_its_domains() {
        let c = LinkConfig::compile(&magic(
            &["lab.tern.test.", "64.100.in-addr.arpa."],
            &["example.lab."],
            &["lab.tern.test."],
        ));
        assert_eq!(c.nameservers, [IpAddr::from([100, 100, 100, 100])]);
        assert_eq!(
            c.domains,
            [
                ("lab.tern.test.".to_string(), false),
                ("64.100.in-addr.arpa.".to_string(), true),
                ("example.lab.".to_string(), true),
            ]
        );
        assert!(!c.default_route, "split: not the default route");
    }

    #[test]
    fn global_resolvers_take_all_queries() {
        let c = LinkConfig::compile(&magic(&["lab.tern.test."], &["."], &[]));
        assert_eq!(c.domains, [(".".to_string(), true)]);
        assert!(c.default_route);
        assert!(LinkConfig::compile(&MagicDnsConfig::default()).is_empty());
    }
}
