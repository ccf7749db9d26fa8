//! Direct paths end to end (issue 5): two `tern daemon`s (kernel TUN `tern0`) in c1 and c2 behind
//! lab NATs, the lab control server, `tern derp` on the relay host (node 900a: DERP + STUN) and a
//! STUN-only node 900b on the relay's second address, so netcheck sees two STUN destinations and
//! can tell a hard NAT.
//!
//! * NAT matrix: the pairs that can punch reach `path == "direct"` within 5 s of traffic, and
//!   traffic keeps flowing with DERP blocked; the others stay on DERP, traffic flows, and
//!   `path_reason` names the cause.
//! * Interop with Caddy/tsnet (tailscale.com v1.90.9): direct in easy×easy, DERP in hard×hard.
//! * Rebinding (tern↔tern, and tern↔tsnet): a running TCP stream survives a conntrack flush and
//!   a NAT mode switch, going direct → DERP → direct by itself.
//! * `tern ping` exit codes: 0 direct, 3 DERP only, 4 no answer.
//!
//! Discovery starts on outgoing traffic (as in Go), so every test pings through the TUN before it
//! expects a direct path.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lab_nodes::{
    ping_once, serve_http, start_control_two_stun, start_derp, start_stun_only, tail, wait,
    wait_for, Node, AUTH_KEY, DERP_REGION,
};
use lab_server::LabServer;
use serde_json::Value;
use support::{output_text, require_root};
use tern_lab::topology::CONTROL_IP;
use tern_lab::{CaddyConfig, CaddyNode, NatMode, Netns, Process, Topology};

/// The bound for a direct path after traffic starts (a bounded wait, not a benchmark).
const DIRECT_WITHIN: Duration = Duration::from_secs(5);
/// The DERP port of `tern derp` in the lab.
const DERP_PORT: u16 = 8443;

/// One lab: topology, DERP (900a) and STUN-only (900b) servers, the control server. Fields drop
/// in order, so the servers stop before the namespaces go.
struct Lab {
    control: LabServer,
    derp: Process,
    stun: Process,
    dir: tempfile::TempDir,
    topo: Topology,
}

impl Lab {
    fn start(nat1: NatMode, nat2: NatMode) -> Lab {
        require_root();
        let topo = Topology::standard_unique(nat1, nat2).expect("build lab");
        let derp = start_derp(&topo);
        let stun = start_stun_only(&topo);
        let dir = tempfile::tempdir().expect("temp dir");
        let control = start_control_two_stun(&topo, dir.path());
        Lab {
            control,
            derp,
            stun,
            dir,
            topo,
        }
    }

    fn ns(&self, name: &str) -> &Netns {
        self.topo.ns(name).expect("lab namespace")
    }

    /// The address peers reach `cN` at from outside: its NAT's WAN address when the NAT
    /// translates, else its own.
    fn public_ip(&self, client: &str) -> Ipv4Addr {
        let site = self.topo.site(client).expect("site");
        if site.mode.translates() {
            site.wan_ip
        } else {
            site.client_ip
        }
    }

    /// Switch `natN` to `mode` now (nftables replaced, conntrack flushed).
    fn set_nat(&self, nat: &str, mode: NatMode) {
        let client = self.topo.site(nat).expect("site").client_ip;
        tern_lab::nat::apply(self.ns(nat), mode, client).expect("switch NAT mode");
    }

    /// Drop all DERP traffic on the relay host (both directions), so only direct UDP can carry
    /// packets. STUN keeps working.
    fn block_derp(&self) {
        let rules = format!(
            "table inet derpblock {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp dport {DERP_PORT} drop\n  }}\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    tcp sport {DERP_PORT} drop\n  }}\n}}\n"
        );
        self.ns("relay").nft_apply(&rules).expect("block DERP");
    }

    fn unblock_derp(&self) {
        self.ns("relay")
            .nft_apply("delete table inet derpblock\n")
            .expect("unblock DERP");
    }

    /// What `hostname` last told control about its NAT (`NetInfo.MappingVariesByDestIP`).
    fn reported_hard_nat(&self, hostname: &str) -> Option<bool> {
        self.control
            .handle
            .nodes()
            .iter()
            .find(|n| n.hostname() == Some(hostname))?
            .hostinfo["NetInfo"]["MappingVariesByDestIP"]
            .as_bool()
    }

    fn server_logs(&self) -> String {
        format!(
            "== derp 900a\n{}\n== stun 900b\n{}",
            tail(&self.derp.output(), 30),
            tail(&self.stun.output(), 10)
        )
    }
}

/// Two tern nodes, `ta` in c1 and `tb` in c2, up and seeing each other with home DERP 900.
struct Pair {
    a: Node,
    b: Node,
    a_ip: String,
    b_ip: String,
}

impl Pair {
    fn start(lab: &Lab) -> Pair {
        let a = Node::start(lab.ns("c1"), lab.dir.path(), "ta");
        let b = Node::start(lab.ns("c2"), lab.dir.path(), "tb");
        a.wait_for_api(20);
        b.wait_for_api(20);
        a.up("ta");
        b.up("tb");
        let logs = || format!("{}\n{}\n{}", a.logs(), b.logs(), lab.server_logs());
        let peer_b = wait("ta to see tb with home DERP 900", 60, logs, || a.peer("tb"));
        let peer_a = wait("tb to see ta with home DERP 900", 60, logs, || b.peer("ta"));
        let ip = |p: &Value| {
            p["tailnet_ips"][0]
                .as_str()
                .expect("tailnet IP")
                .to_string()
        };
        let (a_ip, b_ip) = (ip(&peer_a), ip(&peer_b));
        Pair { a, b, a_ip, b_ip }
    }

    /// Both statuses in full and both daemons' logs, for failure messages.
    fn report(&self, lab: &Lab) -> String {
        format!(
            "== ta status\n{:#}\n== tb status\n{:#}\n{}\n{}\n{}",
            self.a.status(),
            self.b.status(),
            self.a.logs(),
            self.b.logs(),
            lab.server_logs()
        )
    }

    /// (ta's entry for tb, tb's entry for ta).
    fn entries(&self) -> (Value, Value) {
        (
            self.a.peer_entry("tb").unwrap_or_default(),
            self.b.peer_entry("ta").unwrap_or_default(),
        )
    }

