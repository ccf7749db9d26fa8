//! Linux integration end to end (issue 13), with real daemons in lab namespaces:
//!
//! * The ip rules 5210–5270, table 52 and the netfilter chains appear as tailscaled's do (read
//!   back with `ip -j` and `iptables-save`), are put back after `nft flush ruleset` and a
//!   deleted rule, and go on `tern down` and on stop; after SIGKILL they stay until the next
//!   start or `tern daemon --cleanup` removes them. A ufw-like ruleset and a foreign ip rule
//!   loaded before are byte-identical afterwards.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::time::Duration;

use lab_nodes::{ping_once, start_control, start_derp, tail, wait, Node};
use lab_server::LabServer;
use serde_json::Value;
use support::require_root;
use tern_lab::{NatMode, Netns, Process, Topology};

/// A firewall as ufw leaves it (iptables-nft rules with a user chain) ...
const UFW_LIKE: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ufw-before-input - [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -j ufw-before-input
-A ufw-before-input -i lo -j ACCEPT
-A ufw-before-input -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A ufw-before-input -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
";

/// ... and a table of the admin's own, in nft.
const ADMIN_TABLE: &str = "table inet adminfw {
  chain input {
    type filter hook input priority 10; policy accept;
    udp dport 9999 counter drop
  }
}
";

/// The policy rules tailscaled installs: (priority, action or table, bypass mark?).
const EXPECTED_RULES: [(u64, &str, bool); 4] = [
    (5210, "main", true),
    (5230, "default", true),
    (5250, "unreachable", true),
    (5270, "52", false),
];

struct Lab {
    _control: LabServer,
    _derp: Process,
    dir: tempfile::TempDir,
    topo: Topology,
}

impl Lab {
    fn start() -> Lab {
        require_root();
        let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
        let derp = start_derp(&topo);
        let dir = tempfile::tempdir().expect("temp dir");
        let control = start_control(&topo, dir.path());
        Lab {
            _control: control,
            _derp: derp,
            dir,
            topo,
        }
    }

    fn ns(&self, name: &str) -> &Netns {
        self.topo.ns(name).expect("lab namespace")
    }
}

fn text(ns: &Netns, args: &[&str]) -> String {
    let out = ns.exec(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(ns: &Netns, args: &[&str]) -> Value {
    serde_json::from_str(&text(ns, args)).unwrap_or(Value::Null)
}

/// The IPv4 rules in tern's window (5200–5299) as (priority, table or action, has mark).
fn our_rules(ns: &Netns) -> Vec<(u64, String, bool)> {
    json(ns, &["ip", "-j", "-4", "rule", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            let pref = r["priority"].as_u64()?;
            (5200..5300).contains(&pref).then(|| {
                let target = r["table"]
                    .as_str()
                    .or_else(|| r["action"].as_str())
                    .unwrap_or("?")
                    .to_string();
                let marked = r["fwmark"] == "0x80000" && r["fwmask"] == "0xff0000";
                (pref, target, marked)
            })
        })
        .collect()
}

fn expected_rules() -> Vec<(u64, String, bool)> {
    EXPECTED_RULES
        .iter()
        .map(|(p, t, m)| (*p, t.to_string(), *m))
        .collect()
}

/// Destinations of the routes in table 52 (`dst` plus `type` when not unicast).
fn table_52(ns: &Netns) -> Vec<String> {
    let out = ns
        .exec_unchecked(&["ip", "-j", "-4", "route", "show", "table", "52"])
        .expect("ip route");
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            let dst = r["dst"].as_str()?.to_string();
            Some(match r["type"].as_str() {
                Some(kind) if kind != "unicast" => format!("{kind} {dst}"),
                _ => dst,
            })
        })
        .collect()
}

/// tern's lines of `iptables-save` (chains, jumps, rules), in order.
fn ts_iptables(ns: &Netns) -> Vec<String> {
    text(ns, &["iptables-save"])
        .lines()
        .filter(|l| l.contains("ts-"))
        .map(str::to_string)
        .collect()
}

