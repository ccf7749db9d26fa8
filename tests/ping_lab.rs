//! `tern ping` and `tern netcheck` between the two tern nodes of a real lab (`tern lab up`):
//! the exit codes scripts rely on (0 direct, 3 DERP only, 4 no reply) and the tailscale-style
//! lines, over real NAT boxes, DERP and UDP. The lab is torn down even when a test panics.

mod support;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::lab_cli::LabCli;
use support::output_text as text;
use support::wait_for;
use tern_lab::{CaddyConfig, CaddyNode};

/// The lab of `tern lab up` (torn down on Drop), and c1's CLI.
struct Lab(LabCli);

impl Lab {
    fn up(nat1: &str, nat2: &str) -> Lab {
        Lab::up_with(&["--nat1", nat1, "--nat2", nat2])
    }

    /// `tern lab up ARGS`.
    fn up_with(args: &[&str]) -> Lab {
        Lab(LabCli::up(args))
    }

    fn tern(&self, args: &[&str]) -> Output {
        self.0.tern(args)
    }

    /// `tern --socket <c1's> ARGS`, from the root namespace.
    fn c1(&self, args: &[&str]) -> Output {
        let socket = self.0.socket("c1");
        let mut full = vec!["--socket", socket.to_str().expect("UTF-8 socket path")];
        full.extend_from_slice(args);
        self.tern(&full)
    }