    /// Wait until each side's netmap lists an endpoint of the other on its public address (the
    /// STUN-mapped or, without NAT, the interface address), so direct paths are possible.
    fn wait_for_public_endpoints(&self, lab: &Lab) {
        let (pa, pb) = (lab.public_ip("c1"), lab.public_ip("c2"));
        wait(
            &format!("each side to know the other's public endpoint (ta {pa}, tb {pb})"),
            30,
            || self.report(lab),
            || {
                let (b_seen_by_a, a_seen_by_b) = self.entries();
                (has_endpoint_on(&b_seen_by_a, pb) && has_endpoint_on(&a_seen_by_b, pa))
                    .then_some(())
            },
        );
    }

    /// Ping ta → tb (and back) once through the TUNs, with a bounded wait for the first packet
    /// (it waits for the WireGuard handshake).
    fn wait_for_ping(&self, lab: &Lab, secs: u64) {
        let (c1, c2) = (lab.ns("c1"), lab.ns("c2"));
        wait(
            "ping ta → tb through the TUN",
            secs,
            || self.report(lab),
            || ping_once(c1, &self.b_ip).then_some(()),
        );
        wait(
            "ping tb → ta through the TUN",
            secs,
            || self.report(lab),
            || ping_once(c2, &self.a_ip).then_some(()),
        );
    }
}

fn has_endpoint_on(peer: &Value, ip: Ipv4Addr) -> bool {
    peer["endpoints"].as_array().is_some_and(|eps| {
        eps.iter()
            .filter_map(Value::as_str)
            .filter_map(|e| e.parse::<SocketAddr>().ok())
            .any(|e| e.ip() == ip)
    })
}

/// The peer entry is on a direct path with an endpoint.
fn is_direct(peer: &Value) -> bool {
    peer["path"] == "direct" && peer["endpoint"].is_string()
}

fn endpoint_ip(peer: &Value) -> Option<std::net::IpAddr> {
    peer["endpoint"]
        .as_str()?
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip())
}

/// The line of human `tern status` on `node` about the peer with tailnet address `ip`.
fn human_status_line(node: &Node, ip: &str) -> String {
    let out = node.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(ip))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no line for {ip} in `tern status`: {}", output_text(&out)))
}