/// Whether the hooks jump to our chains from the first rule of INPUT, FORWARD, POSTROUTING.
fn hooks_first(lines: &str) -> bool {
    let first = |chain: &str| {
        lines
            .lines()
            .find(|l| l.starts_with(&format!("-A {chain} ")))
            .map(str::to_string)
    };
    first("INPUT").as_deref() == Some("-A INPUT -j ts-input")
        && first("FORWARD").as_deref() == Some("-A FORWARD -j ts-forward")
        && first("POSTROUTING").as_deref() == Some("-A POSTROUTING -j ts-postrouting")
}

/// Everything the host had before tern: the whole nft ruleset and the ip rules.
fn host_snapshot(ns: &Netns) -> (String, String) {
    (
        // Stateless: counters move with traffic, the rules must not.
        text(ns, &["nft", "-s", "list", "ruleset"]),
        text(ns, &["ip", "rule", "show"]),
    )
}

fn start_pair(lab: &Lab) -> (Node, Node, String) {
    let a = Node::start(lab.ns("c1"), lab.dir.path(), "ta");
    let b = Node::start(lab.ns("c2"), lab.dir.path(), "tb");
    a.wait_for_api(20);
    b.wait_for_api(20);
    a.up("ta");
    b.up("tb");
    let b_ip = wait("tb's address", 30, || b.logs(), || b.tailnet_ip());
    wait("ta sees tb", 30, || a.logs(), || a.peer("tb"));
    (a, b, b_ip)
}

/// tern's iptables rules a full set has (order checked separately).
const EXPECTED_CHAIN_RULES: [&str; 5] = [
    "-A ts-input -s 100.64.0.0/10 ! -i tern0 -j DROP",
    "-A ts-input -i tern0 -j ACCEPT",
    "-A ts-input -p udp -m udp --dport 41641 -j ACCEPT",
    "-A ts-forward -i tern0 -j MARK --set-xmark 0x40000/0xff0000",
    "-A ts-postrouting -m mark --mark 0x40000/0xff0000 -j MASQUERADE",
];

/// The full set is in place: rules, table 52 with the peer and quad-100, chains hooked first
/// and filled (iptables applies rule by rule, so a half-filled chain is waited out).
fn assert_installed(ns: &Netns, peer_ip: &str, logs: &dyn Fn() -> String) {
    let explain = || {
        format!(
            "rules {:?}\ntable 52 {:?}\n{}\n{}",
            our_rules(ns),
            table_52(ns),
            text(ns, &["iptables-save"]),
            logs()
        )
    };
    wait("rules, table 52 and chains in place", 20, explain, || {
        let chains = ts_iptables(ns);
        (our_rules(ns) == expected_rules()
            && table_52(ns).contains(&peer_ip.to_string())
            && table_52(ns).contains(&"100.100.100.100".to_string())
            && hooks_first(&text(ns, &["iptables-save"]))
            && EXPECTED_CHAIN_RULES
                .iter()
                .all(|rule| chains.iter().any(|l| l == rule)))
        .then_some(())
    });
    let chains = ts_iptables(ns);
    let drop = chains
        .iter()
        .position(|l| l.contains("-j DROP") && l.starts_with("-A ts-input"));
    let accept = chains
        .iter()
        .position(|l| l == "-A ts-input -i tern0 -j ACCEPT");
    assert!(
        drop < accept,
        "the CGNAT drop comes before the tun accept: {chains:#?}"
    );
}

/// Nothing of tern's is left, and what the host had is as it was, byte for byte.
fn assert_gone(ns: &Netns, before: &(String, String), logs: &dyn Fn() -> String) {
    wait("rules, routes and chains gone", 20, logs, || {
        (our_rules(ns).is_empty() && table_52(ns).is_empty() && ts_iptables(ns).is_empty())
            .then_some(())
    });
    let after = host_snapshot(ns);
    assert_eq!(after.0, before.0, "nft ruleset differs after tern");
    assert_eq!(after.1, before.1, "ip rules differ after tern");
}