    /// c1's status entry of the peer `hostname` once `want` holds for it.
    fn c1_peer(&self, hostname: &str, want: impl Fn(&Value) -> bool) -> Option<Value> {
        let out = self.c1(&["status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).ok()?;
        status["peers"]
            .as_array()?
            .iter()
            .find(|p| p["hostname"] == hostname && want(p))
            .cloned()
    }

    /// c2's first tailnet IP as c1 sees it (addresses go in registration order, which varies).
    fn c2_ip(&self) -> String {
        self.c1_peer("c2", |_| true)
            .and_then(|p| p["tailnet_ips"][0].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("c1 does not list c2: {}", text(&self.c1(&["status"]))))
    }

    fn pid_of(&self, process: &str) -> i32 {
        let out = self.tern(&["lab", "status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let status: Value = serde_json::from_slice(&out.stdout).expect("lab status JSON");
        status["processes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == process))
            .and_then(|p| p["pid"].as_i64())
            .and_then(|pid| i32::try_from(pid).ok())
            .unwrap_or_else(|| panic!("no process {process} in {status}"))
    }
}

/// A peer entry's tailnet IPv6 address.
fn tailnet_ipv6(peer: &Value) -> String {
    peer["tailnet_ips"]
        .as_array()
        .and_then(|ips| {
            ips.iter()
                .filter_map(Value::as_str)
                .find(|ip| ip.contains(':'))
        })
        .unwrap_or_else(|| panic!("no tailnet IPv6 in {peer:#}"))
        .to_string()
}

/// Caddy/tsnet in c2 (beside tern's c2), stopped on Drop.
fn start_caddy_in_c2(lab: &Lab, config: CaddyConfig) -> CaddyNode {
    CaddyNode::start(&lab.0.ns("c2"), config).unwrap_or_else(|err| panic!("starting caddy: {err}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ping_exits_0_once_direct_and_4_when_the_peer_is_gone() {
    let lab = Lab::up("easy", "easy");
    let ip = lab.c2_ip();
    // First contact goes over DERP; the CLI ping starts discovery, and an easy NAT on both
    // sides gives a direct path well within 20 pings.
    let out = lab.c1(&["ping", "-c", "20", "c2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = stdout(&out);
    let last = lines.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("pong from c2 ({ip}) via 198.18.2.2:41641 in ")),
        "ends on the direct pong through nat2's WAN address: {lines}"
    );
    for line in lines.lines() {
        assert!(
            line.starts_with(&format!("pong from c2 ({ip}) via ")),
            "{line}"
        );
    }

    // --json: one PingResult per line; the path is now direct from the first ping.
    let out = lab.c1(&["ping", "--json", "-c", "1", &ip]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let result: Value = serde_json::from_str(stdout(&out).trim()).expect("PingResult JSON");
    assert_eq!(result["node_name"], "c2");
    assert_eq!(result["node_ip"], ip.as_str());
    assert_eq!(result["path"], "direct");
    assert_eq!(result["endpoint"], "198.18.2.2:41641");
    assert!(result["latency_ms"].as_f64().is_some(), "{result}");

    // The status snapshot is refreshed every second; it shows the direct path soon.
    wait_for(
        "`tern status` to show c2 direct",
        Duration::from_secs(10),
        || text(&lab.c1(&["status"])),
        || {
            stdout(&lab.c1(&["status"]))
                .contains("c2  linux  online; direct 198.18.2.2:41641")
                .then_some(())
        },
    );

    let out = lab.c1(&["netcheck"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = stdout(&out);
    for needle in [
        "\t* UDP: true\n",
        "\t* IPv4: yes, 198.18.1.2:",
        "\t* MappingVariesByDestIP: false\n",
        "\t* Nearest DERP: Lab DERP\n",
        "\t\t- lab: ",
        "(local)\n",
    ] {
        assert!(
            report.contains(needle),
            "netcheck lacks {needle:?}: {report}"
        );
    }
    let out = lab.c1(&["netcheck", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("netcheck JSON");
    assert_eq!(json["udp"], true);
    assert_eq!(json["preferred_derp"], 900);

    // c2's daemon stops: nothing answers any more.
    let pid = nix::unistd::Pid::from_raw(lab.pid_of("tern:c2"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill c2's daemon");
    let out = lab.c1(&["ping", "-c", "2", "--timeout", "1s", "c2"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert_eq!(stdout(&out), format!("ping \"{ip}\" timed out\n").repeat(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "no reply\n");
}

#[test]
fn ping_exits_3_when_only_derp_answers() {
    let lab = Lab::up("udpblock", "easy");
    let ip = lab.c2_ip();
    let out = lab.c1(&["ping", "-c", "3", "c2"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lines = stdout(&out);
    assert_eq!(lines.lines().count(), 3, "{lines}");
    for line in lines.lines() {
        assert!(
            line.starts_with(&format!("pong from c2 ({ip}) via DERP(lab) in ")),
            "{line}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "direct connection not established\n"
    );
    // Without --until-direct the verdict is the same, but no complaint.
    let out = lab.c1(&["ping", "-c", "1", "--until-direct=false", "c2"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(out.stderr.is_empty(), "{}", text(&out));

    let out = lab.c1(&["netcheck"]);
    let report = stdout(&out);
    assert!(report.contains("\t* UDP: false\n"), "{report}");
    assert!(report.contains("\t* IPv4: (no addr found)\n"), "{report}");
}

/// tern in c1 pings the real Tailscale node (Caddy + tsnet v1.90.9) that runs in c2 behind an
/// easy NAT: the pong names it, comes back direct through nat2's WAN address, exit 0.
#[test]
fn ping_reaches_a_real_tailscale_node_directly() {
    let lab = Lab::up("easy", "easy");
    let mut config = CaddyConfig::new("tsnet-a", "http://10.99.0.20:8080", &lab.0.auth_key());
    config.debug = true;
    let caddy = start_caddy_in_c2(&lab, config);
    let logs = || format!("== tsnet-a\n{}", caddy.logs());

    let peer = wait_for(
        "c1 to see tsnet-a online",
        Duration::from_secs(90),
        logs,
        || {
            lab.c1_peer("tsnet-a", |p| {
                p["online"] == true && p["disco_key"].is_string()
            })
        },
    );
    let ip = peer["tailnet_ips"][0]
        .as_str()
        .expect("tsnet-a's IPv4")
        .to_string();

    if peer["endpoints"].as_array().is_none_or(|e| e.is_empty()) {
        // tsnet sometimes reports its endpoints to control and then, a moment later, an empty
        // list (two engine status reports racing inside Go), and a disco-only ping gives it no
        // reason to report again. Both NATs filter by address, so neither side can then reach
        // the other until tsnet sends its own CallMeMaybe, which it does once it has traffic
        // for us: a request through the tunnel gives it some.
        let site = format!("http://{ip}/");
        let c1 = lab.0.ns("c1");
        wait_for(
            "Caddy's site through c1's TUN",
            Duration::from_secs(30),
            logs,
            || {
                let out = c1
                    .exec_unchecked(&["curl", "-sS", "--max-time", "5", &site])
                    .ok()?;
                out.status.success().then_some(())
            },
        );
    }
    let out = lab.c1(&["ping", "-c", "20", "tsnet-a"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n== c1 status\n{}\n{}",
        text(&out),
        text(&lab.c1(&["status"])),
        logs()
    );
    let lines = stdout(&out);
    eprintln!("tern ping tsnet-a:\n{lines}");
    let last = lines.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("pong from tsnet-a ({ip}) via 198.18.2.2:")),
        "ends on a direct pong through nat2's WAN address: {lines}"
    );
    // Its tailnet IP names it too, and the path is direct from now on.
    let out = lab.c1(&["ping", "--json", "-c", "1", &ip]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let result: Value = serde_json::from_str(stdout(&out).trim()).expect("PingResult JSON");
    assert_eq!(result["node_name"], "tsnet-a");
    assert_eq!(result["path"], "direct");
    drop(caddy);
}

/// A dual-stack lab (`tern lab up --ipv6`: global IPv6 without NAT behind each NAT box's
/// firewall) where c1's IPv4 NAT is hard, as on a mobile network with CGNAT: IPv4 cannot go
/// direct (see the NAT matrix), IPv6 can. netcheck finds both, the path to c2 is direct over
/// IPv6, tailnet IPv6 crosses both TUNs, and the real Tailscale node publishes IPv6 endpoints
/// (its netcheck used our DERP's IPv6 STUN), goes direct over IPv6 too and serves Caddy's site on
/// its tailnet IPv6 address.
#[test]
fn dual_stack_lab_goes_direct_over_ipv6_past_a_hard_ipv4_nat() {
    let lab = Lab::up_with(&["--ipv6", "--nat1", "hard", "--nat2", "easy"]);
    let out = lab.c1(&["netcheck"]);
    let report = stdout(&out);
    for needle in [
        "\t* IPv4: yes, 198.18.1.2:",
        "\t* IPv6: yes, [2001:db8:1:1::2]:41641\n",
        "\t* MappingVariesByDestIP: true\n",
    ] {
        assert!(
            report.contains(needle),
            "netcheck lacks {needle:?}: {report}"
        );
    }

    let out = lab.c1(&["ping", "-c", "20", "c2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = stdout(&out);
    assert!(
        lines
            .lines()
            .last()
            .unwrap_or_default()
            .contains(" via [2001:db8:2:1::2]:41641 in "),
        "ends on a direct IPv6 pong: {lines}"
    );
    let c2 = lab
        .c1_peer("c2", |_| true)
        .unwrap_or_else(|| panic!("c1 does not list c2: {}", text(&lab.c1(&["status"]))));
    assert_eq!(c2["path"], "direct", "{c2:#}");
    assert_eq!(c2["endpoint"], "[2001:db8:2:1::2]:41641", "{c2:#}");
    let c2_v6 = tailnet_ipv6(&c2);
    let c1 = lab.0.ns("c1");
    let ping6 = c1
        .exec_unchecked(&["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", &c2_v6])
        .expect("run ping");
    assert!(
        ping6.status.success(),
        "ping {c2_v6} through both TUNs: {}",
        text(&ping6)
    );

    // The real Tailscale node in c2 beside tern's c2.
    let mut config = CaddyConfig::new("tsnet-b", "http://10.99.0.20:8080", &lab.0.auth_key());
    config.site_body = "respond \"hello over IPv6\"".into();
    let caddy = start_caddy_in_c2(&lab, config);
    let logs = || format!("== tsnet-b\n{}", caddy.logs());
    let peer = wait_for(
        "c1 to see tsnet-b with an IPv6 endpoint",
        Duration::from_secs(90),
        logs,
        || {
            lab.c1_peer("tsnet-b", |p| {
                p["endpoints"].as_array().is_some_and(|eps| {
                    eps.iter()
                        .filter_map(Value::as_str)
                        .any(|e| e.starts_with("[2001:db8:2:1::2]:"))
                })
            })
        },
    );
    let out = lab.c1(&["ping", "-c", "20", "tsnet-b"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out), logs());
    let lines = stdout(&out);
    assert!(
        lines
            .lines()
            .last()
            .unwrap_or_default()
            .contains(" via [2001:db8:2:1::2]:"),
        "ends on a direct IPv6 pong: {lines}"
    );
    let ts_v6 = tailnet_ipv6(&peer);
    let url = format!("http://[{ts_v6}]/");
    let curl = c1
        .exec_unchecked(&["curl", "-sS", "--max-time", "20", &url])
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "hello over IPv6",
        "curl {url}: {}\n{}",
        text(&curl),
        logs()
    );
    drop(caddy);
}

/// Bad input on the data plane's UDP port, sent from inside c1's namespace to the daemon's
/// socket: disco from an unknown key, disco that claims c2's key with a box that does not open,
/// a truncated disco header, a STUN response nobody asked for and random bytes. Each is counted
/// in `data_plane.drops` by its cause, and the node keeps working (the direct path to c2 stays).
#[test]
fn malformed_disco_and_stun_are_counted_and_dropped() {
    use tern::disco::{self, Message, Ping, TxId};
    use tern::keys::{DiscoPrivate, DiscoPublic};

    let lab = Lab::up("easy", "easy");
    let out = lab.c1(&["ping", "-c", "20", "c2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status = |lab: &Lab| -> Value {
        serde_json::from_slice(&lab.c1(&["status", "--json"]).stdout).expect("status JSON")
    };
    let s = status(&lab);
    let ours: DiscoPublic = s["self"]["disco_key"].as_str().unwrap().parse().unwrap();
    let c2_key: DiscoPublic = s["peers"][0]["disco_key"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let ping = Message::Ping(Ping {
        tx_id: TxId([3; 12]),
        node_key: None,
        padding: 0,
    });
    let stranger = disco::seal(&DiscoPrivate::generate(), &ours, &ping);
    // c2's disco key as sender, sealed by somebody else: the box does not open.
    let mut forged = disco::seal(&DiscoPrivate::generate(), &ours, &ping);
    forged[disco::MAGIC.len()..disco::CLASSIFY_LEN].copy_from_slice(c2_key.as_bytes());
    let truncated = forged[..disco::CLASSIFY_LEN + 10].to_vec();
    let stun_stray = tern::stun::response(
        tern::stun::TxId([9; 12]),
        "198.18.1.2:41641".parse().unwrap(),
    );
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();

    let c1 = lab.0.ns("c1");
    let sent = c1
        .run_in(move || {
            let send_all = || -> std::io::Result<()> {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
                for datagram in [&stranger, &forged, &truncated, &stun_stray, &garbage] {
                    socket.send_to(datagram, "127.0.0.1:41641")?;
                }
                Ok(())
            };
            Ok(send_all())
        })
        .expect("enter c1's namespace");
    sent.expect("send bad datagrams in c1");
    // A netcheck round now: it counts the stray STUN response that waited for it.
    let out = lab.c1(&["netcheck"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let drops = wait_for(
        "the drops to be counted",
        Duration::from_secs(10),
        || status(&lab).to_string(),
        || {
            let drops = status(&lab)["data_plane"]["drops"].clone();
            let counted = [
                "disco_unknown_sender",
                "disco_bad_box",
                "disco_not_disco",
                "stun_unmatched",
                "udp_unknown_peer",
            ]
            .iter()
            .all(|k| drops[*k].as_u64().is_some_and(|n| n >= 1));
            counted.then_some(drops)
        },
    );
    eprintln!("drops: {drops}");
    // Still alive and still direct.
    let out = lab.c1(&["ping", "-c", "1", "c2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
