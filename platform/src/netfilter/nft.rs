//! The nftables backend: our rules as nft JSON, applied as one `nft -j -f -` batch each time, so
//! a change is atomic, and read back with `nft -j list ruleset`.

use ipnet::IpNet;
use serde_json::{json, Value};

use super::cmd;
use super::rules::{self, Action, Family, Hook, Match, Rule, HOOKS, MARK, MARK_MASK};
use super::{NetfilterConfig, NetfilterMode};
use crate::error::{PlatformError, Result};

const NFT: &str = "nft";
/// Tables we put our chains into (shared with iptables-nft, ufw, Docker: never flushed).
const TABLES: [&str; 2] = ["filter", "nat"];
/// Whole tables an older Go tailscaled created for itself; crash cleanup deletes them.
const LEGACY_TABLES: [&str; 2] = ["ts-filter", "ts-nat"];

/// A table, chain or rule location: family, table, chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChainRef {
    pub family: String,
    pub table: String,
    pub name: String,
}

/// A rule as far as we care: where it is, its handle, and where it jumps/goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RuleRef {
    pub chain: ChainRef,
    pub handle: u64,
    pub target: Option<String>,
}

/// The parts of `nft -j list ruleset` we need.
#[derive(Debug, Default)]
pub(crate) struct Ruleset {
    pub tables: Vec<(String, String)>,
    pub chains: Vec<ChainRef>,
    /// In list order, which is rule order within each chain.
    pub rules: Vec<RuleRef>,
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

fn chain_ref(v: &Value, name_key: &str) -> ChainRef {
    ChainRef {
        family: str_field(v, "family"),
        table: str_field(v, "table"),
        name: str_field(v, name_key),
    }
}

/// The jump/goto target among a rule's expressions, if any.
fn verdict_target(expr: &Value) -> Option<String> {
    expr.as_array()?.iter().find_map(|e| {
        ["jump", "goto"]
            .iter()
            .find_map(|k| e.get(k)?.get("target")?.as_str().map(str::to_string))
    })
}

impl Ruleset {
    /// Parses `nft -j list ruleset` output; unknown object kinds (sets, maps, ...) are skipped.
    pub(crate) fn parse(text: &str) -> Result<Self> {
        let bad = |reason: String| PlatformError::CommandOutput {
            cmd: "nft -j list ruleset".into(),
            reason,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let items = v
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no \"nftables\" array".into()))?;
        let mut rs = Ruleset::default();
        for item in items {
            if let Some(t) = item.get("table") {
                rs.tables
                    .push((str_field(t, "family"), str_field(t, "name")));
            } else if let Some(c) = item.get("chain") {
                rs.chains.push(chain_ref(c, "name"));
            } else if let Some(r) = item.get("rule") {
                let handle = r.get("handle").and_then(Value::as_u64);
                let handle = handle.ok_or_else(|| bad("rule without handle".into()))?;
                rs.rules.push(RuleRef {
                    chain: chain_ref(r, "chain"),
                    handle,
                    target: r.get("expr").and_then(verdict_target),
                });
            }
        }
        Ok(rs)
    }

    fn has_table(&self, family: &str, table: &str) -> bool {
        self.tables.iter().any(|(f, t)| f == family && t == table)
    }

    fn has_chain(&self, family: &str, table: &str, chain: &str) -> bool {
        let c = |c: &&ChainRef| c.family == family && c.table == table && c.name == chain;
        self.chains.iter().any(|x| c(&x))
    }

    fn rules_in<'a>(
        &'a self,
        family: &'a str,
        table: &'a str,
        chain: &'a str,
    ) -> impl Iterator<Item = &'a RuleRef> + 'a {
        self.rules.iter().filter(move |r| {
            r.chain.family == family && r.chain.table == table && r.chain.name == chain
        })
    }

    /// Rules anywhere in `family table` that jump or go to `target`.
    fn jumps_to<'a>(
        &'a self,
        family: &'a str,
        table: &'a str,
        target: &'a str,
    ) -> impl Iterator<Item = &'a RuleRef> + 'a {
        self.rules.iter().filter(move |r| {
            r.chain.family == family
                && r.chain.table == table
                && r.target.as_deref() == Some(target)
        })
    }

    /// Total number of rules (used by kind detection).
    pub(crate) fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

/// Reads the live ruleset.
pub(crate) fn read() -> Result<Ruleset> {
    let text = cmd::run(NFT, &cmd::args(&["-j", "list", "ruleset"]), None)?;
    Ruleset::parse(&text)
}

