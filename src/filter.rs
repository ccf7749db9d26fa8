//! The inbound packet filter compiled from the netmap's `PacketFilter` (tailcfg `FilterRule`s),
//! with Go's decision procedure (`wgengine/filter`): local-destination check, ICMP replies and
//! errors, TCP non-SYN, stateful UDP/SCTP return traffic, TSMP, and "other protocols only with
//! all ports". Pure apart from a bounded table of recent outbound UDP/SCTP flows.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::control::tailcfg::{FilterRule, PortRange};
use crate::packet::{proto, PacketSummary};

/// Protocols a rule covers when its `IPProto` is empty.
pub const DEFAULT_PROTOS: [u8; 4] = [proto::TCP, proto::UDP, proto::ICMPV4, proto::ICMPV6];
/// Outbound flows remembered for return traffic (Go uses an LRU of this size).
const MAX_FLOWS: usize = 512;

/// The filter's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

/// A filter rule that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid IP range {0:?}")]
    Range(String),
    #[error("invalid IP or CIDR {0:?}")]
    Addr(String),
    #[error("{0} contains non-network bits set")]
    HostBits(String),
    #[error("capability {0:?} is not allowed as a destination")]
    CapInDst(String),
    #[error("legacy SrcBits/Bits fields are not supported")]
    LegacyBits,
}

/// A parsed IP set: prefixes plus `cap:` names (the latter only valid as sources).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    pub prefixes: Vec<IpNet>,
    pub cap: Option<String>,
}

/// Parses one `SrcIPs`/`DstPorts.IP` entry (Go `parseIPSet`).
pub fn parse_ip_set(text: &str) -> Result<IpSet, FilterError> {
    if text == "*" {
        let prefixes = vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())];
        return Ok(IpSet {
            prefixes,
            cap: None,
        });
    }
    if let Some(cap) = text.strip_prefix("cap:") {
        return Ok(IpSet {
            prefixes: Vec::new(),
            cap: Some(cap.to_string()),
        });
    }
    if let Some((a, b)) = text.split_once('-') {
        let parse = |s: &str| {
            s.parse::<IpAddr>()
                .map_err(|_| FilterError::Range(text.into()))
        };
        return range_to_prefixes(parse(a)?, parse(b)?)
            .map(|prefixes| IpSet {
                prefixes,
                cap: None,
            })
            .ok_or_else(|| FilterError::Range(text.into()));
    }
    if text.contains('/') {
        let net: IpNet = text.parse().map_err(|_| FilterError::Addr(text.into()))?;
        if net.trunc() != net {
            return Err(FilterError::HostBits(text.into()));
        }
        return Ok(IpSet {
            prefixes: vec![net],
            cap: None,
        });
    }
    let ip: IpAddr = text.parse().map_err(|_| FilterError::Addr(text.into()))?;
    Ok(IpSet {
        prefixes: vec![IpNet::from(ip)],
        cap: None,
    })
}

/// The minimal CIDRs covering `a..=b` in ascending order; `None` if reversed or mixed families.
fn range_to_prefixes(a: IpAddr, b: IpAddr) -> Option<Vec<IpNet>> {
    let (lo, hi, bits, v4) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            (u128::from(u32::from(a)), u128::from(u32::from(b)), 32, true)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128, false),
        _ => return None,
    };
    if lo > hi {
        return None;
    }
    let mut out = Vec::new();
    let mut cur = lo;
    loop {
        // Largest aligned block starting at `cur` that stays within `hi`.
        let mut size_log = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while size_log > 0 && overshoots(block_end(cur, size_log), hi) {
            size_log -= 1;
        }
        let len = (bits - size_log) as u8;
        out.push(if v4 {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(cur as u32), len).ok()?)
        } else {
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(cur), len).ok()?)
        });
        match block_end(cur, size_log) {
            Some(end) if end < hi => cur = end + 1,
            _ => break,
        }
    }
    Some(out)
}

