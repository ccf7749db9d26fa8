//! The rule set tailscaled installs, as plain data both backends render (nft JSON, iptables args).

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

use super::{NetfilterConfig, NetfilterMode};

/// tailscaled's subnet-route mark: bits 16-23 of the fwmark, value 0x04 there.
pub(crate) const MARK: u32 = 0x0004_0000;
/// The mask of the bits tailscaled owns in the fwmark.
pub(crate) const MARK_MASK: u32 = 0x00ff_0000;
/// CGNAT range: tailnet IPv4 addresses, never legitimate from a non-TUN interface.
const CGNAT: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);
/// ChromeOS's VM range inside CGNAT, which tailscaled lets through (return, not drop).
const CHROMEOS_VM: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 115, 92, 0), 23);

/// Address family: nft tables `ip`/`ip6`, tools `iptables`/`ip6tables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The nft family name.
    pub(crate) fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The iptables binary for this family.
    pub(crate) fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn contains(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }

    /// Whether `cfg` wants our chains in this family at all.
    pub(crate) fn wanted(self, cfg: &NetfilterConfig) -> bool {
        cfg.mode != NetfilterMode::Off && (self == Family::V4 || cfg.ipv6)
    }
}

/// One of our chains and the base chain that jumps to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hook {
    pub table: &'static str,
    pub base: &'static str,
    pub chain: &'static str,
    /// nft base-chain spec when we must create it: type, hook, priority.
    pub nft_type: &'static str,
    pub nft_hook: &'static str,
    pub nft_prio: i32,
}

/// Our three chains, in the order tailscaled creates them.
pub(crate) const HOOKS: [Hook; 3] = [
    Hook {
        table: "filter",
        base: "INPUT",
        chain: "ts-input",
        nft_type: "filter",
        nft_hook: "input",
        nft_prio: 0,
    },
    Hook {
        table: "filter",
        base: "FORWARD",
        chain: "ts-forward",
        nft_type: "filter",
        nft_hook: "forward",
        nft_prio: 0,
    },
    Hook {
        table: "nat",
        base: "POSTROUTING",
        chain: "ts-postrouting",
        nft_type: "nat",
        nft_hook: "postrouting",
        nft_prio: 100,
    },
];

/// A match in a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Match {
    InIface(String),
    NotInIface(String),
    OutIface(String),
    Saddr(IpNet),
    UdpDport(u16),
    /// fwmark & MARK_MASK == MARK.
    Marked,
    /// Connection state other than established/related.
    NotEstablished,
}

/// What a rule does once it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Accept,
    Drop,
    Return,
    /// fwmark = (fwmark & !MARK_MASK) | MARK.
    SetMark,
    Masquerade,
}

/// One rule in one of our chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub hook: Hook,
    pub matches: Vec<Match>,
    pub action: Action,
}

fn rule(hook: usize, matches: Vec<Match>, action: Action) -> Rule {
    Rule {
        hook: HOOKS[hook],
        matches,
        action,
    }
}

/// Every rule of ours in `family` for `cfg`, chain by chain, in final order.
pub(crate) fn rules(cfg: &NetfilterConfig, family: Family) -> Vec<Rule> {
    if !family.wanted(cfg) {
        return Vec::new();
    }
    let mut out = input_rules(cfg, family);
    out.extend(forward_rules(cfg, family));
    if cfg.snat_subnet_routes {
        out.push(rule(2, vec![Match::Marked], Action::Masquerade));
    }
    out
}

/// ts-input: own addresses from lo first (tailscaled inserts them at position 1), then the
/// spoofing guards, the TUN accept and the magicsock port.
fn input_rules(cfg: &NetfilterConfig, family: Family) -> Vec<Rule> {
    let tun = &cfg.tun_name;
    let mut out: Vec<Rule> = cfg
        .addrs
        .iter()
        .filter(|a| family.contains(a))
        .map(|a| {
            let host = IpNet::from(a.addr());
            rule(
                0,
                vec![Match::InIface("lo".into()), Match::Saddr(host)],
                Action::Accept,
            )
        })
        .collect();
    if family == Family::V4 {
        let not_tun = || Match::NotInIface(tun.clone());
        out.push(rule(
            0,
            vec![not_tun(), Match::Saddr(CHROMEOS_VM.into())],
            Action::Return,
        ));
        out.push(rule(
            0,
            vec![not_tun(), Match::Saddr(CGNAT.into())],
            Action::Drop,
        ));
    }
    out.push(rule(0, vec![Match::InIface(tun.clone())], Action::Accept));
    if let Some(port) = cfg.magicsock_port {
        out.push(rule(0, vec![Match::UdpDport(port)], Action::Accept));
    }
    out
}

