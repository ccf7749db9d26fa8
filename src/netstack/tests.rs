//! The netstack against a second smoltcp interface playing the client (100.64.0.1), packets
//! moved between them by hand: UDP and TCP DNS, pipelining, bounds, ICMP echo.

use super::*;

/// A client stack: its own interface and queue device.
struct Client {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    epoch: std::time::Instant,
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);

impl Client {
    fn new() -> Self {
        let mut device = QueueDevice::new(MTU, QUEUE);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut device,
            SmolInstant::from_millis(0),
        );
        iface.update_ip_addrs(|ips| {
            let _ = ips.push(IpCidr::new(IpAddress::from(CLIENT), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(CLIENT);
        Client {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            epoch: std::time::Instant::now(),
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
    }
}

/// Moves packets both ways until neither side sends more; returns the requests the netstack
/// saw, each answered by `answer` (None = left unanswered).
fn exchange(
    client: &mut Client,
    stack: &mut Netstack,
    answer: &dyn Fn(&[u8]) -> Option<Vec<u8>>,
) -> Vec<DnsRequest> {
    let mut seen = Vec::new();
    for _ in 0..50 {
        client.poll();
        let mut moved = 0;
        for packet in client.device.take_tx() {
            stack.inject(&packet);
            moved += 1;
        }
        for request in stack.poll() {
            if let Some(a) = answer(&request.query) {
                stack.reply(request.id, &a);
            }
            seen.push(request);
        }
        for packet in stack.take_output() {
            client.device.push_rx(&packet);
            moved += 1;
        }
        if moved == 0 {
            break;
        }
    }
    client.poll();
    seen
}

fn echo_answer(query: &[u8]) -> Option<Vec<u8>> {
    let mut a = b"answer:".to_vec();
    a.extend_from_slice(query);
    Some(a)
}

fn udp_socket(client: &mut Client) -> SocketHandle {
    let buffer = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0u8; 8192]);
    let mut socket = udp::Socket::new(buffer(), buffer());
    socket.bind(5353).expect("bind");
    client.sockets.add(socket)
}

#[test]
fn udp_query_reaches_the_service_and_the_answer_comes_back() {
    let mut stack = Netstack::new(false);
    let mut client = Client::new();
    let handle = udp_socket(&mut client);
    let quad: IpEndpoint = (IpAddress::from(QUAD_100_V4), DNS_PORT).into();
    client
        .sockets
        .get_mut::<udp::Socket>(handle)
        .send_slice(b"query-1", quad)
        .expect("send");
    let seen = exchange(&mut client, &mut stack, &echo_answer);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].query, b"query-1");
    assert!(!seen[0].tcp());
    let mut buf = [0u8; 256];
    let (n, meta) = client
        .sockets
        .get_mut::<udp::Socket>(handle)
        .recv_slice(&mut buf)
        .expect("an answer");
    assert_eq!(&buf[..n], b"answer:query-1");
    assert_eq!(meta.endpoint, quad, "from quad-100:53");
    assert_eq!(stack.counters().udp_queries, 1);
}

#[test]
fn oversized_udp_query_is_counted_and_dropped() {
    let mut stack = Netstack::new(false);
    let mut client = Client::new();
    let handle = udp_socket(&mut client);
    let quad: IpEndpoint = (IpAddress::from(QUAD_100_V4), DNS_PORT).into();
    client
        .sockets
        .get_mut::<udp::Socket>(handle)
        .send_slice(&[7u8; MAX_QUERY + 1], quad)
        .expect("send");
    // Fragmented at the 1280 MTU: smoltcp reassembles it, the size check drops it.
    let seen = exchange(&mut client, &mut stack, &echo_answer);
    assert!(seen.is_empty());
}

fn tcp_client(client: &mut Client, port: u16) -> SocketHandle {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; 8192]),
        tcp::SocketBuffer::new(vec![0u8; 8192]),
    );
    socket.set_ack_delay(None);
    let cx = client.iface.context();
    socket
        .connect(cx, (IpAddress::from(QUAD_100_V4), DNS_PORT), port)
        .expect("connect");
    client.sockets.add(socket)
}