/// Paths in `path_history`, oldest first.
fn history_paths(peer: &Value) -> Vec<String> {
    peer["path_history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|e| e["path"].as_str().unwrap_or("null").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Continuous pings through the TUN (5 a second) until dropped: the outgoing traffic that makes
/// a node probe its peer.
fn background_ping(ns: &Netns, ip: &str) -> Process {
    Process::spawn(ns, "ping", "ping", &["-i", "0.2", "-W", "1", ip]).expect("start ping")
}

/// 1 MiB of a fixed pattern, served over HTTP in the tests.
fn blob() -> &'static [u8] {
    static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
    BLOB.get_or_init(|| (0..1u32 << 20).map(|i| (i % 251) as u8).collect())
}

/// `curl` `url` from `ns`; Ok when the body is exactly `want`.
fn fetch(ns: &Netns, url: &str, want: &[u8]) -> Result<(), String> {
    let out = ns
        .exec_unchecked(&["curl", "-sS", "--max-time", "30", url])
        .map_err(|e| e.to_string())?;
    if out.status.success() && out.stdout == want {
        Ok(())
    } else {
        Err(format!(
            "curl {url}: got {} of {} bytes ({}): {}",
            out.stdout.len(),
            want.len(),
            if out.stdout.len() == want.len() {
                "corrupted"
            } else {
                "short"
            },
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// 1 MiB over HTTP from tb's tailnet address to ta, and the other way, byte for byte; both
/// daemons run with TUN offloads (the default), so the senders read TCP super-packets from their
/// TUN and the receivers write coalesced ones.
fn tcp_both_ways(lab: &Lab, pair: &Pair) {
    download_both_ways(lab, pair, blob());
    for node in [&pair.a, &pair.b] {
        assert_offloads_used(node, Offloads::Both, &pair.report(lab));
    }
}

/// `body` over HTTP from tb's tailnet address to ta, then from ta's to tb, byte for byte.
fn download_both_ways(lab: &Lab, pair: &Pair, body: &'static [u8]) {
    for (server_ns, server_ip, client_ns) in [("c2", &pair.b_ip, "c1"), ("c1", &pair.a_ip, "c2")] {
        let addr = SocketAddr::new(server_ip.parse().expect("tailnet IP"), 8000);
        let (stop, thread) = serve_http(lab.ns(server_ns), addr, body);
        let got = fetch(lab.ns(client_ns), &format!("http://{addr}/"), body);
        stop.store(true, Ordering::Relaxed);
        let _ = thread.join();
        if let Err(e) = got {
            panic!(
                "{} bytes {server_ns} → {client_ns}: {e}\n{}",
                body.len(),
                pair.report(lab)
            );
        }
    }
}

/// Which side of TUN offloads a node must have used.
#[derive(Clone, Copy, PartialEq)]
enum Offloads {
    /// Wrote coalesced super-packets (it received bulk TCP).
    Written,
    /// That, and split super-packets it read (it sent bulk TCP too).
    Both,
}

/// The node's TUN split super-packets it read and/or wrote coalesced ones, and refused no frame
/// (waits for the next status publish).
fn assert_offloads_used(node: &Node, side: Offloads, report: &str) {
    let used = || {
        let counters = node.status()["data_plane"]["tun_offload"].clone();
        let count = |name: &str| counters[name].as_u64().unwrap_or(0);
        let read = count("super_packets_read") > 0
            && count("segments_split") > count("super_packets_read");
        let written =
            count("super_packets_written") > 0 && count("tun_writes") < count("packets_to_tun");
        let ok = match side {
            Offloads::Written => written,
            Offloads::Both => read && written,
        };
        (ok && count("frames_refused") == 0).then_some(())
    };
    wait(
        &format!("{}'s TUN offloads to have been used", node.name),
        10,
        || report.to_string(),
        used,
    );
}

/// Three pings each way through the TUNs must all pass.
fn pings_both_ways(lab: &Lab, pair: &Pair) {
    for (ns, ip) in [("c1", &pair.b_ip), ("c2", &pair.a_ip)] {
        let out = lab
            .ns(ns)
            .exec_unchecked(&["ping", "-c", "3", "-i", "0.2", "-W", "2", ip])
            .expect("run ping");
        assert!(
            out.status.success(),
            "ping {ns} → {ip}: {}\n{}",
            output_text(&out),
            pair.report(lab)
        );
    }
}

/// A NAT pair that must go direct: within [`DIRECT_WITHIN`] of traffic both sides show `direct`
/// with the other's public address, and with DERP blocked pings and TCP still pass.
fn assert_goes_direct(nat1: NatMode, nat2: NatMode) {
    let lab = Lab::start(nat1, nat2);
    let pair = Pair::start(&lab);
    pair.wait_for_public_endpoints(&lab);

    let started = Instant::now();
    let _traffic = background_ping(lab.ns("c1"), &pair.b_ip);
    let mut a_direct_at = None;
    let mut b_direct_at = None;
    wait_for(
        &format!("{nat1}×{nat2}: both sides on a direct path"),
        DIRECT_WITHIN,
        || pair.report(&lab),
        || {
            let (pa, pb) = pair.entries();
            if a_direct_at.is_none() && is_direct(&pa) {
                a_direct_at = Some(started.elapsed());
            }
            if b_direct_at.is_none() && is_direct(&pb) {
                b_direct_at = Some(started.elapsed());
            }
            (is_direct(&pa) && is_direct(&pb)).then_some(())
        },
    );
    eprintln!(
        "{nat1}×{nat2}: direct after traffic start: ta {:?}, tb {:?}",
        a_direct_at.unwrap_or_default(),
        b_direct_at.unwrap_or_default()
    );

    let (pa, pb) = pair.entries();
    assert_eq!(
        endpoint_ip(&pa),
        Some(lab.public_ip("c2").into()),
        "ta's endpoint for tb must be tb's public address\n{}",
        pair.report(&lab)
    );
    assert_eq!(
        endpoint_ip(&pb),
        Some(lab.public_ip("c1").into()),
        "tb's endpoint for ta must be ta's public address\n{}",
        pair.report(&lab)
    );

    // Only the direct path can carry packets now.
    lab.block_derp();
    pings_both_ways(&lab, &pair);
    tcp_both_ways(&lab, &pair);
    lab.unblock_derp();

    let (pa, pb) = pair.entries();
    for (who, p) in [("ta → tb", &pa), ("tb → ta", &pb)] {
        assert!(
            is_direct(p)
                && p["path_reason"] == "direct"
                && p["latency_ms"].is_number()
                && p["last_pong_at"].is_string()
                && history_paths(p).iter().any(|h| h == "direct"),
            "{who}: after the transfer the entry must still be direct, with reason, latency, \
             last pong and history: {p:#}\n{}",
            pair.report(&lab)
        );
    }
    eprintln!(
        "{nat1}×{nat2}: ta sees tb at {} ({} ms), tb sees ta at {} ({} ms)",
        pa["endpoint"], pa["latency_ms"], pb["endpoint"], pb["latency_ms"]
    );
    let line = human_status_line(&pair.a, &pair.b_ip);
    let want = format!("direct {}", pa["endpoint"].as_str().unwrap_or_default());
    assert!(
        line.contains(&want),
        "`tern status` on ta: {line:?} lacks {want:?}"
    );
    assert_netcheck(&lab, &pair.a, "c1", nat1);
    assert_netcheck(&lab, &pair.b, "c2", nat2);
}

/// The node's netcheck report (top-level `netcheck` in status) matches its NAT.
fn assert_netcheck(lab: &Lab, node: &Node, client: &str, mode: NatMode) {
    let report = wait(
        &format!("{}'s netcheck report in status", node.name),
        30,
        || node.logs(),
        || {
            let n = node.status()["netcheck"].clone();
            n.is_object().then_some(n)
        },
    );
    let udp = mode != NatMode::Udpblock;
    assert_eq!(
        report["udp"], udp,
        "{} ({mode}) netcheck: {report:#}",
        node.name
    );
    if !udp {
        return;
    }
    let public = lab.public_ip(client);
    let global = report["global_v4"]
        .as_str()
        .and_then(|s| s.parse::<SocketAddr>().ok());
    assert_eq!(
        global.map(|a| a.ip()),
        Some(public.into()),
        "{} ({mode}) netcheck global_v4 must be on {public}: {report:#}",
        node.name
    );
    assert_eq!(
        report["mapping_varies_by_dest_ip"],
        mode == NatMode::Hard,
        "{} ({mode}) netcheck mapping_varies_by_dest_ip (two STUN servers in region 900): \
         {report:#}",
        node.name
    );
    assert_eq!(report["preferred_derp"], DERP_REGION, "{report:#}");
}

/// The `path_reason` code that names why `own` (facing `peer`) cannot go direct. Both nodes
/// report their netcheck to control (NetInfo), so each knows whether the other's NAT is hard.
fn derp_reasons(own: NatMode, peer: NatMode) -> &'static [&'static str] {
    match (own, peer) {
        (NatMode::Udpblock, _) => &["udp-blocked"],
        (NatMode::Hard, NatMode::Hard) => &["both-hard-nat"],
        (NatMode::Hard, _) => &["local-hard-nat"],
        (_, NatMode::Hard) => &["peer-hard-nat"],
        (_, NatMode::Udpblock) => &["peer-udp-blocked"],
        _ => &["no-pong-from-candidates"],
    }
}

/// A NAT pair that cannot punch: traffic flows over DERP (region 900), neither side ever shows a
/// direct path, and each side's `path_reason` names the cause.
fn assert_stays_on_derp(nat1: NatMode, nat2: NatMode) {
    let lab = Lab::start(nat1, nat2);
    let pair = Pair::start(&lab);
    let _traffic = background_ping(lab.ns("c1"), &pair.b_ip);
    pair.wait_for_ping(&lab, 30);

    let (want_a, want_b) = (derp_reasons(nat1, nat2), derp_reasons(nat2, nat1));
    let started = Instant::now();
    wait(
        &format!("{nat1}×{nat2}: path reasons ta ∈ {want_a:?}, tb ∈ {want_b:?}"),
        60,
        || pair.report(&lab),
        || {
            let (pa, pb) = pair.entries();
            for (who, p) in [("ta → tb", &pa), ("tb → ta", &pb)] {
                assert!(
                    !is_direct(p),
                    "{nat1}×{nat2}: {who} went direct, but these NATs cannot punch\n{}",
                    pair.report(&lab)
                );
            }
            let a_ok = want_a.contains(&pa["path_reason"].as_str().unwrap_or(""));
            let b_ok = want_b.contains(&pb["path_reason"].as_str().unwrap_or(""));
            (a_ok && b_ok).then_some(())
        },
    );
    eprintln!(
        "{nat1}×{nat2}: reasons settled after {:?}",
        started.elapsed()
    );

    pings_both_ways(&lab, &pair);
    tcp_both_ways(&lab, &pair);
    let (pa, pb) = pair.entries();
    for (who, p) in [("ta → tb", &pa), ("tb → ta", &pb)] {
        assert!(
            p["path"] == "derp"
                && p["derp_region"] == DERP_REGION
                && p["endpoint"].is_null()
                && !history_paths(p).iter().any(|h| h == "direct"),
            "{nat1}×{nat2}: {who} must be on DERP 900 and never have been direct: {p:#}\n{}",
            pair.report(&lab)
        );
    }
    eprintln!(
        "{nat1}×{nat2}: ta reason {}, tb reason {}",
        pa["path_reason"], pb["path_reason"]
    );
    let line = human_status_line(&pair.a, &pair.b_ip);
    assert!(
        line.contains("derp(900)"),
        "`tern status` on ta: {line:?} lacks derp(900)"
    );
    assert_netcheck(&lab, &pair.a, "c1", nat1);
    assert_netcheck(&lab, &pair.b, "c2", nat2);
}

/// 8 MiB of a fixed pattern (the TUN-offload test's download).
fn big_blob() -> &'static [u8] {
    static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
    BLOB.get_or_init(|| (0..8u32 << 20).map(|i| (i % 253) as u8).collect())
}

/// iperf3 TCP for 2 s from `client_ns` to `server_ip` (`reverse`: the server sends); the bytes
/// the receiving side counted.
fn iperf3(lab: &Lab, client_ns: &str, server_ns: &str, server_ip: &str, reverse: bool) -> u64 {
    let mut server = Process::spawn(
        lab.ns(server_ns),
        "iperf3 -s",
        "iperf3",
        &["-s", "-1", "-B", server_ip],
    )
    .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let mut args = vec!["timeout", "30", "iperf3", "-c", server_ip, "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let out = lab.ns(client_ns).exec_unchecked(&args).expect("run iperf3");
    let _ = server.stop();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "iperf3 {client_ns} → {server_ip} (reverse {reverse}): {}",
        String::from_utf8_lossy(&out.stdout)
    );
    report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0)
}

/// Datagrams of a UDP GSO send (`UDP_SEGMENT`, as QUIC stacks send) that went through: a socket
/// in `from_ns` sends `SENDS` × `PER_SEND` datagrams of 1,000 bytes to `to_ip` in `to_ns`, each
/// with its number and a pattern of it; the receiver checks every one and counts them.
fn udp_gso(lab: &Lab, from_ns: &str, to_ns: &str, to_ip: &str) -> usize {
    const SENDS: u32 = 3;
    const PER_SEND: u32 = 8;
    const SIZE: usize = 1000;
    let to = SocketAddr::new(to_ip.parse().expect("tailnet IP"), 9998);
    let bind = |ns: &str, addr: SocketAddr| {
        lab.ns(ns)
            .run_in(move || {
                std::net::UdpSocket::bind(addr)
                    .map_err(|e| tern_lab::LabError::io(format!("bind {addr}"), e))
            })
            .expect("UDP socket")
    };
    let rx = bind(to_ns, to);
    let tx = bind(from_ns, SocketAddr::from(([0, 0, 0, 0], 0)));
    support::set_udp_segment(&tx, SIZE as u16).expect("UDP_SEGMENT");
    let datagram = |n: u32| -> Vec<u8> {
        let mut d = n.to_be_bytes().to_vec();
        d.extend((4..SIZE).map(|i| (i as u32 * 7 + n) as u8));
        d
    };
    for send in 0..SENDS {
        let batch: Vec<u8> = (0..PER_SEND)
            .flat_map(|i| datagram(send * PER_SEND + i))
            .collect();
        tx.send_to(&batch, to).expect("GSO send");
        std::thread::sleep(Duration::from_millis(50));
    }
    rx.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut seen = std::collections::BTreeSet::new();
    let mut buf = [0u8; 2048];
    while seen.len() < (SENDS * PER_SEND) as usize {
        let Ok(n) = rx.recv(&mut buf) else { break };
        let got = &buf[..n];
        let number = u32::from_be_bytes([got[0], got[1], got[2], got[3]]);
        assert_eq!(
            got,
            &datagram(number)[..],
            "datagram {number} arrived changed"
        );
        seen.insert(number);
    }
    seen.len()
}

/// TUN offloads (issue 15) with the other end without them: ta runs with offloads (the
/// default), tb with `--tun-offload=false` (through `TERN_TUN_OFFLOAD`). 8 MiB byte for byte and
/// iperf3 in both directions over the direct path; ta's status shows both halves at work (split
/// on send, coalesce on receive), tb's shows none. Then a UDP GSO send from ta: on a kernel with
/// USO (6.2 and later) its TUN hands over UDP super-packets that ta splits; every datagram
/// reaches tb intact either way. And one from tb: with USO ta writes the datagrams to its TUN as
/// UDP super-packets; every datagram reaches the socket in c1 intact.
#[test]
fn offloaded_and_plain_tun_carry_tcp_and_udp_gso_byte_exact() {
    let lab = Lab::start(NatMode::Easy, NatMode::Easy);
    let a = Node::start(lab.ns("c1"), lab.dir.path(), "ta");
    let b = Node::start_with_env(
        lab.ns("c2"),
        lab.dir.path(),
        "tb",
        &[("TERN_TUN_OFFLOAD", std::path::Path::new("false"))],
    );
    a.wait_for_api(20);
    b.wait_for_api(20);
    a.up("ta");
    b.up("tb");
    let logs = || format!("{}\n{}\n{}", a.logs(), b.logs(), lab.server_logs());
    let ip = |p: Value| {
        p["tailnet_ips"][0]
            .as_str()
            .expect("tailnet IP")
            .to_string()
    };
    let b_ip = ip(wait("ta to see tb", 60, logs, || a.peer("tb")));
    let a_ip = ip(wait("tb to see ta", 60, logs, || b.peer("ta")));
    let pair = Pair { a, b, a_ip, b_ip };
    pair.wait_for_ping(&lab, 30);
    let _traffic = background_ping(lab.ns("c1"), &pair.b_ip);
    wait(
        "ta's path to tb to be direct",
        15,
        || pair.report(&lab),
        || pair.a.peer_entry("tb").filter(is_direct),
    );

    download_both_ways(&lab, &pair, big_blob());
    for reverse in [false, true] {
        let received = iperf3(&lab, "c1", "c2", &pair.b_ip, reverse);
        assert!(
            received > 1 << 20,
            "iperf3 (reverse {reverse}) moved only {received} bytes\n{}",
            pair.report(&lab)
        );
    }
    assert_offloads_used(&pair.a, Offloads::Both, &pair.report(&lab));
    let plain = pair.b.status()["data_plane"]["tun_offload"].clone();
    assert!(
        plain.as_object().is_some_and(|m| m.is_empty()),
        "tb runs without offloads, yet reports {plain}"
    );

    let received = udp_gso(&lab, "c1", "c2", &pair.b_ip);
    assert_eq!(
        received,
        24,
        "UDP GSO datagrams ta → tb\n{}",
        pair.report(&lab)
    );
    // Three sends of eight: with USO the TUN handed over UDP super-packets, cut into
    // datagrams (counted at the next status publish); without it, none.
    assert_udp_offload_used(&lab, &pair, "udp_super_packets_read", |c| {
        count(c, "udp_super_packets_read") >= 1 && count(c, "datagrams_split") >= 8
    });

    // The other way: tb's datagrams reach ta back to back; with USO ta joins them into UDP
    // super-packets for its TUN write, and the kernel hands the receiving socket (no UDP_GRO)
    // every datagram as sent.
    let received = udp_gso(&lab, "c2", "c1", &pair.a_ip);
    assert_eq!(
        received,
        24,
        "UDP GSO datagrams tb → ta\n{}",
        pair.report(&lab)
    );
    assert_udp_offload_used(&lab, &pair, "udp_super_packets_written", |c| {
        count(c, "udp_super_packets_written") >= 1
    });
}

/// A counter of `status.data_plane.tun_offload` (0 when absent).
fn count(counters: &Value, name: &str) -> u64 {
    counters[name].as_u64().unwrap_or(0)
}

/// On a kernel with USO, waits until ta's TUN offload counters show `used`; without USO, checks
/// that `counter` stayed 0.
fn assert_udp_offload_used(lab: &Lab, pair: &Pair, counter: &str, used: impl Fn(&Value) -> bool) {
    let uso = support::kernel_has_uso();
    let counters = wait(
        &format!("ta's {counter} (USO {uso})"),
        10,
        || pair.report(lab),
        || {
            let counters = pair.a.status()["data_plane"]["tun_offload"].clone();
            (used(&counters) || !uso).then_some(counters)
        },
    );
    if !uso {
        assert_eq!(counters[counter], 0, "{counters}");
    }
}

#[test]
fn nat_matrix_easy_easy_goes_direct() {
    assert_goes_direct(NatMode::Easy, NatMode::Easy);
}

#[test]
fn nat_matrix_fw_easy_goes_direct() {
    assert_goes_direct(NatMode::Fw, NatMode::Easy);
}

#[test]
fn nat_matrix_fw_fw_goes_direct() {
    assert_goes_direct(NatMode::Fw, NatMode::Fw);
}

#[test]
fn nat_matrix_portfwd_hard_goes_direct() {
    assert_goes_direct(NatMode::Portfwd, NatMode::Hard);
}

#[test]
fn nat_matrix_easy_hard_stays_on_derp() {
    assert_stays_on_derp(NatMode::Easy, NatMode::Hard);
}

#[test]
fn nat_matrix_hard_hard_stays_on_derp() {
    assert_stays_on_derp(NatMode::Hard, NatMode::Hard);
}

#[test]
fn nat_matrix_udpblock_easy_stays_on_derp() {
    assert_stays_on_derp(NatMode::Udpblock, NatMode::Easy);
}

#[test]
fn nat_matrix_easy_udpblock_stays_on_derp() {
    assert_stays_on_derp(NatMode::Easy, NatMode::Udpblock);
}

// ---------------------------------------------------------------------------------------------
// Interop with Caddy/tsnet (tailscale.com v1.90.9)

const CADDY_BODY: &str = "hello from tsnet over a tern path";

/// tern `ta` in c1 and Caddy/tsnet `tsb` in c2 (serving [`CADDY_BODY`] on its tailnet :80), up
/// and seeing each other; returns tsb's tailnet IP.
fn start_tern_and_tsnet(lab: &Lab) -> (Node, CaddyNode, String) {
    let a = Node::start(lab.ns("c1"), lab.dir.path(), "ta");
    a.wait_for_api(20);
    a.up("ta");
    let url = format!("http://{CONTROL_IP}:8080");
    let mut config = CaddyConfig::new("tsb", &url, AUTH_KEY);
    config.site_body = format!("respond \"{CADDY_BODY}\"");
    let caddy = CaddyNode::start(lab.ns("c2"), config).expect("start caddy");
    let peer = wait(
        "tern to see tsb with home DERP 900",
        90,
        || format!("{}\n== tsb\n{}", a.logs(), tail(&caddy.logs(), 80)),
        || a.peer("tsb"),
    );
    let ip = peer["tailnet_ips"][0]
        .as_str()
        .expect("tsb's tailnet IP")
        .to_string();
    (a, caddy, ip)
}

fn tsnet_report(lab: &Lab, a: &Node, caddy: &CaddyNode) -> String {
    format!(
        "== ta status\n{:#}\n{}\n== tsb (caddy) log\n{}\n{}",
        a.status(),
        a.logs(),
        tail(&caddy.logs(), 120),
        lab.server_logs()
    )
}

/// curl Caddy's tailnet site from c1 through tern's TUN.
fn curl_caddy(lab: &Lab, caddy_ip: &str) -> Result<(), String> {
    fetch(
        lab.ns("c1"),
        &format!("http://{caddy_ip}/"),
        CADDY_BODY.as_bytes(),
    )
}

/// easy×easy: tern and tsnet go direct; tern shows tsnet's public endpoint, and Caddy's site
/// answers through tern's TUN with DERP blocked (so tsnet sends directly too).
#[test]
fn tsnet_easy_easy_goes_direct() {
    let lab = Lab::start(NatMode::Easy, NatMode::Easy);
    let (a, caddy, caddy_ip) = start_tern_and_tsnet(&lab);
    let report = || tsnet_report(&lab, &a, &caddy);
    wait("curl ta → Caddy's tailnet site", 60, report, || {
        curl_caddy(&lab, &caddy_ip).ok()
    });
    let tsb_public = lab.public_ip("c2");
    wait("ta to know tsb's public endpoint", 30, report, || {
        has_endpoint_on(&a.peer_entry("tsb")?, tsb_public).then_some(())
    });

    let started = Instant::now();
    let _traffic = background_ping(lab.ns("c1"), &caddy_ip);
    let p = wait("ta's path to tsb to be direct", 15, report, || {
        a.peer_entry("tsb").filter(is_direct)
    });
    eprintln!(
        "tern↔tsnet easy×easy: direct {:?} after the ping started (the curl before was \
         traffic too), endpoint {}, {} ms",
        started.elapsed(),
        p["endpoint"],
        p["latency_ms"]
    );
    assert_eq!(
        endpoint_ip(&p),
        Some(tsb_public.into()),
        "tern's endpoint for tsb must be tsb's public address\n{}",
        report()
    );

    lab.block_derp();
    let got = curl_caddy(&lab, &caddy_ip);
    lab.unblock_derp();
    if let Err(e) = got {
        panic!(
            "Caddy's site through tern's TUN with DERP blocked: {e}\n{}",
            report()
        );
    }
    let p = a.peer_entry("tsb").unwrap_or_default();
    assert!(
        is_direct(&p) && p["path_reason"] == "direct" && p["last_pong_at"].is_string(),
        "ta → tsb after the transfer: {p:#}\n{}",
        report()
    );
}

/// hard×hard: tern and tsnet stay on DERP, traffic flows, and tern says why. tsnet's own
/// netcheck stops at the first STUN answer of a region, so with one region it may not learn
/// that its NAT is hard: tern then blames only its own NAT.
#[test]
fn tsnet_hard_hard_stays_on_derp() {
    let lab = Lab::start(NatMode::Hard, NatMode::Hard);
    let (a, caddy, caddy_ip) = start_tern_and_tsnet(&lab);
    let report = || tsnet_report(&lab, &a, &caddy);
    wait("curl ta → Caddy's tailnet site", 60, report, || {
        curl_caddy(&lab, &caddy_ip).ok()
    });
    let _traffic = background_ping(lab.ns("c1"), &caddy_ip);
    let want = || match lab.reported_hard_nat("tsb") {
        Some(true) => "both-hard-nat",
        _ => "local-hard-nat",
    };
    let p = wait(
        "ta's path reason for tsb to name the hard NATs (both-hard-nat if tsb reported a hard \
         NAT to control, else local-hard-nat)",
        30,
        report,
        || {
            let p = a.peer_entry("tsb")?;
            assert!(
                !is_direct(&p),
                "ta → tsb went direct in hard×hard\n{}",
                report()
            );
            (p["path_reason"] == want()).then_some(p)
        },
    );
    if let Err(e) = curl_caddy(&lab, &caddy_ip) {
        panic!("Caddy's site over DERP: {e}\n{}", report());
    }
    assert!(
        p["path"] == "derp"
            && p["derp_region"] == DERP_REGION
            && !history_paths(&p).iter().any(|h| h == "direct"),
        "ta → tsb must be on DERP 900 and never have been direct: {p:#}\n{}",
        report()
    );
    eprintln!(
        "tern↔tsnet hard×hard: reason {}, tsb reported MappingVariesByDestIP {:?}",
        p["path_reason"],
        lab.reported_hard_nat("tsb")
    );
}

// ---------------------------------------------------------------------------------------------
// Rebinding under a running transfer

/// Byte `i` of the rebinding stream.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// A paced TCP stream from tb's tailnet address to ta (about 800 KB/s until told to stop), with
/// the receiver checking every byte.
struct Stream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    server: std::thread::JoinHandle<Result<u64, String>>,
    client: std::thread::JoinHandle<Result<u64, String>>,
}

impl Stream {
    fn start(lab: &Lab, pair: &Pair) -> Stream {
        let addr = SocketAddr::new(pair.b_ip.parse().expect("tailnet IP"), 9000);
        let listener = lab.ns("c2").bind_tcp(addr).expect("bind stream server");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let server = std::thread::spawn(move || send_pattern(accept(&listener, &flag)?, &flag));
        let conn = lab
            .ns("c1")
            .run_in(move || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .map_err(|e| tern_lab::LabError::io(format!("connect {addr}"), e))
            })
            .unwrap_or_else(|e| panic!("connect to the stream server: {e}\n{}", pair.report(lab)));
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let client = std::thread::spawn(move || receive_pattern(conn, &counter));
        Stream {
            stop,
            received,
            server,
            client,
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Wait (bounded) until `bytes` more have arrived.
    fn wait_for_progress(&self, what: &str, bytes: u64, secs: u64, logs: impl Fn() -> String) {
        let from = self.received();
        wait(
            &format!("{bytes} more bytes of the stream {what} (at {from})"),
            secs,
            logs,
            || (self.received() >= from + bytes).then_some(()),
        );
    }

    /// Stop sending, then (sent, received) once both ends are done.
    fn finish(self) -> (Result<u64, String>, Result<u64, String>) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.server.join().unwrap_or(Err("server panicked".into()));
        let received = self.client.join().unwrap_or(Err("client panicked".into()));
        (sent, received)
    }
}

/// The first connection, unless `stop` is set or 30 s pass first.
fn accept(listener: &std::net::TcpListener, stop: &AtomicBool) -> Result<TcpStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if let Ok((conn, _)) = listener.accept() {
            conn.set_nonblocking(false).map_err(|e| e.to_string())?;
            return Ok(conn);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("no connection to the stream server".into())
}

fn send_pattern(mut conn: TcpStream, stop: &AtomicBool) -> Result<u64, String> {
    conn.set_write_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 8 << 10];
    while !stop.load(Ordering::Relaxed) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = pattern(sent + i as u64);
        }
        conn.write_all(&chunk)
            .map_err(|e| format!("send after {sent} bytes: {e}"))?;
        sent += chunk.len() as u64;
        std::thread::sleep(Duration::from_millis(10));
    }
    conn.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    Ok(sent)
}

