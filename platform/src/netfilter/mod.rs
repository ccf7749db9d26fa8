//! Netfilter rules the way tailscaled installs them: chains `ts-input`, `ts-forward` (table
//! `filter`) and `ts-postrouting` (table `nat`), jumped to from the top of INPUT, FORWARD and
//! POSTROUTING, with nftables (`nft -j`) or iptables. Users' scripts know this layout, so it is
//! kept exactly. Synchronous: it runs subprocesses; call it from `spawn_blocking`.

mod cmd;
mod detect;
mod iptables;
mod nft;
mod rules;

use std::fmt;
use std::str::FromStr;

use crate::error::{PlatformError, Result};

pub use detect::detect_kind;

/// How much of the firewall tern manages (tailscaled's `--netfilter-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NetfilterMode {
    /// Chains, rules and the jumps into them.
    #[default]
    On,
    /// Chains and rules, but no jumps: the admin hooks them in where they want.
    NoDivert,
    /// Nothing.
    Off,
}

impl FromStr for NetfilterMode {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "on" => Ok(Self::On),
            "nodivert" => Ok(Self::NoDivert),
            "off" => Ok(Self::Off),
            _ => Err(PlatformError::InvalidNetfilterMode(s.to_string())),
        }
    }
}

impl fmt::Display for NetfilterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::NoDivert => "nodivert",
            Self::Off => "off",
        })
    }
}

/// Which tool programs the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirewallKind {
    Nftables,
    Iptables,
}

impl fmt::Display for FirewallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nftables => "nftables",
            Self::Iptables => "iptables",
        })
    }
}

/// What the rules should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetfilterConfig {
    /// The TUN interface, e.g. `tailscale0` (matched exactly, not as a prefix).
    pub tun_name: String,
    pub mode: NetfilterMode,
    /// This node's tailnet addresses: packets from them on `lo` are accepted first.
    pub addrs: Vec<ipnet::IpNet>,
    /// The magicsock UDP port to accept in `ts-input`.
    pub magicsock_port: Option<u16>,
    /// Masquerade forwarded traffic from the tailnet (subnet routes / exit node).
    pub snat_subnet_routes: bool,
    /// Drop new connections from outside towards the TUN.
    pub stateful_filtering: bool,
    /// Also program the ip6 tables.
    pub ipv6: bool,
}

impl NetfilterConfig {
    /// Defaults for `tun_name`: mode on, SNAT on, stateful filtering off, IPv6 on.
    pub fn new(tun_name: &str) -> Self {
        Self {
            tun_name: tun_name.to_string(),
            mode: NetfilterMode::On,
            addrs: Vec::new(),
            magicsock_port: None,
            snat_subnet_routes: true,
            stateful_filtering: false,
            ipv6: true,
        }
    }
}

impl Default for NetfilterConfig {
    fn default() -> Self {
        Self::new("tailscale0")
    }
}

/// The rules tern installed with one kind, and what they should be.
pub struct Netfilter {
    kind: FirewallKind,
    /// The last config applied, so lost rules can be restored; None when nothing is ours.
    applied: Option<NetfilterConfig>,
    /// Whether nfnetlink announces changes to our rules (see [`Self::changes_announced`]);
    /// learnt at the first `apply`.
    announced: Option<bool>,
}

impl Netfilter {
    /// A manager for `kind`; touches nothing until `apply`.
    pub fn new(kind: FirewallKind) -> Self {
        Self {
            kind,
            applied: None,
            announced: None,
        }
    }

    /// Whether a change to these rules by someone else is announced on nfnetlink's nftables
    /// group (`watch::HostWatch`): always with nft, with iptables only on its nf_tables
    /// backend. False until the first `apply` found out.
    pub fn changes_announced(&self) -> bool {
        self.announced == Some(true)
    }

    /// The kind this manager programs.
    pub fn kind(&self) -> FirewallKind {
        self.kind
    }

    /// Makes the live state exactly `cfg`: our chains rebuilt, hooks as the mode says, families
    /// and modes no longer wanted removed. Others' rules and chains are left alone. Idempotent.
    pub fn apply(&mut self, cfg: &NetfilterConfig) -> Result<()> {
        let started = std::time::Instant::now();
        match self.kind {
            FirewallKind::Nftables => nft::apply(cfg)?,
            FirewallKind::Iptables => iptables::apply(cfg)?,
        }
        let kind = self.kind;
        self.announced.get_or_insert_with(|| match kind {
            FirewallKind::Nftables => true,
            FirewallKind::Iptables => iptables::backend_is_nftables(),
        });
        tracing::info!(kind = %self.kind, mode = %cfg.mode, elapsed = ?started.elapsed(), "netfilter applied");
        self.applied = (cfg.mode != NetfilterMode::Off).then(|| cfg.clone());
        Ok(())
    }

    /// Re-applies the last config if any chain, hook or rule of ours has gone missing (someone
    /// ran `nft flush ruleset`, `iptables -F`, a firewall reload). Returns whether it did.
    pub fn restore_if_missing(&mut self) -> Result<bool> {
        let Some(cfg) = self.applied.clone() else {
            return Ok(false);
        };
        let missing = match self.kind {
            FirewallKind::Nftables => nft::missing(&cfg)?,
            FirewallKind::Iptables => iptables::missing(&cfg)?,
        };
        if missing {
            tracing::warn!(kind = %self.kind, "netfilter rules missing, restoring");
            self.apply(&cfg)?;
        }
        Ok(missing)
    }

    /// Clean stop: removes the hooks, then flushes and deletes our chains.
    pub fn remove(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        match self.kind {
            FirewallKind::Nftables => nft::remove()?,
            FirewallKind::Iptables => iptables::remove()?,
        }
        tracing::info!(kind = %self.kind, elapsed = ?started.elapsed(), "netfilter removed");
        self.applied = None;
        Ok(())
    }
}

/// Crash cleanup (daemon start, `tern daemon --cleanup`): removes our chains and jumps, and a
/// Go tailscaled's leftovers, from nftables (if `nft` exists) and iptables/ip6tables (if they
/// exist). nft runs first: it also sees iptables-nft's rules, and once our nft-native rules are
/// gone iptables-nft no longer trips over rules it cannot parse. Every step runs; the first
/// error is returned.
pub fn cleanup_all() -> Result<()> {
    let mut first_err = None;
    let mut note = |r: Result<()>, what: &str| {
        if let Err(e) = r {
            tracing::warn!(error = %e, "netfilter cleanup: {what}");
            first_err.get_or_insert(e);
        }
    };
    if cmd::which("nft").is_some() {
        note(nft::cleanup(), "nftables");
    }
    for family in rules::Family::ALL {
        if cmd::which(family.iptables()).is_some() {
            note(iptables::remove_family(family), family.iptables());
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_round_trips_and_rejects_unknown() {
        for s in ["on", "nodivert", "off"] {
            let m: NetfilterMode = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
        assert!("On".parse::<NetfilterMode>().is_err());
        assert!("".parse::<NetfilterMode>().is_err());
        assert_eq!(FirewallKind::Nftables.to_string(), "nftables");
        assert_eq!(FirewallKind::Iptables.to_string(), "iptables");
    }

    #[test]
    fn config_defaults() {
        let c = NetfilterConfig::default();
        assert_eq!(c.tun_name, "tailscale0");
        assert!(c.snat_subnet_routes && c.ipv6 && !c.stateful_filtering);
        assert_eq!(c.mode, NetfilterMode::On);
    }
}
