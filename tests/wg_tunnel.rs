//! End to end through the kernel: two namespaces joined by a veth pair, each with a tern0 TUN,
//! routes, a WireGuard peer table and a UDP socket driven by a small tokio loop (TUN → route →
//! encapsulate → UDP; UDP → decapsulate → filter → TUN; timers at `next_deadline`). `ping` and
//! `iperf3` from one namespace reach the other's tailnet address through the tunnel.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use tern::control::tailcfg::FilterRule;
use tern::filter::{Filter, Verdict};
use tern::keys::{NodePrivate, NodePublic};
use tern::packet::PacketSummary;
use tern::wg::{WgOutput, WgPeers, WgStats};
use tern_lab::{LabError, Netns};
use tern_platform::router::{default_routes, NetlinkRouter, Router};
use tern_platform::tun::{LinuxTun, Tun, TunConfig};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

struct NodeConfig {
    key: NodePrivate,
    addrs: Vec<IpNet>,
    bind: SocketAddr,
    peer_key: NodePublic,
    peer_addrs: Vec<IpNet>,
    peer_endpoint: SocketAddr,
}

/// The data-plane loop of one node; returns the peer's WireGuard counters when stopped.
async fn run_node(
    cfg: NodeConfig,
    ready: std::sync::mpsc::Sender<()>,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<WgStats> {
    // One packet per read and write: this loop is the plain data plane, without the offloads
    // the engine handles (tests/direct_paths.rs covers those end to end).
    let config = TunConfig {
        offload: false,
        ..TunConfig::default()
    };
    let tun = LinuxTun::create(&config).await?;
    tun.set_addresses(&cfg.addrs).await?;
    let mut router = NetlinkRouter::new(tun.netlink().clone(), tun.index());
    router.set_routes(&default_routes()).await?;
    let sock = UdpSocket::bind(cfg.bind).await?;
    let mut peers = WgPeers::new(cfg.key);
    let peer = peers.upsert(cfg.peer_key, &cfg.peer_addrs)?;
    let rules: Vec<FilterRule> = serde_json::from_str(
        r#"[{"SrcIPs":["100.64.0.0/10","fd7a:115c:a1e0::/48"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]}]"#,
    )?;
    let mut filter = Filter::from_rules(&rules, &cfg.addrs)?;
    let _ = ready.send(());

    let (mut tun_buf, mut udp_buf, mut out) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
    let mut to_send: Vec<Vec<u8>> = Vec::new();
    loop {
        let deadline = peers.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = &mut stop => break,
            r = tun.recv(&mut tun_buf) => {
                let n = r?;
                if let Ok(s) = PacketSummary::parse(&tun_buf[..n]) {
                    filter.note_outbound(&s);
                }
                let (_, res) = peers.encapsulate(std::time::Instant::now(), &tun_buf[..n], &mut out);
                if let WgOutput::ToNetwork(m) = res {
                    to_send.push(out[..m].to_vec());
                }
            }
            r = sock.recv_from(&mut udp_buf) => {
                let (n, _from) = r?;
                let now = std::time::Instant::now();
                match peers.decapsulate(now, &udp_buf[..n], &mut out) {
                    (Some(id), WgOutput::ToNetwork(m)) => {
                        to_send.push(out[..m].to_vec());
                        peers.drain(now, id, &mut out, |b| to_send.push(b.to_vec()));
                    }
                    (_, WgOutput::ToTunnel(m)) => {
                        let ok = PacketSummary::parse(&out[..m])
                            .is_ok_and(|s| filter.check(&s) == Verdict::Accept);
                        if ok {
                            tun.send(&out[..m]).await?;
                        }
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                peers.update_timers(std::time::Instant::now(), &mut out, |_, b| to_send.push(b.to_vec()));
            }
        }
        for datagram in to_send.drain(..) {
            sock.send_to(&datagram, cfg.peer_endpoint).await?;
        }
    }
    router.close().await?;
    let session = peers.session(peer).context("peer vanished")?;
    Ok(session.stats())
}

fn spawn_node(
    ns: &Netns,
    cfg: NodeConfig,
) -> (
    oneshot::Sender<()>,
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<tern_lab::Result<WgStats>>,
) {
    let (stop_tx, stop_rx) = oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = ns.spawn_thread(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        rt.block_on(run_node(cfg, ready_tx, stop_rx))
            .map_err(|e| LabError::Invalid(format!("{e:#}")))
    });
    (stop_tx, ready_rx, handle)
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn exec_in(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run command in namespace")
}

#[test]
fn ping_and_iperf_through_the_wireguard_tunnel() {
    support::require_root();
    let pid = std::process::id();
    let (na, nb) = (format!("twg-a-{pid}"), format!("twg-b-{pid}"));
    let a = Netns::create(&na).expect("namespace a");
    let b = Netns::create(&nb).expect("namespace b");
    a.ip_batch(&format!(
        "link add veth0 type veth peer name veth1 netns {nb}\naddr add 10.77.0.1/24 dev veth0\nlink set veth0 up\n"
    ))
    .expect("veth in a");
    b.ip_batch("addr add 10.77.0.2/24 dev veth1\nlink set veth1 up\n")
        .expect("veth in b");

    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let cfg_a = NodeConfig {
        key: ka.clone(),
        addrs: nets(&["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]),
        bind: "10.77.0.1:41641".parse().unwrap(),
        peer_key: kb.public(),
        peer_addrs: nets(&["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]),
        peer_endpoint: "10.77.0.2:41641".parse().unwrap(),
    };
    let cfg_b = NodeConfig {
        key: kb,
        addrs: nets(&["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]),
        bind: "10.77.0.2:41641".parse().unwrap(),
        peer_key: ka.public(),
        peer_addrs: nets(&["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]),
        peer_endpoint: "10.77.0.1:41641".parse().unwrap(),
    };
    let (stop_a, ready_a, node_a) = spawn_node(&a, cfg_a);
    let (stop_b, ready_b, node_b) = spawn_node(&b, cfg_b);
    let wait = Duration::from_secs(10);
    let ready = ready_a.recv_timeout(wait).is_ok() && ready_b.recv_timeout(wait).is_ok();

    let ping = ready.then(|| {
        exec_in(
            &na,
            &["ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.2"],
        )
    });
    let ping6 = ready.then(|| {
        exec_in(
            &na,
            &[
                "ping",
                "-6",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "3",
                "fd7a:115c:a1e0::2",
            ],
        )
    });
    let iperf = ready.then(|| {
        let mut server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &nb,
                "iperf3",
                "-s",
                "-1",
                "-B",
                "100.64.0.2",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 server");
        std::thread::sleep(Duration::from_millis(300));
        let client = exec_in(
            &na,
            &[
                "timeout",
                "20",
                "iperf3",
                "-c",
                "100.64.0.2",
                "-t",
                "2",
                "-J",
            ],
        );
        let _ = server.kill();
        let _ = server.wait();
        client
    });

    let _ = stop_a.send(());
    let _ = stop_b.send(());
    let stats_a = node_a.join().map_err(|_| "node a panicked".to_string());
    let stats_b = node_b.join().map_err(|_| "node b panicked".to_string());
    a.delete().expect("delete a");
    b.delete().expect("delete b");
    assert!(
        !Netns::exists(&na) && !Netns::exists(&nb),
        "namespaces left behind"
    );

    assert!(
        ready,
        "a node did not come up within 10 s: {stats_a:?} {stats_b:?}"
    );
    let ping = ping.unwrap();
    assert!(
        ping.status.success(),
        "ping through the tunnel failed: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    let ping6 = ping6.unwrap();
    assert!(
        ping6.status.success(),
        "IPv6 ping through the tunnel failed: {}{}",
        String::from_utf8_lossy(&ping6.stdout),
        String::from_utf8_lossy(&ping6.stderr)
    );
    let stats_a = stats_a.unwrap().expect("node a");
    let stats_b = stats_b.unwrap().expect("node b");
    assert_eq!(stats_a.handshakes_completed, 1, "{stats_a:?}");
    assert!(
        stats_b.rx_packets >= 3 && stats_a.rx_packets >= 3,
        "{stats_a:?} {stats_b:?}"
    );
    assert_eq!(stats_a.malformed + stats_b.malformed, 0);

    let iperf = iperf.unwrap();
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout).unwrap_or_default();
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64();
    assert!(
        bps.is_some_and(|b| b > 0.0),
        "iperf3 through the tunnel failed: {}",
        String::from_utf8_lossy(&iperf.stderr)
    );
    eprintln!(
        "iperf3 TCP through the tunnel (debug build): {:.1} Mbit/s",
        bps.unwrap_or(0.0) / 1e6
    );
}