fn receive_pattern(mut conn: TcpStream, counter: &AtomicU64) -> Result<u64, String> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("receive after {got} bytes: {e}"))?;
        if n == 0 {
            return Ok(got);
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(got + i as u64)) {
            return Err(format!("byte {} is corrupted", got + i as u64));
        }
        got += n as u64;
        counter.store(got, Ordering::Relaxed);
    }
}

/// `paths` contains `want` in this order (not necessarily adjacent).
fn has_subsequence(paths: &[String], want: &[&str]) -> bool {
    let mut it = paths.iter();
    want.iter().all(|w| it.any(|p| p == w))
}

/// easy×easy, direct, a TCP stream running: flush nat1's conntrack, then switch nat1 to hard
/// (its mapping changes: the direct path dies, DERP takes over) and back to easy (direct
/// again). The stream arrives complete and intact, and both sides' path history shows
/// direct → derp → direct.
#[test]
fn rebinding_keeps_a_tcp_stream_going_via_derp_and_back_to_direct() {
    let lab = Lab::start(NatMode::Easy, NatMode::Easy);
    let pair = Pair::start(&lab);
    pair.wait_for_public_endpoints(&lab);
    let report = || pair.report(&lab);
    let _traffic = background_ping(lab.ns("c1"), &pair.b_ip);
    let both_direct = || {
        let (pa, pb) = pair.entries();
        (is_direct(&pa) && is_direct(&pb)).then_some(())
    };
    wait("both sides direct", 15, report, both_direct);

    let stream = Stream::start(&lab, &pair);
    stream.wait_for_progress("on the direct path", 256 << 10, 20, report);

    tern_lab::nat::flush_conntrack(lab.ns("nat1")).expect("flush nat1's conntrack");
    stream.wait_for_progress("after the conntrack flush", 512 << 10, 30, report);

    let switched = Instant::now();
    lab.set_nat("nat1", NatMode::Hard);
    wait(
        "the direct path to fail over to DERP after nat1 went hard",
        30,
        report,
        || {
            let (pa, pb) = pair.entries();
            (pa["path"] == "derp" && pb["path"] == "derp").then_some(())
        },
    );
    eprintln!(
        "rebinding: both on DERP {:?} after nat1 went hard",
        switched.elapsed()
    );
    stream.wait_for_progress("over DERP", 512 << 10, 30, report);

    let switched = Instant::now();
    lab.set_nat("nat1", NatMode::Easy);
    wait(
        "both sides direct again after nat1 went easy",
        30,
        report,
        both_direct,
    );
    eprintln!(
        "rebinding: both direct again {:?} after nat1 went easy",
        switched.elapsed()
    );
    stream.wait_for_progress("on the new direct path", 512 << 10, 30, report);

    let (sent, received) = stream.finish();
    let (sent, received) = match (sent, received) {
        (Ok(s), Ok(r)) => (s, r),
        (s, r) => panic!("stream failed: sent {s:?}, received {r:?}\n{}", report()),
    };
    assert_eq!(sent, received, "the stream lost bytes\n{}", report());
    eprintln!("rebinding: {received} bytes arrived intact");
    // ta received the stream as coalesced super-packets, across the path changes.
    assert_offloads_used(&pair.a, Offloads::Written, &report());
    let (pa, pb) = pair.entries();
    for (who, p) in [("ta → tb", &pa), ("tb → ta", &pb)] {
        let h = history_paths(p);
        assert!(
            has_subsequence(&h, &["direct", "derp", "direct"]),
            "{who}: path history must show direct → derp → direct, got {h:?}: {p:#}"
        );
    }
}

