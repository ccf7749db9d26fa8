//! The iptables backend: one `iptables --wait` / `ip6tables --wait` command per change, as
//! tailscaled does (works with both the nft and the legacy iptables backends).

use std::process::Output;

use ipnet::IpNet;

use super::cmd;
use super::rules::{self, Action, Family, Hook, Match, Rule, HOOKS, MARK, MARK_MASK};
use super::{NetfilterConfig, NetfilterMode};
use crate::error::Result;

/// More jumps than this to one chain means something else keeps re-adding them; stop looping.
const MAX_HOOK_DELETES: usize = 64;

/// `<tool> --wait -t <table> <args>`, raw output whatever the status.
fn ipt(family: Family, table: &str, args: &[String]) -> Result<(Vec<String>, Output)> {
    let mut full = cmd::args(&["--wait", "-t", table]);
    full.extend_from_slice(args);
    let out = cmd::output(family.iptables(), &full, None)?;
    Ok((full, out))
}

/// Runs the command; fails unless it exits 0.
fn ipt_ok(family: Family, table: &str, args: &[String]) -> Result<()> {
    let (full, out) = ipt(family, table, args)?;
    if out.status.success() {
        return Ok(());
    }
    Err(cmd::failed(family.iptables(), &full, &out))
}

/// Whether a failure only says the chain, rule or table is not there (success for removal).
fn is_absent(out: &Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    [
        "No chain/target/match",
        "does not exist",
        "does a matching rule exist",
        "Table does not exist",
    ]
    .iter()
    .any(|s| err.contains(s))
}

/// Runs the command; success when it exits 0 or `tolerate` accepts the failure.
fn ipt_tolerant(
    family: Family,
    table: &str,
    args: &[String],
    tolerate: fn(&Output) -> bool,
) -> Result<()> {
    let (full, out) = ipt(family, table, args)?;
    if out.status.success() || tolerate(&out) {
        return Ok(());
    }
    Err(cmd::failed(family.iptables(), &full, &out))
}

fn already_exists(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains("already exists")
}