#[test]
fn rules_routes_and_firewall_come_and_go_with_the_daemon() {
    let lab = Lab::start();
    let c1 = lab.ns("c1");
    let restore = c1
        .command("iptables-restore")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(UFW_LIKE.as_bytes())?;
            child.wait()
        })
        .expect("iptables-restore");
    assert!(restore.success(), "load the ufw-like ruleset");
    c1.nft_apply(ADMIN_TABLE).expect("load the admin's table");
    c1.exec(&["ip", "rule", "add", "pref", "1000", "from", "10.77.0.0/16", "lookup", "100"])
        .expect("a foreign rule");
    let before = host_snapshot(c1);
    let (a, _b, b_ip) = start_pair(&lab);
    let logs = || a.logs();
    assert_installed(c1, &b_ip, &logs);
    assert!(ping_once(c1, &b_ip), "traffic flows with the rules in\n{}", a.logs());
    let status = a.status();
    assert_eq!(status["routing"]["table"], 52, "{}", status["routing"]);
    assert_eq!(status["routing"]["policy_rules"], true);
    assert_eq!(status["routing"]["netfilter_kind"], "iptables");
    assert_eq!(status["routing"]["netfilter_mode"], "on");

    // `tern down` takes everything away; `tern up` brings it back.
    let down = a.cli(&["down"]);
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert_gone(c1, &before, &logs);
    a.up("ta");
    assert_installed(c1, &b_ip, &logs);

    // SIGKILL leaves it all; `tern daemon --cleanup` (the unit's ExecStopPost) removes it.
    a.process
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill ta");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(our_rules(c1), expected_rules(), "a killed daemon cleans nothing");
    assert!(!ts_iptables(c1).is_empty());
    let cleanup = c1
        .exec_unchecked(&[env!("CARGO_BIN_EXE_tern"), "daemon", "--cleanup"])
        .expect("run cleanup");
    assert!(cleanup.status.success(), "{}", String::from_utf8_lossy(&cleanup.stderr));
    assert_gone(c1, &before, &logs);

    // Killed again, the next start cleans up first: one set of rules, one jump per hook.
    let a2 = Node::start(c1, lab.dir.path(), "ta");
    a2.wait_for_api(20);
    let logs2 = || a2.logs();
    assert_installed(c1, &b_ip, &logs2);
    a2.process
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill ta");
    std::thread::sleep(Duration::from_millis(500));
    let mut a3 = Node::start(c1, lab.dir.path(), "ta");
    a3.wait_for_api(20);
    let logs3 = || a3.logs();
    assert_installed(c1, &b_ip, &logs3);
    assert!(
        a3.process.output().contains("removed rules and routes a previous run left"),
        "{}",
        a3.logs()
    );
    let saved = text(c1, &["iptables-save"]);
    assert_eq!(saved.matches("-j ts-input").count(), 1, "{saved}");
    assert_eq!(our_rules(c1).len(), 4);

    // A firewall reload and a rule deleted by another program: back within seconds.
    c1.exec(&["nft", "flush", "ruleset"]).expect("flush");
    c1.exec(&["ip", "rule", "del", "pref", "5270"]).expect("del rule");
    assert_installed(c1, &b_ip, &logs3);
    assert!(ping_once(c1, &b_ip), "traffic flows again\n{}", a3.logs());
    assert!(
        tail(&a3.process.output(), 400).contains("netfilter rules missing"),
        "{}",
        a3.logs()
    );

    // A clean stop removes everything at once (the ufw-like set went with the flush).
    a3.process.stop().expect("stop ta");
    assert!(our_rules(c1).is_empty(), "rules left after stop");
    assert!(table_52(c1).is_empty(), "routes left after stop");
    assert!(
        ts_iptables(c1).is_empty(),
        "chains left after stop: {:#?}\n{}",
        ts_iptables(c1),
        a3.logs()
    );
    assert_eq!(text(c1, &["ip", "rule", "show"]), before.1);
    drop(a);
}
