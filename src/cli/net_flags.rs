//! The routing flags `tern set` and `tern up` share: exit node (use and offer), subnet routes,
//! netfilter. Booleans take `--flag` (true) or `--flag=false`, as tailscale's do.

use clap::Args;
use ipnet::IpNet;

use crate::localapi::NetPrefsPatch;

#[derive(Debug, Clone, Default, Args)]
pub struct NetFlags {
    /// Send all traffic through this peer (its name or tailnet IP); an empty value
    /// (`--exit-node=`) stops using one. While tern runs and the exit node is gone, traffic
    /// does not fall back to the local network (fail closed).
    #[arg(long, value_name = "NAME|IP")]
    pub exit_node: Option<String>,
    /// With an exit node, reach the local network directly.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub exit_node_allow_lan_access: Option<bool>,
    /// Offer this node as an exit node (advertises 0.0.0.0/0 and ::/0; control must approve).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub advertise_exit_node: Option<bool>,
    /// Offer these subnets to the tailnet, e.g. `10.0.0.0/24,192.168.1.0/24`; an empty value
    /// clears them. Forwarding must be on (tern says what to set).
    #[arg(long, value_name = "CIDR,...", value_parser = parse_routes)]
    pub advertise_routes: Option<Routes>,
    /// Use the subnet routes other nodes offer.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub accept_routes: Option<bool>,
    /// Masquerade traffic forwarded to advertised subnets and the internet (default true).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub snat_subnet_routes: Option<bool>,
    /// Point the host's resolver (/etc/resolv.conf) at MagicDNS, 100.100.100.100 (default true).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub accept_dns: Option<bool>,
    /// Drop connections from other interfaces into the TUN that are not replies (off by default).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub stateful_filtering: Option<bool>,
    /// Firewall rules: `on` (chains and jumps), `nodivert` (chains only), `off` (none).
    #[arg(long, value_name = "MODE", value_parser = ["on", "nodivert", "off"])]
    pub netfilter_mode: Option<String>,
}

/// Validated `--advertise-routes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes(pub Vec<IpNet>);

fn parse_routes(text: &str) -> Result<Routes, String> {
    crate::routing::parse_advertised_routes(text)
        .map(Routes)
        .map_err(|e| e.to_string())
}

impl NetFlags {
    /// The prefs change these flags ask for.
    pub fn patch(&self) -> NetPrefsPatch {
        NetPrefsPatch {
            exit_node: self.exit_node.clone(),
            exit_node_allow_lan_access: self.exit_node_allow_lan_access,
            advertise_exit_node: self.advertise_exit_node,
            advertise_routes: self.advertise_routes.clone().map(|r| r.0),
            accept_routes: self.accept_routes,
            snat_subnet_routes: self.snat_subnet_routes,
            netfilter_mode: self.netfilter_mode.clone(),
            accept_dns: self.accept_dns,
            stateful_filtering: self.stateful_filtering,
        }
    }
}

/// Advice when this node forwards for others but its kernel will not: the daemon checks its
/// own network namespace (printed by set/up, as `tailscale set` does).
pub async fn print_forwarding_advice(client: &crate::localapi::Client, patch: &NetPrefsPatch) {
    let forwards = patch.advertise_exit_node == Some(true)
        || patch
            .advertise_routes
            .as_ref()
            .is_some_and(|r| !r.is_empty());
    if !forwards {
        return;
    }
    match client.check_ip_forwarding().await {
        Ok(check) => {
            for problem in check.warning.lines().filter(|l| !l.is_empty()) {
                eprintln!("Warning: {problem}");
            }
        }
        Err(e) => eprintln!("Warning: could not check IP forwarding: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    fn flags(args: &[&str]) -> Result<super::NetFlags, clap::Error> {
        let mut full = vec!["tern", "set"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Set(args) => Ok(args.net),
            other => panic!("not set: {other:?}"),
        }
    }

    #[test]
    fn booleans_take_a_bare_flag_or_a_value() {
        assert_eq!(
            flags(&["--accept-routes"]).unwrap().accept_routes,
            Some(true)
        );
        assert_eq!(
            flags(&["--accept-routes=false"]).unwrap().accept_routes,
            Some(false)
        );
        assert_eq!(flags(&[]).unwrap().accept_routes, None);
        assert!(flags(&["--accept-routes=maybe"]).is_err());
    }

    #[test]
    fn bad_routes_and_modes_are_refused_with_the_fix() {
        let err = flags(&["--advertise-routes=10.0.0.1/24"]).unwrap_err();
        assert!(err.to_string().contains("write 10.0.0.0/24"), "{err}");
        let err = flags(&["--advertise-routes=100.64.0.0/24"]).unwrap_err();
        assert!(err.to_string().contains("tailnet"), "{err}");
        let err = flags(&["--netfilter-mode=sometimes"]).unwrap_err();
        assert!(err.to_string().contains("nodivert"), "{err}");
        let ok = flags(&["--advertise-routes=10.2.9.0/24", "--exit-node=c2"]).unwrap();
        let patch = ok.patch();
        assert_eq!(patch.exit_node.as_deref(), Some("c2"));
        assert_eq!(patch.advertise_routes.unwrap().len(), 1);
        assert_eq!(
            flags(&["--advertise-routes="])
                .unwrap()
                .patch()
                .advertise_routes,
            Some(vec![])
        );
    }
}
