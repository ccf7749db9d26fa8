//! The userspace TCP/IP stack (smoltcp) for tern's own services on the tailnet: today quad-100
//! (100.100.100.100 and fd7a:115c:a1e0::53), DNS over UDP and TCP port 53, and ICMP echo.
//!
//! Sans-IO: [`Netstack`] takes IP packets ([`Netstack::inject`]), hands out the DNS queries its
//! sockets received ([`Netstack::poll`] → [`DnsRequest`]), takes the answers back
//! ([`Netstack::reply`]) and queues the IP packets to send ([`Netstack::take_output`]). The
//! async glue ([`run`]) owns one `Netstack` in one task; in TUN mode the engine diverts only
//! packets to quad-100 to it, so bulk traffic never passes through smoltcp.
//!
//! smoltcp has no wildcard accept and no backlog: a few TCP sockets listen on each address ahead
//! of the SYN, and a new one is put in place as one is taken. What a client can make it hold is
//! bounded: [`MAX_TCP`] connections, 4 KiB queries, [`TCP_IDLE`] of silence.

mod device;
pub mod user;
mod user_udp;

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::sync::mpsc;

use device::QueueDevice;

/// Quad-100, IPv4.
pub const QUAD_100_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
/// Quad-100, IPv6.
pub const QUAD_100_V6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0x53);
/// DNS port.
pub const DNS_PORT: u16 = 53;
/// Most DNS-over-TCP connections open at once (listening ones included).
pub const MAX_TCP: usize = 32;
/// Idle listeners kept ready per address.
const LISTENERS_PER_ADDR: usize = 2;
/// A TCP client that sends nothing for this long is cut off (Go: 45 s).
pub const TCP_IDLE: Duration = Duration::from_secs(45);
/// Largest DNS query accepted (TCP length prefix or UDP datagram).
pub const MAX_QUERY: usize = 4096;
/// The MTU towards the TUN.
const MTU: usize = 1280;
/// Packets waiting in either direction at most (more are dropped and counted).
const QUEUE: usize = 256;

/// Whether `ip` is one of quad-100's addresses (the engine diverts those to the netstack).
pub fn is_quad_100(ip: IpAddr) -> bool {
    ip == IpAddr::V4(QUAD_100_V4) || ip == IpAddr::V6(QUAD_100_V6)
}

/// Whether an IP packet is addressed to quad-100, from its raw header (cheap enough for every
/// packet the TUN gives the engine).
pub fn to_quad_100(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(16..20) == Some(&QUAD_100_V4.octets()[..]),
        Some(6) => packet.get(24..40) == Some(&QUAD_100_V6.octets()[..]),
        _ => false,
    }
}

/// Where an answer goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestId {
    Udp {
        socket: SocketHandle,
        client: IpEndpoint,
        local: IpAddress,
    },
    Tcp {
        socket: SocketHandle,
    },
}

/// One DNS query a client sent to quad-100.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRequest {
    pub id: RequestId,
    pub query: Vec<u8>,
}

impl DnsRequest {
    /// Whether it came over TCP (the forwarder then uses TCP too).
    pub fn tcp(&self) -> bool {
        matches!(self.id, RequestId::Tcp { .. })
    }
}

/// What the netstack counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetstackCounters {
    pub packets_in: u64,
    pub packets_out: u64,
    /// Dropped because a queue was full.
    pub queue_full: u64,
    pub udp_queries: u64,
    pub tcp_queries: u64,
    pub tcp_connections: u64,
    /// TCP connections refused or cut: over [`MAX_TCP`], oversized query, idle.
    pub tcp_aborted: u64,
    /// UDP datagrams over [`MAX_QUERY`] or answers that did not fit.
    pub oversized: u64,
}

struct TcpConn {
    handle: SocketHandle,
    addr: IpAddress,
    /// Bytes of a query read so far (length prefix included).
    pending: Vec<u8>,
    last_active: SmolInstant,
    counted: bool,
}

