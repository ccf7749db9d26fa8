//! tern-platform's TUN and router in a fresh network namespace: addresses, MTU, routes (checked
//! with `ip -n NS`), a UDP packet out through the TUN and a reply written back into it, with TUN
//! offloads (virtio-net header on every read and write) and without.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use ipnet::IpNet;
use tern::packet::{proto, PacketSummary};
use tern_lab::{LabError, Netns};
use tern_platform::router::{default_routes, NetlinkRouter, Router};
use tern_platform::tun::{LinuxTun, Tun, TunConfig, DEFAULT_TUN_NAME};

const WAIT: Duration = Duration::from_secs(5);
const NODE_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const PEER_V4: Ipv4Addr = Ipv4Addr::new(100, 101, 102, 103);

fn ip_n(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").arg("-n").arg(ns).args(args).output()?;
    ensure!(
        out.status.success(),
        "ip -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet with a valid header checksum and no UDP checksum (allowed for IPv4).
fn udp4(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only")
    };
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto::UDP, 0, 0]);
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    let csum = ipv4_checksum(&p);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Reads TUN packets until an IPv4 UDP one to `dst` arrives (skipping e.g. IPv6 router
/// solicitations), bounded by WAIT.
async fn read_udp_to(tun: &LinuxTun, dst: SocketAddr) -> anyhow::Result<(PacketSummary, Vec<u8>)> {
    let mut buf = vec![0u8; 70_000];
    let read = async {
        loop {
            let n = tun.recv(&mut buf).await?;
            let frame = &mut buf[..n];
            // With offloads the frame starts with a virtio-net header (and the UDP checksum may
            // be left for us to finish): split gives the packet(s) in it.
            let packets: Vec<Vec<u8>> = if tun.offload() {
                let mut packets = Vec::new();
                tern::vnet::split(frame, |p| packets.push(p.to_vec()))?;
                packets
            } else {
                vec![frame.to_vec()]
            };
            for packet in packets {
                if let Ok(s) = PacketSummary::parse(&packet) {
                    if s.proto == proto::UDP && SocketAddr::new(s.dst, s.dst_port) == dst {
                        return anyhow::Ok((s, packet));
                    }
                }
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .context("no UDP packet on the TUN within 5 s")?
}

async fn tun_round_trip(ns: &str, offload: bool) -> anyhow::Result<()> {
    let config = TunConfig {
        offload,
        ..TunConfig::default()
    };
    let tun = LinuxTun::create(&config).await?;
    ensure!(tun.name() == DEFAULT_TUN_NAME);
    // This kernel has TUN offloads: asked for, they are on.
    ensure!(
        tun.offload() == offload,
        "offload {offload} asked, got {}",
        tun.offload()
    );
    let addrs: Vec<IpNet> = vec!["100.64.0.1/32".parse()?, "fd7a:115c:a1e0::1/128".parse()?];
    tun.set_addresses(&addrs).await?;
    let mut router = NetlinkRouter::new(tun.netlink().clone(), tun.index());
    router.set_routes(&default_routes()).await?;

    let link = ip_n(ns, &["link", "show", DEFAULT_TUN_NAME])?;
    ensure!(
        link.contains("mtu 1280") && link.contains(",UP"),
        "link: {link}"
    );
    let addr = ip_n(ns, &["addr", "show", DEFAULT_TUN_NAME])?;
    ensure!(addr.contains("inet 100.64.0.1/32"), "addr: {addr}");
    ensure!(addr.contains("inet6 fd7a:115c:a1e0::1/128"), "addr: {addr}");
    let v4 = ip_n(ns, &["-4", "route", "show"])?;
    ensure!(v4.contains("100.64.0.0/10 dev tern0"), "v4 routes: {v4}");
    let v6 = ip_n(ns, &["-6", "route", "show"])?;
    ensure!(
        v6.contains("fd7a:115c:a1e0::/48 dev tern0"),
        "v6 routes: {v6}"
    );
    let mut kernel = router.kernel_routes().await?;
    kernel.sort();
    let mut want = default_routes();
    want.sort();
    ensure!(
        kernel == want,
        "kernel routes via tern0 {kernel:?}, want {want:?}"
    );

    // Out: a socket's datagram to a tailnet address is routed into the TUN.
    let sock = tokio::net::UdpSocket::bind((NODE_V4, 0)).await?;
    let local = sock.local_addr()?;
    let peer = SocketAddr::from((PEER_V4, 9999));
    sock.send_to(b"hello tun", peer).await?;
    let (summary, packet) = read_udp_to(&tun, peer).await?;
    ensure!(
        summary.src == IpAddr::V4(NODE_V4) && summary.src_port == local.port(),
        "{summary:?}"
    );
    ensure!(packet.ends_with(b"hello tun"), "payload lost: {packet:?}");
    if offload {
        udp_gso_through_the_tun(&tun).await?;
    }

    // In: a reply written into the TUN reaches the socket.
    tun.send(&udp4(peer, local, b"hello socket")).await?;
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .context("reply written to the TUN never reached the socket")??;
    ensure!(
        &buf[..n] == b"hello socket" && from == peer,
        "got {:?} from {from}",
        &buf[..n]
    );

    // Address set is replaced, routes are removed on close.
    tun.set_addresses(&addrs[..1]).await?;
    let addr = ip_n(ns, &["addr", "show", DEFAULT_TUN_NAME])?;
    ensure!(
        !addr.contains("fd7a:115c:a1e0::1/128"),
        "stale address kept: {addr}"
    );
    router.close().await?;
    let v4 = ip_n(ns, &["-4", "route", "show"])?;
    ensure!(
        !v4.contains("100.64.0.0/10"),
        "route left after close: {v4}"
    );
    Ok(())
}

/// A socket that sends with `UDP_SEGMENT` (as QUIC stacks do): one 3,000-byte send becomes
/// three 1,000-byte datagrams. With USO the TUN hands them over as one UDP super-packet that
/// split cuts up; either way three intact datagrams with valid checksums come out.
async fn udp_gso_through_the_tun(tun: &LinuxTun) -> anyhow::Result<()> {
    ensure!(
        tun.udp_offload() == support::kernel_has_uso(),
        "USO on: {}, kernel 6.2 or later: {}",
        tun.udp_offload(),
        support::kernel_has_uso()
    );
    let sock = std::net::UdpSocket::bind((NODE_V4, 0))?;
    support::set_udp_segment(&sock, 1000).context("UDP_SEGMENT")?;
    let peer = SocketAddr::from((PEER_V4, 9998));
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    sock.send_to(&data, peer)?;

    let mut buf = vec![0u8; 70_000];
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    let mut largest_read = 0;
    let read = async {
        while datagrams.len() < 3 {
            let n = tun.recv(&mut buf).await?;
            let mut from_this_read = 0;
            tern::vnet::split(&mut buf[..n], |p| {
                let to_peer = PacketSummary::parse(p).is_ok_and(|s| {
                    s.proto == proto::UDP && SocketAddr::new(s.dst, s.dst_port) == peer
                });
                if to_peer {
                    datagrams.push(p.to_vec());
                    from_this_read += 1;
                }
            })?;
            largest_read = largest_read.max(from_this_read);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(WAIT, read)
        .await
        .context("the three GSO datagrams did not all come out of the TUN within 5 s")??;
    ensure!(datagrams.len() == 3, "{} datagrams", datagrams.len());
    let mut joined = Vec::new();
    for (i, d) in datagrams.iter().enumerate() {
        ensure!(
            d.len() == 20 + 8 + 1000,
            "datagram {i} is {} bytes",
            d.len()
        );
        let pseudo = tern::vnet::pseudo_header_sum(d, false, 17, d.len() - 20);
        ensure!(
            tern::vnet::fold(tern::vnet::sum_words(pseudo, &d[20..])) == 0xffff,
            "UDP checksum of datagram {i}"
        );
        ensure!(
            tern::vnet::fold(tern::vnet::sum_words(0, &d[..20])) == 0xffff,
            "IPv4 header checksum of datagram {i}"
        );
        joined.extend_from_slice(&d[28..]);
    }
    ensure!(
        joined == data,
        "the datagrams do not carry the data in order"
    );
    // With USO the kernel did not segment: one read held all three.
    let want = if tun.udp_offload() { 3 } else { 1 };
    ensure!(
        largest_read == want,
        "largest read held {largest_read} datagrams, want {want}"
    );
    Ok(())
}

fn in_runtime(ns: String) -> tern_lab::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LabError::Invalid(e.to_string()))?;
    rt.block_on(async {
        tun_round_trip(&ns, true).await.context("with offloads")?;
        tun_round_trip(&ns, false).await.context("without offloads")
    })
    .map_err(|e| LabError::Invalid(format!("{e:#}")))
}

#[test]
fn tun_and_routes_in_a_fresh_namespace() {
    support::require_root();
    let name = format!("tpt-tun-{}", std::process::id());
    let ns = Netns::create(&name).expect("create namespace");
    let thread_name = name.clone();
    let result = ns.run_in(move || in_runtime(thread_name));
    // The TUN closed with its fd: nothing of it is left, even in the namespace.
    let leftover = ip_n(&name, &["link", "show", DEFAULT_TUN_NAME]);
    ns.delete().expect("delete namespace");
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(leftover.is_err(), "TUN outlived its fd: {leftover:?}");
    assert!(!Netns::exists(&name), "namespace {name} left behind");
    let host_links_after = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap()
        .stdout;
    let after = String::from_utf8_lossy(&host_links_after);
    assert!(
        !after.contains("tern0"),
        "TUN leaked into the host namespace"
    );
}

/// Table 52 for a 10,000-peer netmap: one route message per peer once, then only what changes
/// (one add and one delete when a peer is replaced, nothing when the netmap repeats); one
/// aggregate route beyond 10,000 peers. Messages are counted by the router, routes read back.
async fn ten_thousand_peer_routes() -> anyhow::Result<()> {
    use tern_platform::router::RouteSet;
    let tun = LinuxTun::create(&TunConfig::default()).await?;
    tun.set_addresses(&["100.64.0.1/32".parse()?]).await?;
    let mut router = NetlinkRouter::new(tun.netlink().clone(), tun.index())
        .with_table(tern_platform::policy::TS_TABLE);
    let host = |i: u32| -> IpNet {
        IpNet::from(IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(100, 65, 0, 0)) + i,
        )))
    };
    let only = |via_tun: &[IpNet]| RouteSet {
        via_tun: via_tun.to_vec(),
        throw: vec![],
    };
    let mut peers: Vec<IpNet> = (0..10_000).map(host).collect();
    let started = std::time::Instant::now();
    router.set(&only(&peers)).await?;
    eprintln!("10,000 peer routes applied in {:?}", started.elapsed());
    ensure!(
        router.messages_sent() == 10_000,
        "{} messages",
        router.messages_sent()
    );
    ensure!(
        router.kernel_routes().await?.len() == 10_000,
        "routes read back"
    );
    router.set(&only(&peers)).await?;
    ensure!(
        router.messages_sent() == 10_000,
        "the same netmap again sent messages"
    );
    peers[0] = host(20_000);
    router.set(&only(&peers)).await?;
    ensure!(
        router.messages_sent() == 10_002,
        "{} messages",
        router.messages_sent()
    );
    let aggregate: IpNet = "100.64.0.0/10".parse()?;
    let started = std::time::Instant::now();
    router.set(&only(&[aggregate])).await?;
    eprintln!("10,000 routes replaced by one in {:?}", started.elapsed());
    ensure!(
        router.kernel_routes().await? == vec![aggregate],
        "one aggregate left"
    );
    Ok(())
}

#[test]
fn ten_thousand_peers_cost_one_message_each_then_only_changes() {
    support::require_root();
    let name = format!("tpt-10k-{}", std::process::id());
    let ns = Netns::create(&name).expect("create namespace");
    let result = ns.run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        rt.block_on(ten_thousand_peer_routes())
            .map_err(|e| LabError::Invalid(format!("{e:#}")))
    });
    ns.delete().expect("delete namespace");
    if let Err(e) = result {
        panic!("{e}");
    }
}
