//! Choosing nftables or iptables the way tailscaled does (util/linuxfw/detector.go).

use super::cmd::which;
use super::rules::Family;
use super::{iptables, nft, FirewallKind};
use crate::error::{PlatformError, Result};

/// Env vars that force a kind, in the order they are read (ours wins over tailscaled's).
const ENV_VARS: [&str; 2] = ["TERN_FIREWALL_MODE", "TS_DEBUG_FIREWALL_MODE"];

/// What the environment asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    Nftables,
    Iptables,
    Auto,
}

/// The first non-empty firewall-mode env var, parsed, with its name.
fn env_choice() -> Result<Option<(&'static str, Choice)>> {
    for var in ENV_VARS {
        let Ok(value) = std::env::var(var) else {
            continue;
        };
        let choice = match value.trim().to_ascii_lowercase().as_str() {
            "" => continue,
            "nftables" => Choice::Nftables,
            "iptables" => Choice::Iptables,
            "auto" => Choice::Auto,
            _ => return Err(PlatformError::InvalidFirewallMode { var, value }),
        };
        return Ok(Some((var, choice)));
    }
    Ok(None)
}

/// Which tools exist on PATH.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tools {
    pub nft: bool,
    pub iptables: bool,
}

/// The decision, given the env choice, the tools, and (for auto) the installed rule counts
/// (iptables `-A` lines, nft rules), computed only when needed.
pub(crate) fn decide(
    env: Option<(&'static str, Choice)>,
    tools: Tools,
    counts: impl FnOnce() -> (usize, usize),
) -> Result<FirewallKind> {
    if !tools.nft && !tools.iptables {
        return Err(PlatformError::NoFirewallTool);
    }
    let forced = |var: &'static str, kind: FirewallKind, present: bool| {
        if present {
            return Ok(kind);
        }
        let (tool, package) = match kind {
            FirewallKind::Nftables => ("nft", "nftables"),
            FirewallKind::Iptables => ("iptables", "iptables"),
        };
        Err(PlatformError::MissingFirewallTool {
            var,
            value: kind.to_string(),
            tool,
            package,
        })
    };
    match env {
        Some((var, Choice::Nftables)) => forced(var, FirewallKind::Nftables, tools.nft),
        Some((var, Choice::Iptables)) => forced(var, FirewallKind::Iptables, tools.iptables),
        Some((_, Choice::Auto)) => Ok(from_installed_rules(tools, counts)),
        // tailscaled's default: iptables whenever the binary exists, whatever its backend.
        None if tools.iptables => Ok(FirewallKind::Iptables),
        None => Ok(FirewallKind::Nftables),
    }
}

/// `auto`: follow whichever tool already has rules; when both or neither do, prefer nft.
fn from_installed_rules(tools: Tools, counts: impl FnOnce() -> (usize, usize)) -> FirewallKind {
    let (ipt, nft) = counts();
    tracing::debug!(
        iptables_rules = ipt,
        nft_rules = nft,
        "firewall auto-detection"
    );
    match (ipt > 0, nft > 0) {
        (false, true) if tools.nft => FirewallKind::Nftables,
        (true, false) if tools.iptables => FirewallKind::Iptables,
        _ if tools.nft => FirewallKind::Nftables,
        _ => FirewallKind::Iptables,
    }
}

/// Counts installed rules: `-A` lines of `iptables -S` + `ip6tables -S`, nft rule objects.
fn installed_rule_counts(tools: Tools) -> (usize, usize) {
    let ipt = if tools.iptables {
        Family::ALL
            .iter()
            .filter(|f| which(f.iptables()).is_some())
            .map(|&f| iptables::rule_count(f))
            .sum()
    } else {
        0
    };
    let nft = if tools.nft {
        nft::read().map(|rs| rs.rule_count()).unwrap_or(0)
    } else {
        0
    };
    (ipt, nft)
}

/// Picks nftables or iptables: env (`TERN_FIREWALL_MODE`, then `TS_DEBUG_FIREWALL_MODE`:
/// `nftables` | `iptables` | `auto`), else iptables if its binary exists, else nftables.
/// Fails with install advice when neither `nft` nor `iptables` is on PATH.
pub fn detect_kind() -> Result<FirewallKind> {
    let tools = Tools {
        nft: which("nft").is_some(),
        iptables: which("iptables").is_some(),
    };
    let env = env_choice()?;
    let kind = decide(env, tools, || installed_rule_counts(tools))?;
    tracing::info!(%kind, env = ?env, "firewall kind");
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Tools = Tools {
        nft: true,
        iptables: true,
    };

    fn no_counts() -> (usize, usize) {
        panic!("counts must not be needed")
    }

    #[test]
    fn default_is_iptables_when_present_else_nft() {
        assert_eq!(
            decide(None, BOTH, no_counts).ok(),
            Some(FirewallKind::Iptables)
        );
        let nft_only = Tools {
            nft: true,
            iptables: false,
        };
        assert_eq!(
            decide(None, nft_only, no_counts).ok(),
            Some(FirewallKind::Nftables)
        );
    }

    #[test]
    fn neither_tool_is_a_clear_error() {
        let none = Tools {
            nft: false,
            iptables: false,
        };
        let err = decide(None, none, no_counts).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("apt install nftables"), "{err}");
        assert!(err.contains("--netfilter-mode=off"), "{err}");
    }

    #[test]
    fn forced_kind_needs_its_tool() {
        let env = Some(("TS_DEBUG_FIREWALL_MODE", Choice::Nftables));
        assert_eq!(
            decide(env, BOTH, no_counts).ok(),
            Some(FirewallKind::Nftables)
        );
        let ipt_only = Tools {
            nft: false,
            iptables: true,
        };
        let err = decide(env, ipt_only, no_counts)
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("apt install nftables"));
    }

    #[test]
    fn auto_follows_installed_rules() {
        let auto = Some(("TERN_FIREWALL_MODE", Choice::Auto));
        let pick = |c: (usize, usize)| decide(auto, BOTH, || c).ok();
        assert_eq!(pick((0, 5)), Some(FirewallKind::Nftables));
        assert_eq!(pick((5, 0)), Some(FirewallKind::Iptables));
        assert_eq!(pick((5, 5)), Some(FirewallKind::Nftables));
        assert_eq!(pick((0, 0)), Some(FirewallKind::Nftables));
        let ipt_only = Tools {
            nft: false,
            iptables: true,
        };
        assert_eq!(
            decide(auto, ipt_only, || (0, 0)).ok(),
            Some(FirewallKind::Iptables)
        );
    }
}
