//! Fuzz the relay server's datagram handling: arbitrary bytes from a bound leg, a stranger, or
//! shaped as Geneve control/data for the live VNI never panic, and only a bound leg's data is
//! ever forwarded.

use std::net::SocketAddr;
use std::time::Instant;

use tern::disco::AllocateRequest;
use tern::keys::DiscoPrivate;
use tern::relay::server::{Action, RelayServer};

pub fn run(data: &[u8]) {
    let now = Instant::now();
    let mut server = RelayServer::new(now);
    server.set_addr_ports(vec![SocketAddr::from(([198, 51, 100, 7], 40000))]);
    let request = AllocateRequest {
        client_disco: [
            DiscoPrivate::generate().public(),
            DiscoPrivate::generate().public(),
        ],
        generation: 1,
    };
    let Ok(endpoint) = server.allocate(now, &request) else {
        return;
    };
    let from = SocketAddr::from(([192, 0, 2, 1], 1234));
    // As sent, then with a well-formed header for the live VNI in front (control and data).
    let mut shaped = Vec::with_capacity(data.len() + 8);
    for first_two in [[0x00, 0x80], [0x00, 0x00]] {
        shaped.clear();
        shaped.extend_from_slice(&first_two);
        shaped.extend_from_slice(&0x7a11u16.to_be_bytes());
        shaped.extend_from_slice(&(endpoint.vni << 8).to_be_bytes());
        shaped.extend_from_slice(data);
        let action = server.handle_packet(now, from, &shaped);
        assert!(!matches!(action, Action::Forward(_)), "nothing is bound");
    }
    let action = server.handle_packet(now, from, data);
    assert!(!matches!(action, Action::Forward(_)), "nothing is bound");
    server.expire(now);
}