/// Last address of the block of 2^size_log addresses starting at `start` (None on overflow).
fn block_end(start: u128, size_log: u32) -> Option<u128> {
    if size_log >= 128 {
        return if start == 0 { Some(u128::MAX) } else { None };
    }
    start.checked_add((1u128 << size_log) - 1)
}

/// Whether a block ending at `end` (None: past the address space) overshoots `hi`.
fn overshoots(end: Option<u128>, hi: u128) -> bool {
    !matches!(end, Some(end) if end <= hi)
}

/// A destination prefix with its port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetPorts {
    pub net: IpNet,
    pub ports: PortRange,
}

/// A capability granted to sources when they talk to `dst` (from a rule's `CapGrant`).
#[derive(Debug, Clone, PartialEq)]
pub struct CapMatch {
    pub dst: IpNet,
    pub cap: String,
    /// The `CapMap` values; `None` for the legacy `Caps` form or a `null` value.
    pub values: Option<Vec<serde_json::Value>>,
}

/// One compiled rule (Go `filtertype.Match`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Match {
    pub protos: Vec<u8>,
    pub srcs: Vec<IpNet>,
    pub src_caps: Vec<String>,
    pub dsts: Vec<NetPorts>,
    pub caps: Vec<CapMatch>,
}

impl Match {
    fn src_matches(&self, src: IpAddr, has_cap: &dyn Fn(IpAddr, &str) -> bool) -> bool {
        self.srcs.iter().any(|n| n.contains(&src)) || self.src_caps.iter().any(|c| has_cap(src, c))
    }
}

/// Compiles `FilterRule`s into matches (Go `MatchesFromFilterRules`).
pub fn matches_from_rules(rules: &[FilterRule]) -> Result<Vec<Match>, FilterError> {
    rules.iter().map(compile_rule).collect()
}

fn compile_rule(rule: &FilterRule) -> Result<Match, FilterError> {
    if rule.src_bits.is_some() || rule.dst_ports.iter().any(|d| d.bits.is_some()) {
        return Err(FilterError::LegacyBits);
    }
    let protos = if rule.ip_proto.is_empty() {
        DEFAULT_PROTOS.to_vec()
    } else {
        rule.ip_proto
            .iter()
            .filter_map(|p| u8::try_from(*p).ok())
            .collect()
    };
    let mut m = Match {
        protos,
        ..Match::default()
    };
    for src in &rule.src_ips {
        let set = parse_ip_set(src)?;
        m.srcs.extend(set.prefixes);
        m.src_caps.extend(set.cap);
    }
    for dst in &rule.dst_ports {
        let set = parse_ip_set(&dst.ip)?;
        if let Some(cap) = set.cap {
            return Err(FilterError::CapInDst(cap));
        }
        m.dsts.extend(set.prefixes.into_iter().map(|net| NetPorts {
            net,
            ports: dst.ports,
        }));
    }
    for grant in &rule.cap_grant {
        for dst in &grant.dsts {
            let legacy = grant.caps.iter().map(|cap| (cap, None));
            let mapped = grant.cap_map.iter().map(|(cap, v)| (cap, v.clone()));
            m.caps
                .extend(legacy.chain(mapped).map(|(cap, values)| CapMatch {
                    dst: *dst,
                    cap: cap.clone(),
                    values,
                }));
        }
    }
    Ok(m)
}

type Flow = (u8, IpAddr, u16, IpAddr, u16);
/// Whether the node owning an address has a capability (resolves `cap:` sources).
type CapLookup = Box<dyn Fn(IpAddr, &str) -> bool + Send + Sync>;

