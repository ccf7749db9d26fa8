//! The standard topology: reachability inside the lab, nothing outside it, and complete teardown.

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use tern_lab::topology::{namespaces_with_prefix, CONTROL_IP, RELAY_IPS, SERVER_IPS};
use tern_lab::{NatMode, Netns, Topology};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "lab tests need root (network namespaces, nftables): run `cargo test` as root"
    );
}

/// The root namespace's own IPv4 addresses that are not in the lab's ranges.
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .filter(|ip| {
            !ip.starts_with("127.") && !ip.starts_with("198.18.") && !ip.starts_with("198.19.")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn standard_topology_reaches_public_hosts_and_nothing_outside() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Hard).expect("build lab");
    let c1 = topo.ns("c1").unwrap();
    for ip in RELAY_IPS.iter().chain(&SERVER_IPS).chain([&CONTROL_IP]) {
        let out = c1
            .exec_unchecked(&["ping", "-c1", "-W2", &ip.to_string()])
            .unwrap();
        assert!(out.status.success(), "c1 cannot ping {ip}: {out:?}");
    }
    // No route to anything outside the lab, including the host's own networks and its resolver.
    let mut outside = vec!["1.1.1.1".to_string(), "10.255.255.53".to_string()];
    outside.extend(host_addresses());
    for node in topo.nodes() {
        for addr in &outside {
            let out = node
                .ns()
                .exec_unchecked(&["ip", "route", "get", addr])
                .unwrap();
            assert!(
                !out.status.success(),
                "{} has a route to {addr}: {out:?}",
                node.name()
            );
        }
    }
    // Programs started in the lab resolve names through the namespace's own loopback only.
    let resolv = c1.exec(&["cat", "/etc/resolv.conf"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&resolv.stdout),
        "nameserver 127.0.0.1\n"
    );
    // Clients reach each other's private site only through the lab (fw mode needs this).
    let to_c2 = c1
        .exec_unchecked(&["ip", "route", "get", "10.2.0.2"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&to_c2.stdout).contains("via 10.1.0.1"),
        "{to_c2:?}"
    );
    let relay_to_c1 = topo
        .ns("relay")
        .unwrap()
        .exec(&["ip", "route", "get", "10.1.0.2"])
        .unwrap();
    assert!(String::from_utf8_lossy(&relay_to_c1.stdout).contains("via 198.18.0.1"));
    // A connect() to an outside address fails locally (no route): no packet is sent.
    let errors = c1
        .spawn_thread(|| {
            let udp =
                UdpSocket::bind("0.0.0.0:0").map_err(|e| tern_lab::LabError::io("bind", e))?;
            let outside = SocketAddr::from((Ipv4Addr::new(1, 1, 1, 1), 53));
            let udp_err = udp.connect(outside).err().and_then(|e| e.raw_os_error());
            let tcp_err = TcpStream::connect_timeout(&outside, Duration::from_secs(2))
                .err()
                .and_then(|e| e.raw_os_error());
            Ok((udp_err, tcp_err))
        })
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(errors, (Some(libc::ENETUNREACH), Some(libc::ENETUNREACH)));
    let prefix = topo.prefix().to_string();
    assert_eq!(namespaces_with_prefix(&prefix).unwrap().len(), 7);
    drop(topo);
    assert!(namespaces_with_prefix(&prefix).unwrap().is_empty());
    let etc_left = std::fs::read_dir("/etc/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(etc_left, 0, "/etc/netns entries of {prefix} left behind");
    let _ = Netns::list();
}

/// A dual-stack lab: clients reach the public hosts' IPv6 twins through their NAT box's firewall,
/// and IPv6 routes only 2001:db8::/32 (nothing outside, the host's own IPv6 included).
#[test]
fn dual_stack_topology_routes_lab_ipv6_and_nothing_outside() {
    require_root();
    let prefix = tern_lab::topology::unique_prefix();
    let topo = Topology::standard_with(&prefix, NatMode::Easy, NatMode::Easy, true)
        .expect("build dual-stack lab");
    assert!(topo.ipv6());
    let c1 = topo.ns("c1").unwrap();
    let twins: Vec<String> = RELAY_IPS
        .iter()
        .chain(&SERVER_IPS)
        .filter_map(|ip| tern_lab::topology::v6_of(*ip))
        .map(|ip| ip.to_string())
        .collect();
    assert_eq!(
        twins,
        [
            "2001:db8::10",
            "2001:db8::11",
            "2001:db8::20",
            "2001:db8::21"
        ]
    );
    for ip in twins.iter().map(String::as_str).chain(["2001:db8:2:1::2"]) {
        let out = c1
            .exec_unchecked(&["ping", "-6", "-c1", "-W2", ip])
            .unwrap();
        // c2's firewall lets no new inbound connection in: c1 reaches the public hosts only.
        let want = ip != "2001:db8:2:1::2";
        assert_eq!(out.status.success(), want, "c1 ping {ip}: {out:?}");
    }
    let out = std::process::Command::new("ip")
        .args(["-6", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let mut outside = vec!["2606:4700:4700::1111".to_string()];
    outside.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().nth(3))
            .filter_map(|cidr| cidr.split('/').next().map(str::to_string)),
    );
    for node in topo.nodes() {
        for addr in &outside {
            let out = node
                .ns()
                .exec_unchecked(&["ip", "-6", "route", "get", addr])
                .unwrap();
            assert!(
                !out.status.success(),
                "{} has a route to {addr}: {out:?}",
                node.name()
            );
        }
    }
    drop(topo);
    assert!(namespaces_with_prefix(&prefix).unwrap().is_empty());
}
