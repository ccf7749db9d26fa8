//! Linux integration end to end (issue 13), with real daemons in lab namespaces:
//!
//! * The ip rules 5210–5270, table 52 and the netfilter chains appear as tailscaled's do (read
//!   back with `ip -j` and `iptables-save`), are put back after `nft flush ruleset` and a
//!   deleted rule, and go on `tern down` and on stop; after SIGKILL they stay until the next
//!   start or `tern daemon --cleanup` removes them. A ufw-like ruleset and a foreign ip rule
//!   loaded before are byte-identical afterwards. The same with nftables when asked for
//!   (`TS_DEBUG_FIREWALL_MODE=nftables`).
//! * Exit node, tern on both ends: c1's requests to the lab's internet host come from c2's
//!   side while c2 is its exit node; with c2's daemon killed they do not leave c1's uplink (a
//!   counter on nat1) while c1's tern runs, and do once it stops.
//! * Subnet router: c2 advertises its LAN, control approves it, c1 with `--accept-routes`
//!   reaches the LAN host (masqueraded by c2) and the packet filter from control decides what
//!   c2 forwards (the allowed port answers, the other is dropped and counted). A Caddy/tsnet
//!   node (tailscale.com v1.90.9) in the same tailnet reaches c2 through the same filter; it
//!   does not use the route, as Go's Linux default is RouteAll=false (`ipn.Prefs.
//!   DefaultRouteAll`) and tsnet cannot change it.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::time::Duration;

use lab_nodes::{
    control_config, ping_once, start_control_with, start_derp, tail, wait, whoami, Node,
};
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
        Lab::start_with(|_| {}, |_| {})
    }

    /// A lab with extra hosts (`build`) and a control config `adjust`ed before it starts.
    fn start_with(
        build: impl FnOnce(&mut Topology),
        adjust: impl FnOnce(&mut tern_lab::control::Config),
    ) -> Lab {
        require_root();
        let mut topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("build lab");
        build(&mut topo);
        let derp = start_derp(&topo);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = control_config(dir.path());
        adjust(&mut config);
        let control = start_control_with(&topo, config);
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
    c1.exec(&[
        "ip",
        "rule",
        "add",
        "pref",
        "1000",
        "from",
        "10.77.0.0/16",
        "lookup",
        "100",
    ])
    .expect("a foreign rule");
    let before = host_snapshot(c1);
    let (a, _b, b_ip) = start_pair(&lab);
    let logs = || a.logs();
    assert_installed(c1, &b_ip, &logs);
    assert!(
        ping_once(c1, &b_ip),
        "traffic flows with the rules in\n{}",
        a.logs()
    );
    let status = a.status();
    assert_eq!(status["routing"]["table"], 52, "{}", status["routing"]);
    assert_eq!(status["routing"]["policy_rules"], true);
    assert_eq!(status["routing"]["netfilter_kind"], "iptables");
    assert_eq!(status["routing"]["netfilter_mode"], "on");

    // `tern down` takes everything away; `tern up` brings it back.
    let down = a.cli(&["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_gone(c1, &before, &logs);
    a.up("ta");
    assert_installed(c1, &b_ip, &logs);

    // SIGKILL leaves it all; `tern daemon --cleanup` (the unit's ExecStopPost) removes it.
    a.process
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill ta");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        our_rules(c1),
        expected_rules(),
        "a killed daemon cleans nothing"
    );
    assert!(!ts_iptables(c1).is_empty());
    let cleanup = c1
        .exec_unchecked(&[env!("CARGO_BIN_EXE_tern"), "daemon", "--cleanup"])
        .expect("run cleanup");
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
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
        a3.process
            .output()
            .contains("removed rules and routes a previous run left"),
        "{}",
        a3.logs()
    );
    let saved = text(c1, &["iptables-save"]);
    assert_eq!(saved.matches("-j ts-input").count(), 1, "{saved}");
    assert_eq!(our_rules(c1).len(), 4);

    // The host announces its changes (iptables-nft's reach nfnetlink; legacy iptables' do
    // not, and are looked for every 2 s): while nothing changes, tern does not look.
    let nft_backed = text(c1, &["iptables", "-V"]).contains("(nf_tables)");
    let routing = |node: &Node| node.status()["routing"].clone();
    wait(
        "the firewall's backend learnt",
        10,
        || a3.logs(),
        || (routing(&a3)["host_poll_secs"] == if nft_backed { 30 } else { 2 }).then_some(()),
    );
    assert_eq!(routing(&a3)["host_changes_announced"], true);
    let checks = |node: &Node| routing(node)["host_checks"].as_u64().expect("host_checks");
    let idle_from = checks(&a3);
    std::thread::sleep(Duration::from_secs(5));
    let idle_checks = checks(&a3) - idle_from;
    if nft_backed {
        // Polling every 2 s would have looked at least twice.
        assert!(idle_checks <= 1, "{idle_checks} looks in 5 idle seconds");
    }

    // A firewall reload and a rule deleted by another program: back within seconds.
    let before_reload = checks(&a3);
    c1.exec(&["nft", "flush", "ruleset"]).expect("flush");
    c1.exec(&["ip", "rule", "del", "pref", "5270"])
        .expect("del rule");
    assert_installed(c1, &b_ip, &logs3);
    // The status snapshot is refreshed every second: the look shows up in it a moment later.
    wait(
        "the look counted",
        5,
        || routing(&a3).to_string(),
        || (checks(&a3) > before_reload).then_some(()),
    );
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

/// Packets from c1 to the internet host's HTTP port that nat1 forwarded.
const PROBE: &str = "table inet probe {
  chain tally {
    type filter hook forward priority -10; policy accept;
    ip saddr 10.1.0.2 ip daddr 198.18.0.30 tcp dport 80 counter
  }
}
";