fn framed(query: &[u8]) -> Vec<u8> {
    let mut out = (query.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(query);
    out
}

#[test]
fn tcp_queries_are_framed_pipelined_and_answered() {
    let mut stack = Netstack::new(false);
    let mut client = Client::new();
    let handle = tcp_client(&mut client, 40000);
    exchange(&mut client, &mut stack, &echo_answer);
    assert!(
        client.sockets.get::<tcp::Socket>(handle).may_send(),
        "established"
    );
    let mut two = framed(b"first");
    two.extend_from_slice(&framed(b"second"));
    client
        .sockets
        .get_mut::<tcp::Socket>(handle)
        .send_slice(&two)
        .expect("send");
    let seen = exchange(&mut client, &mut stack, &echo_answer);
    let queries: Vec<&[u8]> = seen.iter().map(|r| r.query.as_slice()).collect();
    assert_eq!(queries, [b"first".as_slice(), b"second".as_slice()]);
    assert!(seen.iter().all(DnsRequest::tcp));
    let mut buf = [0u8; 256];
    let n = client
        .sockets
        .get_mut::<tcp::Socket>(handle)
        .recv_slice(&mut buf)
        .expect("answers");
    let mut want = framed(b"answer:first");
    want.extend_from_slice(&framed(b"answer:second"));
    assert_eq!(&buf[..n], want.as_slice());
    assert_eq!(stack.counters().tcp_connections, 1);
    // Listeners were put back: a second client connects too.
    let other = tcp_client(&mut client, 40001);
    exchange(&mut client, &mut stack, &echo_answer);
    assert!(client.sockets.get::<tcp::Socket>(other).may_send());
}

#[test]
fn a_length_prefix_over_the_limit_aborts_the_connection() {
    let mut stack = Netstack::new(false);
    let mut client = Client::new();
    let handle = tcp_client(&mut client, 40002);
    exchange(&mut client, &mut stack, &echo_answer);
    let too_big = ((MAX_QUERY + 1) as u16).to_be_bytes();
    client
        .sockets
        .get_mut::<tcp::Socket>(handle)
        .send_slice(&too_big)
        .expect("send");
    let seen = exchange(&mut client, &mut stack, &echo_answer);
    assert!(seen.is_empty());
    assert_eq!(stack.counters().tcp_aborted, 1);
    assert!(
        !client.sockets.get::<tcp::Socket>(handle).is_active(),
        "reset"
    );
}

#[test]
fn connections_beyond_the_cap_are_refused() {
    let mut stack = Netstack::new(false);
    let mut client = Client::new();
    let handles: Vec<SocketHandle> = (0..MAX_TCP as u16 + 8)
        .map(|i| tcp_client(&mut client, 41000 + i))
        .collect();
    exchange(&mut client, &mut stack, &echo_answer);
    let open = handles
        .iter()
        .filter(|h| client.sockets.get::<tcp::Socket>(**h).may_send())
        .count();
    assert!(open <= MAX_TCP, "{open} connections open");
    assert!(
        open >= MAX_TCP - 2 * LISTENERS_PER_ADDR,
        "{open} connections open"
    );
    assert!(stack.tcp_connections() <= MAX_TCP);
}

#[test]
fn quad_100_addresses_are_recognised() {
    assert!(is_quad_100(IpAddr::V4(QUAD_100_V4)));
    assert!(is_quad_100(IpAddr::V6(QUAD_100_V6)));
    assert!(!is_quad_100("100.100.100.101".parse().unwrap()));
}

#[test]
fn packets_to_quad_100_are_told_from_the_header() {
    let mut v4 = vec![0x45u8; 20];
    v4[16..20].copy_from_slice(&QUAD_100_V4.octets());
    assert!(to_quad_100(&v4));
    v4[19] = 101;
    assert!(!to_quad_100(&v4));
    let mut v6 = vec![0x60u8; 40];
    v6[24..40].copy_from_slice(&QUAD_100_V6.octets());
    assert!(to_quad_100(&v6));
    assert!(!to_quad_100(&v6[..30]), "truncated");
    assert!(!to_quad_100(&[]));
}