/// An address for `-s`: plain for a host, CIDR otherwise.
fn addr_arg(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn mark_arg() -> String {
    format!("{MARK:#x}/{MARK_MASK:#x}")
}

fn match_args(m: &Match) -> Vec<String> {
    match m {
        Match::InIface(n) => cmd::args(&["-i", n]),
        Match::NotInIface(n) => cmd::args(&["!", "-i", n]),
        Match::OutIface(n) => cmd::args(&["-o", n]),
        Match::Saddr(net) => vec!["-s".into(), addr_arg(net)],
        Match::UdpDport(p) => vec!["-p".into(), "udp".into(), "--dport".into(), p.to_string()],
        Match::Marked => vec!["-m".into(), "mark".into(), "--mark".into(), mark_arg()],
        Match::NotEstablished => {
            cmd::args(&["-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED"])
        }
    }
}

fn action_args(a: Action) -> Vec<String> {
    match a {
        Action::Accept => cmd::args(&["-j", "ACCEPT"]),
        Action::Drop => cmd::args(&["-j", "DROP"]),
        Action::Return => cmd::args(&["-j", "RETURN"]),
        Action::SetMark => vec!["-j".into(), "MARK".into(), "--set-mark".into(), mark_arg()],
        Action::Masquerade => cmd::args(&["-j", "MASQUERADE"]),
    }
}

/// `-A <chain> <matches> -j <target>` for one of our rules (the table goes with `-t`).
pub(crate) fn append_args(r: &Rule) -> Vec<String> {
    let mut a = cmd::args(&["-A", r.hook.chain]);
    for m in &r.matches {
        a.extend(match_args(m));
    }
    a.extend(action_args(r.action));
    a
}

fn jump_args(op: &str, h: &Hook) -> Vec<String> {
    cmd::args(&[op, h.base, "-j", h.chain])
}

/// Removes every jump from the base chain to ours: `-D` until it fails.
fn delete_hooks(family: Family, h: &Hook) -> Result<()> {
    for _ in 0..MAX_HOOK_DELETES {
        let (_, out) = ipt(family, h.table, &jump_args("-D", h))?;
        if !out.status.success() {
            return Ok(());
        }
    }
    tracing::warn!(
        chain = h.chain,
        "jumps keep reappearing; gave up deleting them"
    );
    Ok(())
}

/// Creates (or flushes) our chains, sets the hooks for the mode, and appends the rules.
fn ensure_family(cfg: &NetfilterConfig, family: Family) -> Result<()> {
    for h in &HOOKS {
        ipt_tolerant(
            family,
            h.table,
            &cmd::args(&["-N", h.chain]),
            already_exists,
        )?;
        ipt_ok(family, h.table, &cmd::args(&["-F", h.chain]))?;
    }
    for h in &HOOKS {
        if cfg.mode == NetfilterMode::On {
            let (_, check) = ipt(family, h.table, &jump_args("-C", h))?;
            if !check.status.success() {
                ipt_ok(
                    family,
                    h.table,
                    &cmd::args(&["-I", h.base, "1", "-j", h.chain]),
                )?;
            }
        } else {
            delete_hooks(family, h)?;
        }
    }
    for r in rules::rules(cfg, family) {
        ipt_ok(family, r.hook.table, &append_args(&r))?;
    }
    Ok(())
}

/// Removes our jumps and chains in `family`; what is already gone counts as removed.
pub(crate) fn remove_family(family: Family) -> Result<()> {
    for h in &HOOKS {
        delete_hooks(family, h)?;
    }
    for h in &HOOKS {
        ipt_tolerant(family, h.table, &cmd::args(&["-F", h.chain]), is_absent)?;
        ipt_tolerant(family, h.table, &cmd::args(&["-X", h.chain]), is_absent)?;
    }
    Ok(())
}

/// Makes the live iptables state exactly `cfg` (families it does not want are cleaned).
pub(crate) fn apply(cfg: &NetfilterConfig) -> Result<()> {
    for family in Family::ALL {
        if family.wanted(cfg) {
            ensure_family(cfg, family)?;
        } else if cmd::which(family.iptables()).is_some() {
            remove_family(family)?;
        }
    }
    Ok(())
}

/// Removes ours in both families (ip6tables only if installed).
pub(crate) fn remove() -> Result<()> {
    for family in Family::ALL {
        if cmd::which(family.iptables()).is_some() {
            remove_family(family)?;
        }
    }
    Ok(())
}

/// `-S` of one table.
fn list(family: Family, table: &str) -> Result<String> {
    let args = cmd::args(&["--wait", "-t", table, "-S"]);
    let out = cmd::output(family.iptables(), &args, None)?;
    if !out.status.success() {
        return Err(cmd::failed(family.iptables(), &args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether any chain, hook or rule `cfg` wants is missing.
pub(crate) fn missing(cfg: &NetfilterConfig) -> Result<bool> {
    for family in Family::ALL.into_iter().filter(|f| f.wanted(cfg)) {
        let want = rules::rules(cfg, family);
        for table in ["filter", "nat"] {
            let listed = list(family, table)?;
            let hooks = HOOKS.iter().filter(|h| h.table == table);
            if hooks
                .clone()
                .any(|h| missing_in(&listed, h, &want, cfg.mode))
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn missing_in(listed: &str, h: &Hook, want: &[Rule], mode: NetfilterMode) -> bool {
    let lines: Vec<&str> = listed.lines().map(str::trim).collect();
    let created = lines.contains(&format!("-N {}", h.chain).as_str());
    let prefix = format!("-A {} ", h.chain);
    let have = lines.iter().filter(|l| l.starts_with(&prefix)).count();
    let hook = format!("-A {} -j {}", h.base, h.chain);
    let hooked = lines.contains(&hook.as_str());
    !created || have < rules::count_in(want, h.chain) || (mode == NetfilterMode::On && !hooked)
}

/// Whether `iptables` programs nf_tables (iptables-nft), whose changes nfnetlink announces;
/// the legacy backend's are announced nowhere. From `iptables -V`: "iptables v1.8.9 (nf_tables)".
pub(crate) fn backend_is_nftables() -> bool {
    cmd::run(Family::V4.iptables(), &cmd::args(&["-V"]), None)
        .is_ok_and(|version| reports_nf_tables(&version))
}

fn reports_nf_tables(version: &str) -> bool {
    version.contains("(nf_tables)")
}

/// Number of rules (`-A` lines) in the filter table, for kind detection; 0 when unlistable.
pub(crate) fn rule_count(family: Family) -> usize {
    list(family, "filter")
        .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetfilterConfig {
        NetfilterConfig {
            addrs: vec!["100.101.102.103/32".parse().unwrap()],
            magicsock_port: Some(41641),
            stateful_filtering: true,
            ..NetfilterConfig::new("tailscale0")
        }
    }

    fn joined(r: &Rule) -> String {
        append_args(r).join(" ")
    }

    #[test]
    fn rules_render_as_tailscaled_writes_them() {
        let v4: Vec<String> = rules::rules(&cfg(), Family::V4)
            .iter()
            .map(joined)
            .collect();
        assert_eq!(
            v4,
            [
                "-A ts-input -i lo -s 100.101.102.103 -j ACCEPT",
                "-A ts-input ! -i tailscale0 -s 100.115.92.0/23 -j RETURN",
                "-A ts-input ! -i tailscale0 -s 100.64.0.0/10 -j DROP",
                "-A ts-input -i tailscale0 -j ACCEPT",
                "-A ts-input -p udp --dport 41641 -j ACCEPT",
                "-A ts-forward -i tailscale0 -j MARK --set-mark 0x40000/0xff0000",
                "-A ts-forward -m mark --mark 0x40000/0xff0000 -j ACCEPT",
                "-A ts-forward -o tailscale0 -s 100.64.0.0/10 -j DROP",
                "-A ts-forward -o tailscale0 -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP",
                "-A ts-forward -o tailscale0 -j ACCEPT",
                "-A ts-postrouting -m mark --mark 0x40000/0xff0000 -j MASQUERADE",
            ]
        );
    }

    #[test]
    fn the_backend_is_read_from_the_version_line() {
        assert!(reports_nf_tables("iptables v1.8.9 (nf_tables)\n"));
        assert!(!reports_nf_tables("iptables v1.8.9 (legacy)\n"));
        assert!(!reports_nf_tables("iptables v1.6.1\n"));
    }

    #[test]
    fn missing_detects_flushed_chain_and_lost_hook() {
        let want = rules::rules(&cfg(), Family::V4);
        let h = &HOOKS[2];
        let full = "-P POSTROUTING ACCEPT\n-N ts-postrouting\n-A POSTROUTING -j ts-postrouting\n\
                    -A ts-postrouting -m mark --mark 0x40000/0xff0000 -j MASQUERADE\n";
        assert!(!missing_in(full, h, &want, NetfilterMode::On));
        let no_hook = full.replace("-A POSTROUTING -j ts-postrouting\n", "");
        assert!(missing_in(&no_hook, h, &want, NetfilterMode::On));
        assert!(!missing_in(&no_hook, h, &want, NetfilterMode::NoDivert));
        let flushed = "-N ts-postrouting\n-A POSTROUTING -j ts-postrouting\n";
        assert!(missing_in(flushed, h, &want, NetfilterMode::On));
    }
}