fn probe_count(nat: &Netns) -> u64 {
    json(nat, &["nft", "-j", "list", "table", "inet", "probe"])["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum()
}

fn tern_ok(node: &Node, args: &[&str]) -> String {
    let out = node.cli(args);
    assert!(
        out.status.success(),
        "tern {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.logs()
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn exit_node_carries_all_traffic_and_fails_closed() {
    let inet_ip = tern_lab::topology::INTERNET_IP.to_string();
    let lab = Lab::start_with(
        |topo| topo.add_internet_host().expect("internet host"),
        |config| config.auto_approve_routes = true,
    );
    let _web = tern_lab::spawn_whoami(lab.ns("inet"), format!("{inet_ip}:80").parse().unwrap())
        .expect("whoami on the internet host");
    let (c1, c2, nat1) = (lab.ns("c1"), lab.ns("c2"), lab.ns("nat1"));
    nat1.nft_apply(PROBE).expect("probe counter");
    let nat1_wan = lab.topo.site("c1").expect("site 1").wan_ip.to_string();
    let nat2_wan = lab.topo.site("c2").expect("site 2").wan_ip.to_string();
    assert_eq!(whoami(c1, &inet_ip, 80).as_deref(), Some(nat1_wan.as_str()));

    let (a, mut b, _) = start_pair(&lab);
    c2.sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding on c2");
    let offered = tern_ok(&b, &["set", "--advertise-exit-node"]);
    assert!(!offered.contains("forwarding is off"), "{offered}");
    wait(
        "ta sees tb offer an exit node",
        30,
        || a.logs(),
        || a.peer_entry("tb").filter(|p| p["exit_node_option"] == true),
    );
    let list = tern_ok(&a, &["exit-node", "list"]);
    assert!(
        list.contains("tb.") && (list.contains("direct") || list.contains("derp")),
        "{list}"
    );

    // A name that matches nothing is refused and changes nothing.
    let bad = a.cli(&["set", "--exit-node=nobody"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nobody"));
    assert_eq!(a.status()["routing"]["exit_node"], Value::Null);

    tern_ok(&a, &["set", "--exit-node=tb"]);
    let route = text(c1, &["ip", "route", "get", &inet_ip]);
    assert!(
        route.contains("dev tern0") && route.contains("table 52"),
        "{route}"
    );
    let seen = wait(
        "the internet host sees c2's side",
        30,
        || a.logs(),
        || whoami(c1, &inet_ip, 80).filter(|ip| *ip == nat2_wan),
    );
    assert_eq!(seen, nat2_wan);
    let status = tern_ok(&a, &["status"]);
    assert!(
        status.contains("exit node") && status.contains("# Exit node: tb"),
        "{status}"
    );
    assert!(probe_count(nat1) > 0, "the first request went out directly");
    let before_kill = probe_count(nat1);

    // The exit node dies: nothing leaks out of c1's own uplink while tern runs.
    b.process
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill tb");
    for _ in 0..2 {
        let got = whoami(c1, &inet_ip, 80);
        assert_eq!(got, None, "a request got through without the exit node");
    }
    assert_eq!(
        probe_count(nat1),
        before_kill,
        "c1 leaked around the dead exit node"
    );
    assert!(
        table_52(c1).iter().any(|r| r == "default"),
        "{:?}",
        table_52(c1)
    );
    let _ = b.process.stop();

    // tern stops: normal routing again.
    let mut a = a;
    a.process.stop().expect("stop ta");
    assert_eq!(whoami(c1, &inet_ip, 80).as_deref(), Some(nat1_wan.as_str()));
    assert!(probe_count(nat1) > before_kill);
}

#[test]
fn lan_access_and_bad_routes() {
    let lab = Lab::start_with(|_| {}, |config| config.auto_approve_routes = true);
    let (a, b, _) = start_pair(&lab);
    lab.ns("c2")
        .sysctl("net.ipv4.ip_forward", "0")
        .expect("forwarding off on c2");
    // Forwarding off: tern says what to set.
    let said = tern_ok(&b, &["set", "--advertise-exit-node"]);
    assert!(said.contains("sysctl -w net.ipv4.ip_forward=1"), "{said}");
    let status = tern_ok(&b, &["status"]);
    assert!(status.contains("IPv4 forwarding is off"), "{status}");
    for (flag, fix) in [
        ("--advertise-routes=100.64.0.0/24", "tailnet"),
        ("--advertise-routes=10.9.0.0/16,10.9.1.0/24", "overlaps"),
        ("--advertise-routes=10.9.0.1/24", "write 10.9.0.0/24"),
        ("--netfilter-mode=maybe", "nodivert"),
    ] {
        let out = b.cli(&["set", flag]);
        assert!(!out.status.success(), "{flag} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(fix),
            "{flag}: {out:?}"
        );
    }
    let out = b.cli(&["set", "--exit-node=ta"]);
    assert!(!out.status.success(), "using and offering at once");
    wait(
        "ta sees tb offer an exit node",
        30,
        || a.logs(),
        || a.peer_entry("tb").filter(|p| p["exit_node_option"] == true),
    );
    // LAN access: c1's own LAN (10.1.0.0/24) leaves table 52 through a throw route.
    let c1 = lab.ns("c1");
    // `tern up` takes the routing flags too (applied once the node runs).
    tern_ok(&a, &["up", "--exit-node=tb"]);
    wait(
        "the LAN routed into the tunnel",
        20,
        || a.logs(),
        || {
            table_52(c1)
                .iter()
                .any(|r| r == "10.1.0.0/24")
                .then_some(())
        },
    );
    let via = text(c1, &["ip", "route", "get", "10.1.0.1"]);
    assert!(
        via.contains("dev tern0"),
        "without LAN access the LAN goes to the exit node: {via}"
    );
    // Stateful filtering: one conntrack drop before the TUN's final accept.
    tern_ok(&a, &["set", "--stateful-filtering"]);
    wait(
        "the stateful drop rule",
        10,
        || a.logs(),
        || {
            ts_iptables(c1)
                .iter()
                .any(|l| l.contains("-o tern0") && l.contains("ctstate") && l.ends_with("-j DROP"))
                .then_some(())
        },
    );
    tern_ok(&a, &["set", "--exit-node-allow-lan-access"]);
    wait(
        "a throw route for the LAN",
        20,
        || a.logs(),
        || {
            table_52(c1)
                .iter()
                .any(|r| r == "throw 10.1.0.0/24")
                .then_some(())
        },
    );
    let via = text(c1, &["ip", "route", "get", "10.1.0.1"]);
    assert!(
        via.contains("dev eth0"),
        "with LAN access the LAN is direct: {via}"
    );
    assert!(ping_once(c1, "10.1.0.1"));
    tern_ok(&a, &["set", "--exit-node="]);
    wait(
        "no default route after --exit-node=",
        20,
        || a.logs(),
        || {
            (!table_52(c1)
                .iter()
                .any(|r| r == "default" || r.starts_with("throw")))
            .then_some(())
        },
    );
}

/// `curl`'s HTTP status for `url` from `ns` (`000` when nothing answered).
fn http_code(ns: &Netns, url: &str) -> String {
    ns.exec_unchecked(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        url,
    ])
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default()
}

#[test]
fn subnet_router_forwards_under_the_filter_with_a_tsnet_node_in_the_tailnet() {
    let lan = tern_lab::topology::site_lan_host(2).to_string();
    let lan_net = tern_lab::topology::site_lan_net(2).to_string();
    let lab = Lab::start_with(
        |topo| topo.add_site_lan(2).expect("c2's LAN"),
        |config| {
            config.auto_approve_routes = true;
            // The tailnet may talk freely; of c2's LAN only port 8000 is open.
            config.filters = vec![tern_lab::control::config::FilterConfig {
                src: vec!["*".into()],
                dst: vec!["100.64.0.0/10:*".into(), format!("{lan_net}:8000")],
                proto: vec![],
            }];
        },
    );
    let lan_ns = lab.ns("lan2");
    let _open = tern_lab::spawn_whoami(lan_ns, format!("{lan}:8000").parse().unwrap())
        .expect("whoami :8000");
    let _closed = tern_lab::spawn_whoami(lan_ns, format!("{lan}:8001").parse().unwrap())
        .expect("whoami :8001");
    let (c1, c2) = (lab.ns("c1"), lab.ns("c2"));
    c2.sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding on c2");
    let (a, b, b_ip) = start_pair(&lab);
    let said = tern_ok(&b, &["set", &format!("--advertise-routes={lan_net}")]);
    assert!(!said.contains("Warning"), "{said}");
    wait(
        "ta sees tb's approved route",
        30,
        || a.logs(),
        || {
            a.peer_entry("tb")
                .filter(|p| p["subnet_routes"][0] == lan_net.as_str())
        },
    );

    // A Go node (Caddy/tsnet) in the same tailnet, proxying its loopback :8081 to the LAN host
    // and :8082 to tb's tailnet address.
    let proxy = |port: u16, to: &str| {
        format!(
            "http://127.0.0.1:{port} {{\n\treverse_proxy {{\n\t\tto http://{to}\n\t\ttransport tailscale tsc\n\t}}\n}}\n"
        )
    };
    let mut config = tern_lab::CaddyConfig::new(
        "tsc",
        &format!("http://{}:8080", tern_lab::topology::CONTROL_IP),
        lab_nodes::AUTH_KEY,
    );
    config.extra_sites = format!(
        "{}{}",
        proxy(8081, &format!("{lan}:8000")),
        proxy(8082, &format!("{b_ip}:8000"))
    );
    let tsc = tern_lab::CaddyNode::start(lab.ns("relay"), config).expect("start tsc");
    let b_addr: std::net::SocketAddr = format!("{b_ip}:8000").parse().unwrap();
    let (stop, server) = lab_nodes::serve_http(c2, b_addr, b"tb over the tailnet");
    let logs = || {
        format!(
            "{}\n{}\n== tsc\n{}",
            a.logs(),
            b.logs(),
            tail(&tsc.logs(), 60)
        )
    };
    wait("tsc reaches tb through the filter", 90, logs, || {
        curl_body(lab.ns("relay"), "http://127.0.0.1:8082/").filter(|b| b == "tb over the tailnet")
    });

    // Linux's default (Go's too, `DefaultRouteAll`): no subnet routes without --accept-routes.
    assert!(!table_52(c1).contains(&lan_net), "{:?}", table_52(c1));
    assert_eq!(http_code(c1, &format!("http://{lan}:8000/")), "000");
    tern_ok(&a, &["set", "--accept-routes"]);
    wait("the subnet route in table 52", 20, logs, || {
        table_52(c1).contains(&lan_net).then_some(())
    });
    let seen = wait("ta reaches the LAN host through tb", 30, logs, || {
        whoami(c1, &lan, 8000)
    });
    // Forwarded by c2 and masqueraded to its LAN address.
    assert_eq!(seen, tern_lab::topology::site_lan_gateway(2).to_string());
    // The filter from control decides what tb forwards: :8001 is not in it.
    let filtered = |n: &Node| {
        n.status()["data_plane"]["drops"]["filtered"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = filtered(&b);
    assert_eq!(
        http_code(c1, &format!("http://{lan}:8001/")),
        "000",
        "{}",
        logs()
    );
    assert!(
        filtered(&b) > before,
        "tb's filter dropped the SYNs to :8001\n{}",
        logs()
    );
    // The Go node does not install the route by default on Linux (RouteAll is false), so its
    // request to the LAN host does not go through the tailnet; tsnet's traffic to tb still does.
    assert_ne!(http_code(lab.ns("relay"), "http://127.0.0.1:8081/"), "200");
    assert_eq!(
        curl_body(lab.ns("relay"), "http://127.0.0.1:8082/").as_deref(),
        Some("tb over the tailnet")
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
}

fn curl_body(ns: &Netns, url: &str) -> Option<String> {
    lab_nodes::curl(ns, "GET", url).map(|b| String::from_utf8_lossy(&b).trim().to_string())
}

#[test]
fn nftables_kind_when_asked_for() {
    let lab = Lab::start();
    let c1 = lab.ns("c1");
    let env = [("TS_DEBUG_FIREWALL_MODE", std::path::Path::new("nftables"))];
    let mut a = Node::start_with_env(c1, lab.dir.path(), "ta", &env);
    a.wait_for_api(20);
    a.up("ta");
    let ts_rules = || {
        let ruleset = json(c1, &["nft", "-j", "list", "ruleset"]);
        ruleset["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| {
                o["rule"]["chain"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("ts-"))
            })
            .count()
    };
    wait(
        "tern's nft rules",
        20,
        || a.logs(),
        || (ts_rules() >= 8).then_some(()),
    );
    let status = a.status();
    assert_eq!(
        status["routing"]["netfilter_kind"], "nftables",
        "{}",
        status["routing"]
    );
    let listing = text(c1, &["nft", "list", "chain", "ip", "filter", "ts-input"]);
    assert!(
        listing.contains("iifname != \"tern0\" ip saddr 100.64.0.0/10 counter"),
        "{listing}"
    );
    // nft's changes are always announced: the unprompted look is the rare one.
    wait(
        "30 s between unprompted looks",
        10,
        || a.logs(),
        || (a.status()["routing"]["host_poll_secs"] == 30).then_some(()),
    );
    a.process.stop().expect("stop ta");
    assert_eq!(ts_rules(), 0, "{}", text(c1, &["nft", "list", "ruleset"]));
    assert!(our_rules(c1).is_empty());
}

/// The demo of the README: `tern lab up --exit-node` has c1 browse through c2.
#[test]
fn lab_up_exit_node_sends_c1_through_c2() {
    let lab = support::lab_cli::LabCli::up(&["--exit-node"]);
    let c1 = lab.ns("c1");
    let seen = whoami(&c1, &tern_lab::topology::INTERNET_IP.to_string(), 80);
    assert_eq!(
        seen.as_deref(),
        Some("198.18.2.2"),
        "the internet host sees c2's side"
    );
    let status = lab.tern(&[
        "--socket",
        &lab.socket("c1").display().to_string(),
        "status",
    ]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("# Exit node: c2."), "{text}");
}
