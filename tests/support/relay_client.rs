//! A minimal relay client for tests and benches: a disco key and a UDP socket that binds one leg
//! of a relay endpoint (Bind, read the Challenge, Answer) with the wire formats of peer-relay.md.

use std::net::SocketAddr;
use std::time::Duration;

use tern::disco::{self, AllocateRequest, BindBody, Message, UdpRelayEndpoint};
use tern::keys::{DiscoPrivate, DiscoPublic};
use tern::relay::geneve::{self, Header, Vni, PROTOCOL_DISCO};
use tern::relay::io::RelayRuntime;
use tokio::net::UdpSocket;

pub fn geneve(vni: u32, protocol: u16, control: bool) -> Vec<u8> {
    let header = Header {
        version: 0,
        protocol,
        control,
        vni: Vni::new(vni),
    };
    header.to_bytes().expect("header").to_vec()
}

/// One relay client: a disco key and a socket in the relay's namespace.
pub struct Client {
    pub disco: DiscoPrivate,
    pub socket: UdpSocket,
}

impl Client {
    /// A client with a fresh disco key, its socket bound to `ip` (any port).
    pub async fn new(ip: &str) -> Client {
        Client {
            disco: DiscoPrivate::generate(),
            socket: UdpSocket::bind((ip, 0)).await.expect("client socket"),
        }
    }

    pub fn public(&self) -> DiscoPublic {
        self.disco.public()
    }

    pub async fn send_control(
        &self,
        to: SocketAddr,
        server: &DiscoPublic,
        vni: u32,
        msg: &Message,
    ) {
        let mut packet = geneve(vni, PROTOCOL_DISCO, true);
        packet.extend_from_slice(&disco::seal(&self.disco, server, msg));
        self.socket.send_to(&packet, to).await.expect("send");
    }

    pub async fn recv(&self) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 2048];
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(5), self.socket.recv_from(&mut buf))
                .await
                .expect("an answer within 5 s")
                .expect("recv");
        buf.truncate(n);
        (buf, from)
    }

    /// Bind, read the Challenge, Answer: this leg is bound from the client's socket address.
    pub async fn bind(
        &self,
        relay: SocketAddr,
        server: &DiscoPublic,
        vni: u32,
        other: DiscoPublic,
    ) {
        let bind = BindBody {
            vni,
            generation: 11,
            remote_key: other,
            challenge: [0; 32],
        };
        self.send_control(relay, server, vni, &Message::BindUdpRelayEndpoint(bind))
            .await;
        let (packet, from) = self.recv().await;
        assert_eq!(from, relay, "the challenge comes from the address bound to");
        let header = geneve::parse(&packet).expect("geneve");
        assert!(header.control && header.protocol == PROTOCOL_DISCO);
        let frame = disco::parse_packet(&packet[geneve::HEADER_LEN..]).expect("disco frame");
        assert_eq!(frame.sender, *server);
        let challenge = match disco::open(&disco::shared_box(&self.disco, server), &frame) {
            Ok(Message::BindUdpRelayEndpointChallenge(body)) => body,
            other => panic!("not a challenge: {other:?}"),
        };
        assert_eq!((challenge.vni, challenge.generation), (vni, 11));
        self.send_control(
            relay,
            server,
            vni,
            &Message::BindUdpRelayEndpointAnswer(challenge),
        )
        .await;
    }
}

/// Two clients on `ip`, with an endpoint allocated on `relay` (once it has an address to offer)
/// and both legs bound; returns them, the relay's address on `ip` and the endpoint.
pub async fn bound_pair(
    relay: &RelayRuntime,
    ip: &str,
) -> (Client, Client, SocketAddr, UdpRelayEndpoint) {
    let relay_addr: SocketAddr = format!("{ip}:{}", relay.port()).parse().expect("address");
    wait_until("address discovery", || {
        !relay.status().addr_ports.is_empty()
    })
    .await;
    let (a, b) = (Client::new(ip).await, Client::new(ip).await);
    let endpoint = relay
        .allocate(&AllocateRequest {
            client_disco: [a.public(), b.public()],
            generation: 1,
        })
        .expect("allocated");
    let (server, vni) = (endpoint.server_disco, endpoint.vni);
    a.bind(relay_addr, &server, vni, b.public()).await;
    b.bind(relay_addr, &server, vni, a.public()).await;
    wait_until("both legs bound", || {
        relay
            .status()
            .sessions
            .first()
            .is_some_and(|s| s.state == "open")
    })
    .await;
    (a, b, relay_addr, endpoint)
}

/// Polls `done` every 20 ms; panics after 10 s.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
