//! The relay server's runtime on real sockets, in a namespace of its own (192.0.2.1 on a veth is its
//! only address): it discovers that address, hands out an endpoint, runs the bind
//! handshake with two clients over UDP and forwards their datagrams unchanged both ways. Go
//! clients against it: tests/peer_relay.rs.

#[path = "support/relay_client.rs"]
mod relay_client;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use relay_client::{bound_pair, geneve};
use tern::relay::geneve::PROTOCOL_WIREGUARD;
use tern::relay::io::RelayRuntime;
use tokio::net::UdpSocket;
use tokio::sync::watch;

const RELAY_IP: &str = "192.0.2.1";

async fn relay_two_clients() {
    // The DERP map stays empty (no STUN): the interface address is all there is to offer.
    let (_regions_tx, regions) = watch::channel(BTreeMap::new());
    let relay = RelayRuntime::start(0, regions).expect("relay starts on a free port");
    let (a, b, relay_addr, endpoint) = bound_pair(&relay, RELAY_IP).await;
    // The interface address is what it offers (and the allocation carries).
    assert_eq!(relay.status().addr_ports, vec![relay_addr.to_string()]);
    assert_eq!(endpoint.addr_ports, vec![relay_addr]);
    let vni = endpoint.vni;

    // WireGuard-framed data both ways, byte for byte; garbage in between changes nothing.
    for (from, to, body) in [(&a, &b, b"from a".as_slice()), (&b, &a, b"from b, longer")] {
        let mut packet = geneve(vni, PROTOCOL_WIREGUARD, false);
        packet.extend_from_slice(body);
        from.socket
            .send_to(b"\x00junk", relay_addr)
            .await
            .expect("send junk");
        from.socket
            .send_to(&packet, relay_addr)
            .await
            .expect("send");
        let (got, src) = to.recv().await;
        assert_eq!(src, relay_addr);
        assert_eq!(got, packet);
    }
    let status = relay.status();
    assert_eq!(status.forwarded_packets, 2);
    assert_eq!(status.forwarded_bytes, 2 * 8 + 6 + 14);
    assert_eq!(status.allocations, 1);
    assert_eq!(status.drops.get("short"), Some(&2), "{:?}", status.drops);
    let session = &status.sessions[0];
    let bound: Vec<Option<String>> = session.legs.iter().map(|l| l.bound.clone()).collect();
    for client in [&a, &b] {
        let own = client.socket.local_addr().expect("addr").to_string();
        assert!(bound.contains(&Some(own.clone())), "{own} not in {bound:?}");
    }
    // Dropping the runtime closes the port.
    drop(relay);
    tokio::time::sleep(Duration::from_millis(50)).await;
    UdpSocket::bind(relay_addr)
        .await
        .expect("the relay port is free again after drop");
}

#[test]
fn relay_runtime_binds_two_clients_and_forwards_between_them() {
    support::in_namespace_with_address("relay", RELAY_IP, relay_two_clients);
}