/// Runs `ops` as one atomic nft transaction (nothing when empty).
fn batch(ops: Vec<Value>) -> Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let doc = json!({ "nftables": ops }).to_string();
    tracing::debug!(ops = doc.len(), "nft batch");
    cmd::run(NFT, &cmd::args(&["-j", "-f", "-"]), Some(doc.as_bytes())).map(|_| ())
}

/// Reads the ruleset, builds a batch from it and runs it. Retried once from a fresh read: another
/// firewall manager may change the ruleset between our read and our write (stale handles).
fn transact(build: impl Fn(&Ruleset) -> Vec<Value>) -> Result<()> {
    match batch(build(&read()?)) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "nft batch failed, retrying from a fresh ruleset");
            batch(build(&read()?))
        }
    }
}

// ---- JSON builders -------------------------------------------------------------------------

fn table_obj(family: &str, table: &str) -> Value {
    json!({ "table": { "family": family, "name": table } })
}

fn chain_obj(family: &str, table: &str, chain: &str) -> Value {
    json!({ "chain": { "family": family, "table": table, "name": chain } })
}

/// A base chain as iptables-nft would create it, policy accept.
fn base_chain_obj(family: &str, h: &Hook) -> Value {
    json!({ "chain": {
        "family": family, "table": h.table, "name": h.base,
        "type": h.nft_type, "hook": h.nft_hook, "prio": h.nft_prio, "policy": "accept",
    }})
}

fn delete_rule(r: &RuleRef) -> Value {
    json!({ "delete": { "rule": {
        "family": r.chain.family, "table": r.chain.table, "chain": r.chain.name, "handle": r.handle,
    }}})
}

fn meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}

fn cmp(op: &str, left: Value, right: Value) -> Value {
    json!({ "match": { "op": op, "left": left, "right": right } })
}

/// An address as nft wants it: plain for a host, `prefix` otherwise.
fn addr_value(net: &IpNet) -> Value {
    if net.prefix_len() == net.max_prefix_len() {
        json!(net.addr().to_string())
    } else {
        json!({ "prefix": { "addr": net.network().to_string(), "len": net.prefix_len() } })
    }
}

fn match_expr(family: Family, m: &Match) -> Value {
    match m {
        Match::InIface(n) => cmp("==", meta("iifname"), json!(n)),
        Match::NotInIface(n) => cmp("!=", meta("iifname"), json!(n)),
        Match::OutIface(n) => cmp("==", meta("oifname"), json!(n)),
        Match::Saddr(net) => cmp(
            "==",
            json!({ "payload": { "protocol": family.nft(), "field": "saddr" } }),
            addr_value(net),
        ),
        Match::UdpDport(p) => cmp(
            "==",
            json!({ "payload": { "protocol": "udp", "field": "dport" } }),
            json!(p),
        ),
        Match::Marked => cmp("==", json!({ "&": [meta("mark"), MARK_MASK] }), json!(MARK)),
        // tailscaled's nft form; iptables says "! ESTABLISHED,RELATED", same packets.
        Match::NotEstablished => cmp(
            "in",
            json!({ "ct": { "key": "state" } }),
            json!(["invalid", "new"]),
        ),
    }
}

fn action_expr(a: Action) -> Value {
    match a {
        Action::Accept => json!({ "accept": null }),
        Action::Drop => json!({ "drop": null }),
        Action::Return => json!({ "return": null }),
        // Clear tailscaled's byte of the mark, then set 0x04 in it; other bits survive.
        Action::SetMark => json!({ "mangle": {
            "key": meta("mark"),
            "value": { "|": [ { "&": [meta("mark"), !MARK_MASK] }, MARK ] },
        }}),
        Action::Masquerade => json!({ "masquerade": null }),
    }
}

/// `add rule` for one of our rules: matches, a counter, the action.
pub(crate) fn rule_obj(family: Family, r: &Rule) -> Value {
    let mut expr: Vec<Value> = r.matches.iter().map(|m| match_expr(family, m)).collect();
    expr.push(json!({ "counter": null }));
    expr.push(action_expr(r.action));
    json!({ "add": { "rule": {
        "family": family.nft(), "table": r.hook.table, "chain": r.hook.chain, "expr": expr,
    }}})
}

/// `insert rule` (position 1) of the counted jump from the base chain to ours.
fn jump_obj(family: &str, h: &Hook) -> Value {
    json!({ "insert": { "rule": {
        "family": family, "table": h.table, "chain": h.base,
        "expr": [ { "counter": null }, { "jump": { "target": h.chain } } ],
    }}})
}

