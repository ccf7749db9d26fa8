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
    for node in topo.nodes() {
        let out = node
            .ns()
            .exec_unchecked(&["ip", "route", "get", "1.1.1.1"])
            .unwrap();
        assert!(
            !out.status.success(),
            "{} has a route outside: {out:?}",
            node.name()
        );
    }
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
    let _ = Netns::list();
}