/// The inbound filter.
pub struct Filter {
    matches: Vec<Match>,
    local: Vec<IpNet>,
    has_cap: CapLookup,
    flows: HashSet<Flow>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("matches", &self.matches)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Filter {
    /// A filter from the netmap's rules; `local` are this node's addresses and routes it serves
    /// (packets to anything else are dropped).
    pub fn from_rules(rules: &[FilterRule], local: &[IpNet]) -> Result<Self, FilterError> {
        Ok(Self {
            matches: matches_from_rules(rules)?,
            local: local.to_vec(),
            has_cap: Box::new(|_, _| false),
            flows: HashSet::new(),
        })
    }

    /// Resolves `cap:` sources: whether the node owning `src` has the capability.
    pub fn with_cap_lookup(
        mut self,
        has_cap: impl Fn(IpAddr, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.has_cap = Box::new(has_cap);
        self
    }

    /// The compiled matches.
    pub fn matches(&self) -> &[Match] {
        &self.matches
    }

    /// Decides an inbound packet (Go `Filter.RunIn`, minus logging).
    pub fn check(&self, p: &PacketSummary) -> Verdict {
        if !self.local.iter().any(|n| n.contains(&p.dst)) {
            return Verdict::Drop;
        }
        if p.later_fragment {
            return Verdict::Accept; // Go passes non-first fragments; the first was filtered
        }
        let accept = match p.proto {
            proto::ICMPV4 | proto::ICMPV6 => {
                is_icmp_reply_or_error(p) || self.any_match(p, MatchKind::IpsOnly)
            }
            proto::TCP => !p.is_tcp_syn() || self.any_match(p, MatchKind::Full),
            proto::UDP | proto::SCTP => {
                self.flows
                    .contains(&(p.proto, p.dst, p.dst_port, p.src, p.src_port))
                    || self.any_match(p, MatchKind::Full)
            }
            proto::TSMP => true,
            _ => self.any_match(p, MatchKind::AllPortsOnly),
        };
        if accept {
            Verdict::Accept
        } else {
            Verdict::Drop
        }
    }

    /// The capabilities `src` has when talking to `dst` (Go `Filter.CapsWithValues` keys),
    /// sorted and deduplicated.
    pub fn peer_caps(&self, src: IpAddr, dst: IpAddr) -> Vec<String> {
        let mut caps: Vec<String> = self
            .matches
            .iter()
            .filter(|m| m.src_matches(src, &*self.has_cap))
            .flat_map(|m| m.caps.iter())
            .filter(|c| c.dst.contains(&dst))
            .map(|c| c.cap.clone())
            .collect();
        caps.sort();
        caps.dedup();
        caps
    }

    /// Records an outbound packet so its UDP/SCTP replies are accepted (Go `RunOut`).
    pub fn note_outbound(&mut self, p: &PacketSummary) {
        if matches!(p.proto, proto::UDP | proto::SCTP) {
            if self.flows.len() >= MAX_FLOWS {
                self.flows.clear();
            }
            self.flows
                .insert((p.proto, p.src, p.src_port, p.dst, p.dst_port));
        }
    }

    fn any_match(&self, p: &PacketSummary, kind: MatchKind) -> bool {
        self.matches.iter().any(|m| {
            let proto_ok = kind == MatchKind::IpsOnly || m.protos.contains(&p.proto);
            proto_ok
                && m.src_matches(p.src, &*self.has_cap)
                && m.dsts.iter().any(|d| {
                    d.net.contains(&p.dst)
                        && match kind {
                            MatchKind::IpsOnly => true,
                            MatchKind::Full => (d.ports.first..=d.ports.last).contains(&p.dst_port),
                            MatchKind::AllPortsOnly => d.ports == PortRange::ANY,
                        }
                })
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatchKind {
    /// Protocol, source, destination prefix and port.
    Full,
    /// Source and destination prefix only (ICMP).
    IpsOnly,
    /// Protocol, source, and a destination entry covering all ports (unknown protocols).
    AllPortsOnly,
}

fn is_icmp_reply_or_error(p: &PacketSummary) -> bool {
    match p.proto {
        // echo reply, dest unreachable, source quench, redirect, time exceeded, param problem
        proto::ICMPV4 => matches!(p.icmp_type, 0 | 3 | 4 | 5 | 11 | 12),
        // echo reply; types below 128 are errors
        proto::ICMPV6 => p.icmp_type == 129 || p.icmp_type < 128,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
