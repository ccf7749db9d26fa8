//! Policy routing the way tailscaled sets it up: tern's routes live in table 52, four ip rules
//! (priorities 5210–5270) send unmarked traffic there first, and tern's own sockets carry the
//! bypass mark so they skip table 52 and can never loop through the tunnel.
//!
//! ```text
//! 5210: from all fwmark 0x80000/0xff0000 lookup main
//! 5230: from all fwmark 0x80000/0xff0000 lookup default
//! 5250: from all fwmark 0x80000/0xff0000 unreachable
//! 5270: from all lookup 52
//! ```
//! Deleting matches priority and table (or the unreachable action), not the mark, so variants
//! a Go tailscaled left behind go too. Names and numbers are Go's on purpose: a host that
//! switches between tailscaled and tern is cleaned up correctly either way.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{IpVersion, RouteMessageBuilder};

use crate::error::{PlatformError, Result};
use crate::netlink::{is_errno, nl, Netlink};

/// tern's routing table (tailscaled's "tailscale" table).
pub const TS_TABLE: u32 = 52;
/// Base priority of the policy rules (tailscaled's `ipPolicyPrefBase`).
pub const RULE_PREF_BASE: u32 = 5200;
/// Mark on tern's own sockets: they use `main`, never table 52.
pub const BYPASS_MARK: u32 = 0x80000;
/// Mark on traffic forwarded from the tunnel (subnet routes, exit node), for masquerade.
pub const SUBNET_ROUTE_MARK: u32 = 0x40000;
/// The mark bits tern owns (16–23).
pub const MARK_MASK: u32 = 0xff0000;

const TABLE_MAIN: u32 = 254;
const TABLE_DEFAULT: u32 = 253;

/// One of the four rules: its priority offset, the table (None = unreachable) and whether it
/// matches the bypass mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSpec {
    pub priority: u32,
    pub table: Option<u32>,
    pub bypass_mark: bool,
}

/// The rules in the order tailscaled adds them.
pub const RULES: [RuleSpec; 4] = [
    RuleSpec {
        priority: RULE_PREF_BASE + 10,
        table: Some(TABLE_MAIN),
        bypass_mark: true,
    },
    RuleSpec {
        priority: RULE_PREF_BASE + 30,
        table: Some(TABLE_DEFAULT),
        bypass_mark: true,
    },
    RuleSpec {
        priority: RULE_PREF_BASE + 50,
        table: None,
        bypass_mark: true,
    },
    RuleSpec {
        priority: RULE_PREF_BASE + 70,
        table: Some(TS_TABLE),
        bypass_mark: false,
    },
];

fn families(v6: bool) -> &'static [IpVersion] {
    if v6 {
        &[IpVersion::V4, IpVersion::V6]
    } else {
        &[IpVersion::V4]
    }
}

/// A rule as the kernel reports it, reduced to what tells ours apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeenRule {
    priority: u32,
    table: u32,
    unreachable: bool,
}

fn seen_rule(m: &RuleMessage) -> SeenRule {
    let attr = |f: fn(&RuleAttribute) -> Option<u32>| m.attributes.iter().find_map(f);
    SeenRule {
        priority: attr(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0),
        table: attr(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table)),
        unreachable: m.header.action == RuleAction::Unreachable,
    }
}

/// Whether a rule is one of ours (or a Go tailscaled's): in our priority window and pointing at
/// main, default or table 52, or unreachable.
fn is_ours(rule: &SeenRule) -> bool {
    (RULE_PREF_BASE..RULE_PREF_BASE + 100).contains(&rule.priority)
        && (rule.unreachable || [TABLE_MAIN, TABLE_DEFAULT, TS_TABLE].contains(&rule.table))
}

/// Whether `spec` is present among `seen`.
fn spec_present(spec: &RuleSpec, seen: &[SeenRule]) -> bool {
    seen.iter().any(|r| {
        r.priority == spec.priority
            && match spec.table {
                Some(t) => r.table == t && !r.unreachable,
                None => r.unreachable,
            }
    })
}

impl Netlink {
    async fn rules(&self, family: IpVersion) -> Result<Vec<RuleMessage>> {
        self.handle()
            .rule()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(nl("rule get"))
    }

    /// Whether the kernel does policy routing (`ip rule` works) for IPv4.
    pub async fn rules_supported(&self) -> bool {
        self.rules(IpVersion::V4).await.is_ok()
    }

    /// Adds the four rules (IPv4, and IPv6 when `v6`), first removing old copies as Go does.
    /// Returns the number of netlink messages sent.
    pub async fn add_policy_rules(&self, v6: bool) -> Result<usize> {
        let mut messages = self.delete_policy_rules(v6).await?;
        for family in families(v6) {
            for spec in &RULES {
                self.add_rule(family, spec).await?;
                messages += 1;
            }
        }
        Ok(messages)
    }