/// The same against the real Go node: tern in c1, Caddy/tsnet in c2 reverse-proxying a paced
/// HTTP stream from c2's loopback; curl in c1 downloads it through tern's TUN while nat1 goes
/// hard and back to easy. The body arrives complete and intact, and tern's path to tsnet goes
/// direct → derp → direct by itself.
#[test]
fn tsnet_rebinding_keeps_an_http_stream_going_via_derp_and_back_to_direct() {
    let lab = Lab::start(NatMode::Easy, NatMode::Easy);
    let upstream = SocketAddr::from(([127, 0, 0, 1], 9000));
    let listener = lab.ns("c2").bind_tcp(upstream).expect("bind upstream");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let server = std::thread::spawn(move || {
        let mut conn = accept(&listener, &flag)?;
        let mut head = [0u8; 4096];
        let _ = conn.read(&mut head).map_err(|e| e.to_string())?;
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        send_pattern(conn, &flag)
    });
    let stop_server = || stop.store(true, Ordering::Relaxed);

    let a = Node::start(lab.ns("c1"), lab.dir.path(), "ta");
    a.wait_for_api(20);
    a.up("ta");
    let url = format!("http://{CONTROL_IP}:8080");
    let mut config = CaddyConfig::new("tsb", &url, AUTH_KEY);
    config.site_body = format!("reverse_proxy {upstream} {{\nflush_interval -1\n}}");
    let caddy = CaddyNode::start(lab.ns("c2"), config).expect("start caddy");
    let report = || tsnet_report(&lab, &a, &caddy);
    let caddy_ip = wait("tern to see tsb with home DERP 900", 90, report, || {
        a.peer("tsb")?["tailnet_ips"][0]
            .as_str()
            .map(str::to_string)
    });
    let _traffic = background_ping(lab.ns("c1"), &caddy_ip);
    let tsb_path = || a.peer_entry("tsb").unwrap_or_default();
    wait("ta's path to tsb to be direct", 30, report, || {
        is_direct(&tsb_path()).then_some(())
    });

    let body = lab.dir.path().join("stream.bin");
    let body_arg = body.display().to_string();
    let site = format!("http://{caddy_ip}/");
    let mut curl = Process::spawn(
        lab.ns("c1"),
        "curl",
        "curl",
        &["-sS", "-N", "--max-time", "150", "-o", &body_arg, &site],
    )
    .expect("start curl");
    let size = || std::fs::metadata(&body).map(|m| m.len()).unwrap_or(0);
    let progress = |what: &str| {
        let from = size();
        wait(
            &format!("512 KiB more of the download {what} (at {from})"),
            30,
            || format!("== curl\n{}\n{}", curl_output(&body), report()),
            || (size() >= from + (512 << 10)).then_some(()),
        );
    };
    progress("on the direct path");

    let switched = Instant::now();
    lab.set_nat("nat1", NatMode::Hard);
    wait("ta's path to tsb to fall back to DERP", 30, report, || {
        (tsb_path()["path"] == "derp").then_some(())
    });
    eprintln!(
        "tern↔tsnet rebinding: DERP {:?} after nat1 went hard",
        switched.elapsed()
    );
    progress("over DERP");

    let switched = Instant::now();
    lab.set_nat("nat1", NatMode::Easy);
    wait("ta's path to tsb to be direct again", 30, report, || {
        is_direct(&tsb_path()).then_some(())
    });
    eprintln!(
        "tern↔tsnet rebinding: direct again {:?} after nat1 went easy",
        switched.elapsed()
    );
    progress("on the new direct path");

    // Blocking DERP now proves tsnet sends directly too.
    lab.block_derp();
    progress("with DERP blocked");
    lab.unblock_derp();

    stop_server();
    let sent = server
        .join()
        .unwrap_or(Err("server panicked".into()))
        .unwrap_or_else(|e| panic!("upstream: {e}\n{}", report()));
    let status = wait("curl to finish", 30, report, || {
        curl.try_wait().ok().flatten()
    });
    let got = std::fs::read(&body).expect("read the download");
    assert!(
        status.success() && got.len() as u64 == sent,
        "curl {status}: {} of {sent} bytes\n{}\n{}",
        got.len(),
        curl.output(),
        report()
    );
    if let Some(i) = got
        .iter()
        .enumerate()
        .position(|(i, b)| *b != pattern(i as u64))
    {
        panic!("byte {i} of the download is corrupted");
    }
    eprintln!("tern↔tsnet rebinding: {sent} bytes arrived intact");
    // tern received the stream through its TUN as coalesced super-packets across the changes.
    assert_offloads_used(&a, Offloads::Written, &report());
    let h = history_paths(&tsb_path());
    assert!(
        has_subsequence(&h, &["direct", "derp", "direct"]),
        "ta → tsb: path history must show direct → derp → direct, got {h:?}"
    );
}