/// The stack and its quad-100 sockets.
pub struct Netstack {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    udp: Vec<SocketHandle>,
    tcp: Vec<TcpConn>,
    addrs: Vec<IpAddress>,
    counters: NetstackCounters,
    epoch: std::time::Instant,
}

impl Netstack {
    /// Quad-100 on IPv4 (and IPv6 when `ipv6`).
    pub fn new(ipv6: bool) -> Self {
        let mut device = QueueDevice::new(MTU, QUEUE);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let epoch = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut device, SmolInstant::from_millis(0));
        let mut addrs = vec![IpAddress::from(QUAD_100_V4)];
        if ipv6 {
            addrs.push(IpAddress::from(QUAD_100_V6));
        }
        iface.update_ip_addrs(|ips| {
            for addr in &addrs {
                let prefix = if addr.version() == smoltcp::wire::IpVersion::Ipv4 {
                    32
                } else {
                    128
                };
                let _ = ips.push(IpCidr::new(*addr, prefix));
            }
        });
        // Every client is "elsewhere": default routes make smoltcp answer anyone (Medium::Ip
        // has no neighbours to resolve).
        let _ = iface.routes_mut().add_default_ipv4_route(QUAD_100_V4);
        if ipv6 {
            let _ = iface.routes_mut().add_default_ipv6_route(QUAD_100_V6);
        }
        let mut stack = Netstack {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            udp: Vec::new(),
            tcp: Vec::new(),
            addrs,
            counters: NetstackCounters::default(),
            epoch,
        };
        for addr in stack.addrs.clone() {
            stack.bind_udp(addr);
        }
        stack.refill_listeners(stack.now());
        stack
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn bind_udp(&mut self, addr: IpAddress) {
        let buffer =
            || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1024]);
        let mut socket = udp::Socket::new(buffer(), buffer());
        if socket
            .bind(IpListenEndpoint {
                addr: Some(addr),
                port: DNS_PORT,
            })
            .is_ok()
        {
            self.udp.push(self.sockets.add(socket));
        }
    }

    /// Keeps [`LISTENERS_PER_ADDR`] sockets listening on each address, within [`MAX_TCP`].
    fn refill_listeners(&mut self, now: SmolInstant) {
        for addr in self.addrs.clone() {
            let listening = self
                .tcp
                .iter()
                .filter(|c| {
                    c.addr == addr
                        && self.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen
                })
                .count();
            for _ in listening..LISTENERS_PER_ADDR {
                if self.tcp.len() >= MAX_TCP {
                    return;
                }
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0u8; MAX_QUERY + 2]),
                    tcp::SocketBuffer::new(vec![0u8; 16 * 1024]),
                );
                let endpoint = IpListenEndpoint {
                    addr: Some(addr),
                    port: DNS_PORT,
                };
                // Answers are whole messages: no reason to hold one back (Nagle).
                socket.set_nagle_enabled(false);
                socket.set_ack_delay(None);
                if socket.listen(endpoint).is_err() {
                    return;
                }
                self.tcp.push(TcpConn {
                    handle: self.sockets.add(socket),
                    addr,
                    pending: Vec::new(),
                    last_active: now,
                    counted: false,
                });
            }
        }
    }

    /// An IP packet for quad-100 (from the TUN or WireGuard). Returns false when dropped (queue full).
    pub fn inject(&mut self, packet: &[u8]) -> bool {
        self.counters.packets_in += 1;
        if self.device.push_rx(packet) {
            true
        } else {
            self.counters.queue_full += 1;
            false
        }
    }

    /// Runs the stack: answers ICMP, moves TCP along, and returns the DNS queries received.
    pub fn poll(&mut self) -> Vec<DnsRequest> {
        let now = self.now();
        self.iface.poll_maintenance(now);
        // One packet at a time, a listener put back after each: a burst of SYNs finds one.
        while self
            .iface
            .poll_ingress_single(now, &mut self.device, &mut self.sockets)
            != PollIngressSingleResult::None
        {
            self.refill_listeners(now);
        }
        let mut requests = self.udp_queries();
        requests.extend(self.tcp_queries(now));
        // Resets of aborted connections go out before their sockets are dropped.
        self.iface
            .poll_egress(now, &mut self.device, &mut self.sockets);
        self.reap_tcp(now);
        self.refill_listeners(now);
        requests
    }

    fn udp_queries(&mut self) -> Vec<DnsRequest> {
        let mut out = Vec::new();
        for &handle in &self.udp {
            let socket = self.sockets.get_mut::<udp::Socket>(handle);
            // Read in place from the socket's buffer: no per-poll scratch buffer.
            while let Ok((datagram, meta)) = socket.recv() {
                if datagram.len() > MAX_QUERY {
                    self.counters.oversized += 1;
                    continue;
                }
                let Some(local) = meta.local_address else {
                    continue;
                };
                self.counters.udp_queries += 1;
                out.push(DnsRequest {
                    id: RequestId::Udp {
                        socket: handle,
                        client: meta.endpoint,
                        local,
                    },
                    query: datagram.to_vec(),
                });
            }
        }
        out
    }

    fn tcp_queries(&mut self, now: SmolInstant) -> Vec<DnsRequest> {
        let mut out = Vec::new();
        for conn in &mut self.tcp {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            if socket.is_active() && socket.state() != tcp::State::Listen && !conn.counted {
                conn.counted = true;
                self.counters.tcp_connections += 1;
            }
            let mut chunk = [0u8; 1024];
            while socket.can_recv() {
                match socket.recv_slice(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        conn.pending.extend_from_slice(&chunk[..n]);
                        conn.last_active = now;
                    }
                }
            }
            // Pipelined queries: every complete length-prefixed message.
            while let Some(len) = conn
                .pending
                .get(..2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            {
                if len == 0 || len > MAX_QUERY {
                    socket.abort();
                    conn.pending.clear();
                    self.counters.tcp_aborted += 1;
                    break;
                }
                if conn.pending.len() < 2 + len {
                    break;
                }
                let query: Vec<u8> = conn.pending.drain(..2 + len).skip(2).collect();
                self.counters.tcp_queries += 1;
                out.push(DnsRequest {
                    id: RequestId::Tcp {
                        socket: conn.handle,
                    },
                    query,
                });
            }
        }
        out
    }

    /// Drops closed connections and cuts idle ones.
    fn reap_tcp(&mut self, now: SmolInstant) {
        let idle = smoltcp::time::Duration::from_micros(TCP_IDLE.as_micros() as u64);
        let sockets = &mut self.sockets;
        let counters = &mut self.counters;
        self.tcp.retain(|conn| {
            let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
            let state = socket.state();
            if state == tcp::State::Listen {
                return true;
            }
            if state == tcp::State::Closed {
                sockets.remove(conn.handle);
                return false;
            }
            if now - conn.last_active > idle {
                socket.abort();
                counters.tcp_aborted += 1;
            } else if state == tcp::State::CloseWait {
                socket.close(); // the client is done sending: finish our side
            }
            true
        });
    }

    /// The answer to `id`'s query (dropped when the client is gone or it does not fit).
    pub fn reply(&mut self, id: RequestId, answer: &[u8]) {
        match id {
            RequestId::Udp {
                socket,
                client,
                local,
            } => {
                let meta = udp::UdpMetadata {
                    endpoint: client,
                    local_address: Some(local),
                    meta: Default::default(),
                };
                if let Some(s) = self.udp.contains(&socket).then_some(socket) {
                    if self
                        .sockets
                        .get_mut::<udp::Socket>(s)
                        .send_slice(answer, meta)
                        .is_err()
                    {
                        self.counters.oversized += 1;
                    }
                }
            }
            RequestId::Tcp { socket } => {
                let Ok(len) = u16::try_from(answer.len()) else {
                    self.counters.oversized += 1;
                    return;
                };
                let now = self.now();
                if let Some(conn) = self.tcp.iter_mut().find(|c| c.handle == socket) {
                    conn.last_active = now;
                    let s = self.sockets.get_mut::<tcp::Socket>(socket);
                    let fits = s.send_capacity() - s.send_queue() >= answer.len() + 2;
                    if s.may_send() && fits {
                        let _ = s.send_slice(&len.to_be_bytes());
                        let _ = s.send_slice(answer);
                    } else {
                        self.counters.oversized += 1;
                    }
                }
            }
        }
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
    }

    /// IP packets to send (to the TUN in TUN mode).
    pub fn take_output(&mut self) -> Vec<Vec<u8>> {
        let out = self.device.take_tx();
        self.counters.packets_out += out.len() as u64;
        out
    }

    /// How long until the stack wants [`Self::poll`] again (TCP timers); `None` = no timer.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        let tcp_timer = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(Duration::from);
        // Idle cut-offs are checked on a slow clock of their own.
        let idle_check = self
            .tcp
            .iter()
            .any(|c| self.sockets.get::<tcp::Socket>(c.handle).state() != tcp::State::Listen);
        match (tcp_timer, idle_check) {
            (Some(t), true) => Some(t.min(Duration::from_secs(5))),
            (Some(t), false) => Some(t),
            (None, true) => Some(Duration::from_secs(5)),
            (None, false) => None,
        }
    }

    pub fn counters(&self) -> NetstackCounters {
        self.counters
    }

    /// Open TCP connections (not listening).
    pub fn tcp_connections(&self) -> usize {
        self.tcp
            .iter()
            .filter(|c| self.sockets.get::<tcp::Socket>(c.handle).state() != tcp::State::Listen)
            .count()
    }
}

