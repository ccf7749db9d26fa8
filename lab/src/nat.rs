//! NAT boxes in nftables: one ruleset per mode, applied atomically, with conntrack flushed on a switch.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::netns::Netns;

/// Interface of a NAT box towards its client.
pub const LAN_IF: &str = "lan0";
/// Interface of a NAT box towards the public segment.
pub const WAN_IF: &str = "wan0";
/// The UDP port `portfwd` forwards to the client (Tailscale's default).
pub const PORTFWD_PORT: u16 = 41641;

/// What a NAT box does with its client's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatMode {
    /// Endpoint-independent mapping (port kept), address-and-port-dependent filtering.
    Easy,
    /// Endpoint-dependent mapping (random port per destination), address-and-port-dependent filtering.
    Hard,
    /// No NAT; a stateful firewall that drops unsolicited inbound UDP.
    Fw,
    /// Easy NAT that lets only TCP and ICMP out (no UDP at all).
    Udpblock,
    /// Easy NAT plus a static forward of UDP 41641 to the client (like a UPnP/PCP mapping).
    Portfwd,
    /// Plain router: no NAT, no filtering.
    None,
}

impl NatMode {
    /// Every mode, in a fixed order.
    pub const ALL: [NatMode; 6] = [
        NatMode::Easy,
        NatMode::Hard,
        NatMode::Fw,
        NatMode::Udpblock,
        NatMode::Portfwd,
        NatMode::None,
    ];

    /// The mode's name as the CLI takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            NatMode::Easy => "easy",
            NatMode::Hard => "hard",
            NatMode::Fw => "fw",
            NatMode::Udpblock => "udpblock",
            NatMode::Portfwd => "portfwd",
            NatMode::None => "none",
        }
    }

    /// Whether the box rewrites the client's source address.
    pub fn translates(self) -> bool {
        matches!(
            self,
            NatMode::Easy | NatMode::Hard | NatMode::Udpblock | NatMode::Portfwd
        )
    }
}

impl fmt::Display for NatMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NatMode {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fwd" => Ok(NatMode::Portfwd),
            _ => NatMode::ALL
                .into_iter()
                .find(|mode| mode.as_str() == s)
                .ok_or_else(|| {
                    LabError::Invalid(format!(
                        "unknown NAT mode `{s}`: use one of easy, hard, fw, udpblock, portfwd, none"
                    ))
                }),
        }
    }
}

/// The nftables ruleset for a NAT box in `mode` whose client is `client` (for `portfwd`).
///
/// Filter rules live in `table inet lab`, NAT in `table ip labnat`. Every mode with state also drops
/// new connections arriving on the WAN side at the box itself (input hook): otherwise a peer's early
/// punch packet confirms a conntrack entry `peer -> wan:port` and the client's own later packet
/// clashes with it, so masquerade picks a new port and "easy" NAT stops being easy.
pub fn ruleset(mode: NatMode, client: Ipv4Addr) -> String {
    let mut input = Vec::new();
    let mut forward = Vec::new();
    let mut prerouting = Vec::new();
    let mut postrouting = Vec::new();
    if mode != NatMode::None {
        input.push(format!("iifname \"{WAN_IF}\" ct state new drop"));
        forward.push("ct state established,related accept".to_string());
    }
    match mode {
        NatMode::Easy => {}
        NatMode::Hard => {}
        NatMode::Fw => {
            forward.push(format!(
                "iifname \"{WAN_IF}\" meta l4proto udp ct state new drop"
            ));
        }
        NatMode::Udpblock => {
            forward.push(format!(
                "iifname \"{LAN_IF}\" meta l4proto {{ tcp, icmp }} accept"
            ));
            forward.push(format!("iifname \"{LAN_IF}\" drop"));
        }
        NatMode::Portfwd => {
            prerouting.push(format!(
                "iifname \"{WAN_IF}\" udp dport {PORTFWD_PORT} dnat to {client}:{PORTFWD_PORT}"
            ));
            forward.push(format!("iifname \"{WAN_IF}\" ct status dnat accept"));
        }
        NatMode::None => {}
    }
    if matches!(
        mode,
        NatMode::Easy | NatMode::Hard | NatMode::Udpblock | NatMode::Portfwd
    ) {
        forward.push(format!("iifname \"{WAN_IF}\" ct state new drop"));
    }
    match mode {
        NatMode::Easy | NatMode::Udpblock | NatMode::Portfwd => {
            postrouting.push(format!("oifname \"{WAN_IF}\" masquerade persistent"));
        }
        NatMode::Hard => {
            postrouting.push(format!("oifname \"{WAN_IF}\" masquerade fully-random"));
        }
        NatMode::Fw | NatMode::None => {}
    }
    // nft 1.0.6 rejects one-line `{ ...; rule; }` chains and takes `fwd` as a keyword: newlines and
    // the chain name `forward`.
    let mut out = String::from("flush ruleset\ntable inet lab {\n");
    out += &chain("input", "filter", "input", "0", &input);
    out += &chain("forward", "filter", "forward", "0", &forward);
    out += "}\ntable ip labnat {\n";
    out += &chain("prerouting", "nat", "prerouting", "dstnat", &prerouting);
    out += &chain("postrouting", "nat", "postrouting", "srcnat", &postrouting);
    out += "}\n";
    out
}

fn chain(name: &str, kind: &str, hook: &str, priority: &str, rules: &[String]) -> String {
    let mut out = format!(
        "  chain {name} {{\n    type {kind} hook {hook} priority {priority}; policy accept;\n"
    );
    for rule in rules {
        out += &format!("    {rule}\n");
    }
    out += "  }\n";
    out
}

/// Apply `mode` to the NAT box in `ns` (atomically replacing its ruleset) and flush its conntrack
/// table, so no old mapping outlives the switch.
pub fn apply(ns: &Netns, mode: NatMode, client: Ipv4Addr) -> Result<()> {
    ns.nft_apply(&ruleset(mode, client))?;
    flush_conntrack(ns)
}

/// Forget every connection the box tracks.
pub fn flush_conntrack(ns: &Netns) -> Result<()> {
    // `conntrack -F` exits 0 with nothing to flush; stderr only has the summary line.
    ns.exec(&["conntrack", "-F"]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for mode in NatMode::ALL {
            assert_eq!(mode.as_str().parse::<NatMode>().ok(), Some(mode));
        }
        assert_eq!("fwd".parse::<NatMode>().ok(), Some(NatMode::Portfwd));
        assert!("cone".parse::<NatMode>().is_err());
    }

    #[test]
    fn every_stateful_mode_has_the_conntrack_clash_guard() {
        let client = Ipv4Addr::new(10, 1, 0, 2);
        for mode in NatMode::ALL {
            let rules = ruleset(mode, client);
            let guarded = rules.contains("chain input {\n    type filter hook input priority 0; policy accept;\n    iifname \"wan0\" ct state new drop");
            assert_eq!(guarded, mode != NatMode::None, "{mode}:\n{rules}");
        }
    }

    #[test]
    fn masquerade_flavour_follows_the_mode() {
        let client = Ipv4Addr::new(10, 1, 0, 2);
        assert!(ruleset(NatMode::Easy, client).contains("masquerade persistent"));
        assert!(ruleset(NatMode::Hard, client).contains("masquerade fully-random"));
        assert!(!ruleset(NatMode::Fw, client).contains("masquerade"));
        assert!(ruleset(NatMode::Portfwd, client).contains("dnat to 10.1.0.2:41641"));
    }
}