/// What curl wrote so far, for failure messages.
fn curl_output(body: &std::path::Path) -> String {
    format!(
        "{} bytes downloaded",
        std::fs::metadata(body).map(|m| m.len()).unwrap_or(0)
    )
}

// ---------------------------------------------------------------------------------------------
// `tern ping` exit codes: 0 direct, 3 only DERP answered, 4 no answer

const PING_DIRECT: i32 = 0;
const PING_DERP_ONLY: i32 = 3;
const PING_NO_ANSWER: i32 = 4;

/// The `via` part of each `pong from NAME (IP) via VIA in LATENCY` line; panics on other lines.
fn pong_vias(stdout: &str, name: &str, ip: &str) -> Vec<String> {
    let prefix = format!("pong from {name} ({ip}) via ");
    stdout
        .lines()
        .filter(|l| l.starts_with("pong"))
        .map(|l| {
            let rest = l
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("pong line {l:?} does not start with {prefix:?}"));
            let (via, latency) = rest
                .rsplit_once(" in ")
                .unwrap_or_else(|| panic!("pong line {l:?} has no latency"));
            assert!(
                latency.ends_with("ms") || latency.ends_with('s'),
                "latency {latency:?} in {l:?}"
            );
            via.to_string()
        })
        .collect()
}

#[test]
fn tern_ping_exits_0_when_the_peer_answers_directly() {
    let lab = Lab::start(NatMode::Easy, NatMode::Easy);
    let pair = Pair::start(&lab);
    pair.wait_for_public_endpoints(&lab);
    // No other traffic: the CLI pings themselves start discovery.
    let out = pair.a.cli(&[
        "ping",
        "-c",
        "10",
        "--until-direct",
        "--timeout",
        "2s",
        "tb",
    ]);
    let text = output_text(&out);
    eprintln!("tern ping easy×easy:\n{text}");
    assert_eq!(
        out.status.code(),
        Some(PING_DIRECT),
        "{text}\n{}",
        pair.report(&lab)
    );
    let vias = pong_vias(&String::from_utf8_lossy(&out.stdout), "tb", &pair.b_ip);
    let last = vias
        .last()
        .unwrap_or_else(|| panic!("no pong lines: {text}"));
    let direct: SocketAddr = last
        .parse()
        .unwrap_or_else(|_| panic!("the last pong must come via ip:port, got {last:?}: {text}"));
    assert_eq!(
        direct.ip(),
        std::net::IpAddr::from(lab.public_ip("c2")),
        "{text}"
    );
    assert!(
        vias[..vias.len() - 1].iter().all(|v| v == "DERP(lab)"),
        "until-direct stops at the first direct pong; earlier ones come via DERP: {text}"
    );
}