// ---- batches -------------------------------------------------------------------------------

/// Ops that remove our chains and every jump to them in `family`'s `tables`.
fn removal_ops(rs: &Ruleset, family: &str, tables: &[&str]) -> Vec<Value> {
    let mut ops = Vec::new();
    for table in tables {
        for h in HOOKS {
            ops.extend(rs.jumps_to(family, table, h.chain).map(delete_rule));
        }
        for h in HOOKS {
            if rs.has_chain(family, table, h.chain) {
                ops.push(json!({ "flush": chain_obj(family, table, h.chain) }));
                ops.push(json!({ "delete": chain_obj(family, table, h.chain) }));
            }
        }
    }
    ops
}

/// Ops that make `family`'s part of the live state exactly `cfg`.
fn apply_family_ops(rs: &Ruleset, cfg: &NetfilterConfig, family: Family) -> Vec<Value> {
    let f = family.nft();
    if !family.wanted(cfg) {
        return removal_ops(rs, f, &TABLES);
    }
    let divert = cfg.mode == NetfilterMode::On;
    let mut ops = Vec::new();
    // Only create what is missing: `add` on an existing base chain would reset its policy
    // (ufw's INPUT is policy drop) and on a table could touch iptables-nft's metadata.
    for table in TABLES {
        if !rs.has_table(f, table) {
            ops.push(json!({ "add": table_obj(f, table) }));
        }
    }
    for h in &HOOKS {
        if divert && !rs.has_chain(f, h.table, h.base) {
            ops.push(json!({ "add": base_chain_obj(f, h) }));
        }
        if !rs.has_chain(f, h.table, h.chain) {
            ops.push(json!({ "add": chain_obj(f, h.table, h.chain) }));
        }
        ops.push(json!({ "flush": chain_obj(f, h.table, h.chain) }));
    }
    for h in &HOOKS {
        ops.extend(hook_ops(rs, f, h, divert));
    }
    ops.extend(
        rules::rules(cfg, family)
            .iter()
            .map(|r| rule_obj(family, r)),
    );
    ops
}

/// Ops that leave exactly one jump to `h.chain`, first in its base chain (`divert`), or none.
fn hook_ops(rs: &Ruleset, family: &str, h: &Hook, divert: bool) -> Vec<Value> {
    let jumps: Vec<&RuleRef> = rs.jumps_to(family, h.table, h.chain).collect();
    let first = rs.rules_in(family, h.table, h.base).next();
    let in_place = jumps.len() == 1 && first == Some(jumps[0]);
    if divert && in_place {
        return Vec::new();
    }
    let mut ops: Vec<Value> = jumps.into_iter().map(delete_rule).collect();
    if divert {
        ops.push(jump_obj(family, h));
    }
    ops
}

/// Makes the live nftables state exactly `cfg`, in one transaction.
pub(crate) fn apply(cfg: &NetfilterConfig) -> Result<()> {
    transact(|rs| {
        Family::ALL
            .iter()
            .flat_map(|&f| apply_family_ops(rs, cfg, f))
            .collect()
    })
}

/// Removes our chains and jumps (ip and ip6 filter/nat), in one transaction.
pub(crate) fn remove() -> Result<()> {
    transact(|rs| {
        Family::ALL
            .iter()
            .flat_map(|f| removal_ops(rs, f.nft(), &TABLES))
            .collect()
    })
}

/// Crash cleanup: ours and a Go tailscaled's leftovers in ip, ip6 and inet, plus its old
/// `ts-filter`/`ts-nat` tables.
pub(crate) fn cleanup() -> Result<()> {
    transact(|rs| {
        let mut ops = Vec::new();
        for family in ["ip", "ip6", "inet"] {
            ops.extend(removal_ops(rs, family, &TABLES));
            for t in LEGACY_TABLES {
                if rs.has_table(family, t) {
                    ops.push(json!({ "delete": table_obj(family, t) }));
                }
            }
        }
        ops
    })
}

/// Whether any chain, hook or rule `cfg` wants is missing from the live ruleset.
pub(crate) fn missing(cfg: &NetfilterConfig) -> Result<bool> {
    Ok(missing_in(&read()?, cfg))
}