/// An answer now, later (a forwarded query), or none (dropped).
pub enum Reply {
    Now(Vec<u8>),
    Later(Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>>),
    None,
}

/// What answers the DNS queries quad-100 receives.
pub trait DnsService: Send + Sync + 'static {
    fn query(&self, query: &[u8], tcp: bool) -> Reply;
}

/// Queries being forwarded at most (Go: 256; more are answered by nobody, as dropped).
pub const MAX_IN_FLIGHT: usize = 256;

/// The netstack task: packets for quad-100 come in on `inbound`, packets it sends go out on
/// `outbound`; runs until `inbound` closes.
pub async fn run(
    ipv6: bool,
    mut inbound: mpsc::Receiver<Vec<u8>>,
    outbound: mpsc::Sender<Vec<u8>>,
    service: Arc<dyn DnsService>,
    counters: tokio::sync::watch::Sender<NetstackCounters>,
) {
    let mut stack = Netstack::new(ipv6);
    let (done_tx, mut done_rx) = mpsc::channel::<(RequestId, Vec<u8>)>(MAX_IN_FLIGHT);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let delay = stack.poll_delay().unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            packet = inbound.recv() => match packet {
                Some(p) => { stack.inject(&p); }
                None => return,
            },
            Some((id, answer)) = done_rx.recv() => stack.reply(id, &answer),
            _ = tokio::time::sleep(delay) => {}
        }
        for request in stack.poll() {
            match service.query(&request.query, request.tcp()) {
                Reply::Now(answer) => stack.reply(request.id, &answer),
                Reply::Later(fut) => {
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        continue; // too many in flight: as if lost
                    };
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        if let Some(answer) = fut.await {
                            let _ = done.send((request.id, answer)).await;
                        }
                        drop(permit);
                    });
                }
                Reply::None => {}
            }
        }
        for packet in stack.take_output() {
            if outbound.try_send(packet).is_err() {
                stack.counters.queue_full += 1;
            }
        }
        counters.send_if_modified(|c| std::mem::replace(c, stack.counters()) != *c);
    }
}

/// Packets waiting in a bounded queue, pure.
pub(crate) type PacketQueue = VecDeque<Vec<u8>>;

#[cfg(test)]
mod tests;