/// ts-forward: mark what comes from the TUN (for SNAT), accept marked, guard CGNAT sources
/// towards the TUN, optional stateful drop, accept the rest towards the TUN.
fn forward_rules(cfg: &NetfilterConfig, family: Family) -> Vec<Rule> {
    let tun = &cfg.tun_name;
    let mut out = vec![
        rule(1, vec![Match::InIface(tun.clone())], Action::SetMark),
        rule(1, vec![Match::Marked], Action::Accept),
    ];
    if family == Family::V4 {
        out.push(rule(
            1,
            vec![Match::OutIface(tun.clone()), Match::Saddr(CGNAT.into())],
            Action::Drop,
        ));
    }
    if cfg.stateful_filtering {
        out.push(rule(
            1,
            vec![Match::OutIface(tun.clone()), Match::NotEstablished],
            Action::Drop,
        ));
    }
    out.push(rule(1, vec![Match::OutIface(tun.clone())], Action::Accept));
    out
}

/// How many rules of `rules` land in `chain`.
pub(crate) fn count_in(rules: &[Rule], chain: &str) -> usize {
    rules.iter().filter(|r| r.hook.chain == chain).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetfilterConfig {
        NetfilterConfig {
            tun_name: "tailscale0".into(),
            mode: NetfilterMode::On,
            addrs: vec![
                "100.101.102.103/32".parse().unwrap(),
                "fd7a:115c:a1e0::1/128".parse().unwrap(),
            ],
            magicsock_port: Some(41641),
            snat_subnet_routes: true,
            stateful_filtering: false,
            ipv6: true,
        }
    }

    #[test]
    fn v4_layout_matches_tailscaled() {
        let r = rules(&cfg(), Family::V4);
        let chains: Vec<_> = r.iter().map(|r| r.hook.chain).collect();
        assert_eq!(
            chains,
            [
                "ts-input",
                "ts-input",
                "ts-input",
                "ts-input",
                "ts-input",
                "ts-forward",
                "ts-forward",
                "ts-forward",
                "ts-forward",
                "ts-postrouting"
            ]
        );
        assert_eq!(
            r[0].matches[1],
            Match::Saddr("100.101.102.103/32".parse().unwrap())
        );
        assert_eq!(r[2].action, Action::Drop);
        assert_eq!(r[4].matches, vec![Match::UdpDport(41641)]);
    }

    #[test]
    fn v6_has_no_cgnat_rules_and_own_v6_addr() {
        let r = rules(&cfg(), Family::V6);
        assert_eq!(count_in(&r, "ts-input"), 3);
        assert_eq!(count_in(&r, "ts-forward"), 3);
        assert_eq!(
            r[0].matches[1],
            Match::Saddr("fd7a:115c:a1e0::1/128".parse().unwrap())
        );
    }

    #[test]
    fn options_change_the_set() {
        let mut c = cfg();
        c.stateful_filtering = true;
        c.snat_subnet_routes = false;
        c.magicsock_port = None;
        let r = rules(&c, Family::V4);
        assert_eq!(count_in(&r, "ts-postrouting"), 0);
        assert_eq!(count_in(&r, "ts-input"), 4);
        let fwd: Vec<_> = r.iter().filter(|r| r.hook.chain == "ts-forward").collect();
        assert_eq!(fwd[3].matches[1], Match::NotEstablished);
        assert_eq!(fwd[4].action, Action::Accept);
        c.ipv6 = false;
        assert!(rules(&c, Family::V6).is_empty());
        c.mode = NetfilterMode::Off;
        assert!(rules(&c, Family::V4).is_empty());
    }
}