fn missing_in(rs: &Ruleset, cfg: &NetfilterConfig) -> bool {
    Family::ALL.iter().filter(|f| f.wanted(cfg)).any(|&family| {
        let f = family.nft();
        let want = rules::rules(cfg, family);
        HOOKS.iter().any(|h| {
            !rs.has_chain(f, h.table, h.chain)
                || rs.rules_in(f, h.table, h.chain).count() < rules::count_in(&want, h.chain)
                || (cfg.mode == NetfilterMode::On
                    && rs
                        .rules_in(f, h.table, h.base)
                        .all(|r| r.target.as_deref() != Some(h.chain)))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetfilterConfig {
        NetfilterConfig {
            addrs: vec!["100.101.102.103/32".parse().unwrap()],
            magicsock_port: Some(41641),
            ..NetfilterConfig::new("tailscale0")
        }
    }

    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"table": {"family": "ip", "name": "filter", "handle": 1}},
      {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
      {"chain": {"family": "ip", "table": "filter", "name": "ts-input", "handle": 2}},
      {"set": {"family": "ip", "table": "filter", "name": "s", "type": "ipv4_addr", "handle": 9}},
      {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "handle": 4, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
      {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "handle": 5, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "ts-input"}}]}},
      {"rule": {"family": "ip", "table": "filter", "chain": "ts-input", "handle": 6, "expr": [{"goto": {"target": "ts-forward"}}]}}
    ]}"#;

    #[test]
    fn parses_tables_chains_rules_and_targets() {
        let rs = Ruleset::parse(LISTED).unwrap();
        assert_eq!(rs.tables, vec![("ip".to_string(), "filter".to_string())]);
        assert_eq!(rs.chains.len(), 2);
        assert_eq!(rs.rule_count(), 3);
        assert_eq!(rs.rules[1].target.as_deref(), Some("ts-input"));
        assert_eq!(rs.rules[2].target.as_deref(), Some("ts-forward"));
        assert!(Ruleset::parse("{}").is_err());
        assert!(Ruleset::parse("not json").is_err());
    }

    #[test]
    fn jump_not_first_is_replaced_and_base_chain_not_recreated() {
        let rs = Ruleset::parse(LISTED).unwrap();
        let ops = apply_family_ops(&rs, &cfg(), Family::V4);
        let text: Vec<String> = ops.iter().map(Value::to_string).collect();
        // INPUT exists (policy drop): no `add chain INPUT` that would reset its policy.
        assert!(!text.iter().any(|o| o.contains(r#""name":"INPUT""#)));
        assert!(text
            .iter()
            .any(|o| o.contains(r#""delete""#) && o.contains(r#""handle":5"#)));
        assert!(text
            .iter()
            .any(|o| o.starts_with(r#"{"insert""#) && o.contains("ts-input")));
        // FORWARD and POSTROUTING do not exist yet: created.
        assert!(text.iter().any(|o| o.contains(r#""name":"FORWARD""#)));
        assert!(text.iter().any(|o| o.contains(r#""hook":"postrouting""#)));
    }

    #[test]
    fn rule_json_has_counter_before_verdict() {
        let r = &rules::rules(&cfg(), Family::V4)[0];
        let v = rule_obj(Family::V4, r);
        let expr = &v["add"]["rule"]["expr"];
        assert_eq!(expr[0]["match"]["right"], "lo");
        assert_eq!(expr[1]["match"]["right"], "100.101.102.103");
        assert_eq!(expr[2], json!({ "counter": null }));
        assert_eq!(expr[3], json!({ "accept": null }));
        let cgnat = addr_value(&"100.64.0.0/10".parse().unwrap());
        assert_eq!(
            cgnat,
            json!({ "prefix": { "addr": "100.64.0.0", "len": 10 } })
        );
        let set = action_expr(Action::SetMark);
        assert_eq!(set["mangle"]["value"]["|"][0]["&"][1], json!(0xff00ffffu32));
    }

    #[test]
    fn removal_deletes_jumps_before_chains() {
        let rs = Ruleset::parse(LISTED).unwrap();
        let ops = removal_ops(&rs, "ip", &TABLES);
        // The goto inside ts-input targets ts-forward: deleted too, though flushed anyway.
        assert_eq!(ops.len(), 4);
        assert!(ops[0]["delete"]["rule"]["handle"] == 5);
        assert!(ops[1]["delete"]["rule"]["handle"] == 6);
        assert!(ops[2]["flush"]["chain"]["name"] == "ts-input");
        assert!(ops[3]["delete"]["chain"]["name"] == "ts-input");
        assert!(missing_in(&rs, &cfg()));
    }
}