#[test]
fn tern_ping_exits_3_when_only_derp_answers() {
    let lab = Lab::start(NatMode::Hard, NatMode::Hard);
    let pair = Pair::start(&lab);
    let out = pair.a.cli(&[
        "ping",
        "-c",
        "3",
        "--until-direct",
        "--timeout",
        "2s",
        &pair.b_ip,
    ]);
    let text = output_text(&out);
    eprintln!("tern ping hard×hard:\n{text}");
    assert_eq!(
        out.status.code(),
        Some(PING_DERP_ONLY),
        "{text}\n{}",
        pair.report(&lab)
    );
    let vias = pong_vias(&String::from_utf8_lossy(&out.stdout), "tb", &pair.b_ip);
    assert_eq!(vias, vec!["DERP(lab)"; 3], "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("direct connection not established"),
        "{text}"
    );
}

#[test]
fn tern_ping_exits_4_when_the_peer_does_not_answer() {
    let lab = Lab::start(NatMode::Easy, NatMode::Easy);
    let mut pair = Pair::start(&lab);
    // The peer's daemon dies (no logout): control still lists it, nothing answers.
    pair.b
        .process
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill tb");
    let _ = pair.b.process.stop();
    let out = pair.a.cli(&["ping", "-c", "2", "--timeout", "1s", "tb"]);
    let text = output_text(&out);
    eprintln!("tern ping to a dead peer:\n{text}");
    assert_eq!(
        out.status.code(),
        Some(PING_NO_ANSWER),
        "{text}\n{}",
        pair.a.logs()
    );
    assert!(!text.contains("pong from"), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with("timed out")).count(),
        2,
        "each unanswered ping says it timed out: {text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no reply"),
        "{text}"
    );
}