    async fn add_rule(&self, family: &IpVersion, spec: &RuleSpec) -> Result<()> {
        let base = self.handle().rule().add().priority(spec.priority);
        let mut req = match spec.table {
            Some(t) => base.table_id(t).action(RuleAction::ToTable),
            None => base.action(RuleAction::Unreachable),
        };
        if spec.bypass_mark {
            req = req.fw_mark(BYPASS_MARK);
            req.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(MARK_MASK));
        }
        let msg = req.message_mut();
        msg.header.family = match family {
            IpVersion::V4 => AddressFamily::Inet,
            IpVersion::V6 => AddressFamily::Inet6,
        };
        if spec.table.is_none() {
            // iproute2 prints "unreachable" only without a table, as tailscaled's rule.
            msg.header.table = 0;
        }
        match req.execute().await {
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            other => other.map_err(nl("rule add")),
        }
    }

    /// Deletes our rules (and a Go tailscaled's) in both families; returns how many went.
    pub async fn delete_policy_rules(&self, v6: bool) -> Result<usize> {
        let mut deleted = 0;
        for family in families(v6) {
            let Ok(rules) = self.rules(family.clone()).await else {
                continue; // no policy routing for this family: nothing of ours can be there
            };
            for msg in rules.into_iter().filter(|m| is_ours(&seen_rule(m))) {
                match self.handle().rule().del(msg).execute().await {
                    Err(e) if !is_errno(&e, libc::ENOENT) => return Err(nl("rule del")(e)),
                    _ => deleted += 1,
                }
            }
        }
        Ok(deleted)
    }

    /// Whether all four rules are in place (for each family asked for).
    pub async fn policy_rules_present(&self, v6: bool) -> Result<bool> {
        for family in families(v6) {
            let seen: Vec<SeenRule> = self
                .rules(family.clone())
                .await?
                .iter()
                .map(seen_rule)
                .collect();
            if !RULES.iter().all(|spec| spec_present(spec, &seen)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn throw_message(dst: IpNet, table: u32) -> Result<RouteMessage> {
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .map_err(|e| PlatformError::InvalidRoute(dst, e.to_string()))?;
        Ok(builder.table_id(table).kind(RouteType::Throw).build())
    }

    /// Adds (or replaces) a `throw` route: lookups for `dst` leave `table` and go on to main.
    pub async fn replace_throw_route(&self, dst: IpNet, table: u32) -> Result<()> {
        let msg = Self::throw_message(dst, table)?;
        self.handle()
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl("throw route add"))
    }

    /// Deletes a throw route; one already gone is fine.
    pub async fn delete_throw_route(&self, dst: IpNet, table: u32) -> Result<()> {
        let msg = Self::throw_message(dst, table)?;
        match self.handle().route().del(msg).execute().await {
            Err(e) if !is_errno(&e, libc::ESRCH) => Err(nl("throw route del")(e)),
            _ => Ok(()),
        }
    }

    /// Removes the routes of `table` that outlive a TUN (throw, unreachable, blackhole,
    /// prohibit): left behind while rule 5270 exists, they could black-hole the host. Routes
    /// through a device vanish with it. Returns how many were removed.
    pub async fn flush_tunnel_independent_routes(&self, table: u32) -> Result<usize> {
        let mut removed = 0;
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessageBuilder::<IpAddr>::new().build();
            query.header.address_family = family;
            let msgs: Vec<RouteMessage> = self
                .handle()
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(nl("route get"))?;
            for m in msgs.into_iter().filter(|m| {
                route_table(m) == table
                    && matches!(
                        m.header.kind,
                        RouteType::Throw
                            | RouteType::Unreachable
                            | RouteType::BlackHole
                            | RouteType::Prohibit
                    )
            }) {
                match self.handle().route().del(m).execute().await {
                    Err(e) if !is_errno(&e, libc::ESRCH) => return Err(nl("route del")(e)),
                    _ => removed += 1,
                }
            }
        }
        Ok(removed)
    }
}

/// The table of a route message (the attribute wins over the 8-bit header field).
pub(crate) fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// What a cleanup pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoutingCleanup {
    pub rules: usize,
    pub routes: usize,
}

/// The routing half of the crash cleanup: our ip rules (both families) and table 52's throw and
/// unreachable routes. Safe to run any time tern is not running.
pub async fn cleanup(netlink: &Netlink) -> Result<RoutingCleanup> {
    Ok(RoutingCleanup {
        rules: netlink.delete_policy_rules(true).await?,
        routes: netlink.flush_tunnel_independent_routes(TS_TABLE).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(priority: u32, table: u32, unreachable: bool) -> SeenRule {
        SeenRule {
            priority,
            table,
            unreachable,
        }
    }

    #[test]
    fn ours_are_in_the_window_and_point_at_our_tables() {
        assert!(is_ours(&seen(5210, 254, false)));
        assert!(is_ours(&seen(5250, 0, true)));
        assert!(is_ours(&seen(5270, 52, false)));
        // Go's UBNT variant and older mark variants have the same priority and table.
        assert!(is_ours(&seen(5299, 52, false)));
        assert!(!is_ours(&seen(5300, 52, false)), "outside the window");
        assert!(!is_ours(&seen(5199, 254, false)), "outside the window");
        assert!(!is_ours(&seen(5220, 100, false)), "someone else's table");
        assert!(!is_ours(&seen(32766, 254, false)), "the kernel's main rule");
    }

    #[test]
    fn presence_needs_every_rule_with_its_table() {
        let all: Vec<SeenRule> = RULES
            .iter()
            .map(|s| seen(s.priority, s.table.unwrap_or(0), s.table.is_none()))
            .collect();
        assert!(RULES.iter().all(|s| spec_present(s, &all)));
        let without_last = &all[..3];
        assert!(!spec_present(&RULES[3], without_last));
        let wrong_table = [seen(5270, 254, false)];
        assert!(!spec_present(&RULES[3], &wrong_table));
        let not_unreachable = [seen(5250, 254, false)];
        assert!(!spec_present(&RULES[2], &not_unreachable));
    }
}
