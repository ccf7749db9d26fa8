//! DERP nodes that the map names only by `HostName` (Tailscale's and most Headscale maps): their
//! addresses from DNS, with the system's resolver configuration (`/etc/resolv.conf`, read through
//! hickory). Go's rule per family: an IP in the map's `IPv4`/`IPv6` is used as is, `"none"` means
//! never that family, and an empty field means "resolve `HostName`". Used by the DERP dialer and by
//! netcheck (STUN and the TCP latency probe), so both reach the same addresses.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;

use crate::control::tailcfg::{DerpNode, DerpRegion};

/// How long one host name may take to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a node's `IPv4` or `IPv6` field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapAddr {
    /// Use this address.
    Ip(IpAddr),
    /// `"none"`: never this family.
    Never,
    /// Empty: resolve `HostName`.
    Resolve,
}

/// Reads an `IPv4`/`IPv6` field (`v6` says which family it must be).
pub fn map_addr(field: &str, v6: bool) -> MapAddr {
    match field {
        "" => MapAddr::Resolve,
        "none" => MapAddr::Never,
        text => match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => MapAddr::Ip(ip),
            // A malformed field is no address; Go fails the dial of that family likewise.
            _ => MapAddr::Never,
        },
    }
}

/// Whether `node` needs DNS for either family.
pub fn needs_dns(node: &DerpNode) -> bool {
    node.host_name.parse::<IpAddr>().is_err()
        && (map_addr(&node.ipv4, false) == MapAddr::Resolve
            || map_addr(&node.ipv6, true) == MapAddr::Resolve)
}

/// Errors resolving a DERP host name.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no resolver configuration: {0}")]
    Config(String),
    #[error("resolving {host}: {reason}")]
    Lookup { host: String, reason: String },
    #[error("resolving {host}: no answer within {RESOLVE_TIMEOUT:?}")]
    Timeout { host: String },
}

/// The addresses of `host` from DNS.
pub async fn lookup(host: &str) -> Result<Vec<IpAddr>, ResolveError> {
    let resolver = TokioResolver::builder_tokio()
        .map_err(|e| ResolveError::Config(e.to_string()))?
        .build()
        .map_err(|e| ResolveError::Config(e.to_string()))?;
    let answer = tokio::time::timeout(RESOLVE_TIMEOUT, resolver.lookup_ip(host))
        .await
        .map_err(|_| ResolveError::Timeout { host: host.into() })?
        .map_err(|e| ResolveError::Lookup {
            host: host.into(),
            reason: e.to_string(),
        })?;
    Ok(answer.iter().collect())
}

/// A copy of `node` whose empty `IPv4`/`IPv6` are filled from DNS (`"none"` where DNS has no
/// address of that family). A node the map gives IPs, or whose `HostName` is an IP, comes back
/// unchanged; so does one whose name does not resolve (with the error).
pub async fn resolve_node(node: &DerpNode) -> Result<DerpNode, ResolveError> {
    if !needs_dns(node) {
        return Ok(node.clone());
    }
    let ips = lookup(&node.host_name).await?;
    Ok(fill_from(node, &ips))
}

/// Fills empty address fields from `ips` (first of each family).
pub fn fill_from(node: &DerpNode, ips: &[IpAddr]) -> DerpNode {
    let mut out = node.clone();
    let first = |v6: bool| {
        ips.iter()
            .find(|ip| ip.is_ipv6() == v6)
            .map_or_else(|| "none".to_string(), IpAddr::to_string)
    };
    if map_addr(&node.ipv4, false) == MapAddr::Resolve {
        out.ipv4 = first(false);
    }
    if map_addr(&node.ipv6, true) == MapAddr::Resolve {
        out.ipv6 = first(true);
    }
    out
}

/// Every region with its host-name-only nodes resolved; a node that does not resolve is left
/// as it was (netcheck then has no address for it, as Go's would not).
pub async fn resolve_regions(regions: &BTreeMap<u16, DerpRegion>) -> BTreeMap<u16, DerpRegion> {
    let mut out = regions.clone();
    for region in out.values_mut() {
        for node in region.nodes.iter_mut().filter(|n| needs_dns(n)) {
            match resolve_node(node).await {
                Ok(resolved) => *node = resolved,
                Err(e) => tracing::debug!(node = %node.name, error = %e, "DERP node not resolved"),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, v4: &str, v6: &str) -> DerpNode {
        DerpNode {
            name: "1a".into(),
            host_name: host.into(),
            ipv4: v4.into(),
            ipv6: v6.into(),
            ..Default::default()
        }
    }

    #[test]
    fn map_fields_follow_go() {
        assert_eq!(
            map_addr("198.18.0.10", false),
            MapAddr::Ip("198.18.0.10".parse().unwrap())
        );
        assert_eq!(map_addr("", false), MapAddr::Resolve);
        assert_eq!(map_addr("none", true), MapAddr::Never);
        assert_eq!(map_addr("2001:db8::1", false), MapAddr::Never);
        assert_eq!(map_addr("garbage", false), MapAddr::Never);
    }

    #[test]
    fn only_names_without_addresses_need_dns() {
        assert!(needs_dns(&node("derp.example", "", "none")));
        assert!(!needs_dns(&node("derp.example", "198.18.0.10", "none")));
        assert!(!needs_dns(&node("198.18.0.10", "", "")));
        assert!(!needs_dns(&node("derp.example", "none", "none")));
    }

    #[test]
    fn dns_answers_fill_only_empty_fields() {
        let ips: Vec<IpAddr> = vec![
            "2001:db8::9".parse().unwrap(),
            "198.18.0.9".parse().unwrap(),
        ];
        let filled = fill_from(&node("derp.example", "", ""), &ips);
        assert_eq!(
            (filled.ipv4.as_str(), filled.ipv6.as_str()),
            ("198.18.0.9", "2001:db8::9")
        );
        let kept = fill_from(&node("derp.example", "198.18.0.1", ""), &ips[..1]);
        assert_eq!(
            (kept.ipv4.as_str(), kept.ipv6.as_str()),
            ("198.18.0.1", "2001:db8::9")
        );
        let v4_only = fill_from(&node("derp.example", "", ""), &ips[1..]);
        assert_eq!(v4_only.ipv6, "none");
    }
}
