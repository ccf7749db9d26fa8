//! The whole data plane in userspace (`--tun userspace-networking`): WireGuard hands every
//! decrypted packet to this smoltcp stack instead of a kernel TUN, and the stack's packets go
//! back to WireGuard.
//!
//! * Inbound TCP to the node's tailnet addresses is forwarded to `127.0.0.1` (or `::1`) on the
//!   same port, as Go's userspace mode does: the SYN is looked at before smoltcp sees it and a
//!   listener put in place for it (smoltcp has no wildcard accept); once the handshake is done
//!   the connection is handed out as an [`Accepted`] stream.
//! * Outbound TCP for the SOCKS5 and HTTP proxies: [`Command::Connect`] → a stream once the
//!   handshake with the peer is done.
//!
//! Each connection's bytes cross between smoltcp's buffers and a `tokio::io::DuplexStream` whose
//! other half the application holds; the task is woken by the duplexes' wakers, by packets and
//! by smoltcp's timers. What it may hold is bounded: [`MAX_CONNS`] connections, fixed buffers.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use ipnet::IpNet;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::dns::config::MagicDnsConfig;

use super::device::QueueDevice;
use crate::packet::{proto, tcp_flags, PacketSummary};

/// TCP connections at most, both directions and half-open ones included.
pub const MAX_CONNS: usize = 256;
/// smoltcp's receive and send buffer per connection (the TCP window; scaled above 64 KiB).
const TCP_BUFFER: usize = 256 * 1024;
/// The duplex buffer between the stack and the application, per direction.
const DUPLEX_BUFFER: usize = 64 * 1024;
/// A handshake (either way) that has not completed by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alives on idle connections; a peer that answers none for [`DEAD_PEER`] is cut off.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const DEAD_PEER: Duration = Duration::from_secs(120);
/// The MTU of the tailnet (WireGuard's inner packets).
pub const MTU: usize = 1280;
/// Packets waiting in either direction at most (more are dropped and counted).
const QUEUE: usize = 1024;
/// UDP ports of our addresses with a socket at most (each forwards to the same loopback port).
pub const MAX_UDP_PORTS: usize = 64;
/// A UDP port's socket goes away after this long without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams waiting for the forwarder at most.
const UDP_QUEUE: usize = 256;
/// Ephemeral ports for outbound connections.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// Why an outbound connection failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DialError {
    #[error("the peer refused the connection")]
    Refused,
    #[error("no answer from the peer within {0:?}")]
    Timeout(Duration),
    #[error("no tailnet address of the same family to connect from")]
    NoSource,
    #[error("too many connections through the netstack ({MAX_CONNS})")]
    TooMany,
    #[error("the netstack is not running")]
    Gone,
}

/// What the rest of the daemon asks the stack.
#[derive(Debug)]
pub enum Command {
    /// A TCP connection to a tailnet address.
    Connect {
        remote: SocketAddr,
        reply: oneshot::Sender<Result<DuplexStream, DialError>>,
    },
    /// The node's tailnet addresses (from the netmap).
    SetAddresses(Vec<IpAddr>),
    /// Reset an accepted connection (nothing listens on the local port).
    Abort(ConnId),
    /// A reply from a loopback UDP service to a peer.
    UdpReply(Datagram),
}

/// A UDP datagram between a peer (`remote`) and one of our tailnet addresses (`local`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub data: Vec<u8>,
}

/// One connection's identity inside the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(SocketHandle);

/// An inbound connection whose handshake is done.
#[derive(Debug)]
pub struct Accepted {
    pub id: ConnId,
    /// Our tailnet address and the port the peer connected to.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub stream: DuplexStream,
}

/// What the user stack counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UserCounters {
    pub packets_in: u64,
    pub packets_out: u64,
    /// Dropped because a queue was full.
    pub queue_full: u64,
    pub tcp_inbound: u64,
    pub tcp_outbound: u64,
    /// SYNs turned away because [`MAX_CONNS`] were open (smoltcp answers with a reset).
    pub tcp_refused_full: u64,
    /// Connections that never finished their handshake.
    pub handshake_timeouts: u64,
    pub open_connections: u64,
    /// UDP datagrams from peers to our addresses, and replies sent back.
    pub udp_in: u64,
    pub udp_out: u64,
    /// UDP datagrams dropped: over [`MAX_UDP_PORTS`] ports, a full queue, or too large.
    pub udp_dropped: u64,
}

enum Kind {
    /// Waiting for a peer's SYN, or past it.
    Inbound,
    Outbound {
        reply: Option<oneshot::Sender<Result<DuplexStream, DialError>>>,
    },
}

/// A UDP socket on one of our addresses and ports, for inbound forwarding.
struct UdpPort {
    handle: SocketHandle,
    local: IpEndpoint,
    last_active: SmolInstant,
}

struct Conn {
    handle: SocketHandle,
    /// The stack's half of the duplex; the other half goes to the application once connected.
    stream: DuplexStream,
    app: Option<DuplexStream>,
    kind: Kind,
    created: SmolInstant,
    /// The application closed its sending side: our FIN is queued.
    app_eof: bool,
    /// The peer's FIN was passed on to the application.
    peer_eof: bool,
    /// The application dropped its half: what the peer still sends has nowhere to go.
    app_gone: bool,
    /// Inbound: the peer whose SYN this listener was put up for.
    syn_from: Option<IpEndpoint>,
}

/// The stack, its connections and the packets it exchanges with WireGuard.
pub struct UserStack {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    addrs: Vec<IpAddr>,
    conns: Vec<Conn>,
    udp: Vec<UdpPort>,
    udp_in: Vec<Datagram>,
    accepted: VecDeque<Accepted>,
    next_port: u16,
    counters: UserCounters,
    epoch: std::time::Instant,
}

impl UserStack {
    pub fn new() -> Self {
        let mut device = QueueDevice::new(MTU, QUEUE);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let iface = Interface::new(config, &mut device, SmolInstant::from_millis(0));
        UserStack {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            addrs: Vec::new(),
            conns: Vec::new(),
            udp: Vec::new(),
            udp_in: Vec::new(),
            accepted: VecDeque::new(),
            next_port: *EPHEMERAL.start() + rand::random::<u16>() % 1000,
            counters: UserCounters::default(),
            epoch: std::time::Instant::now(),
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// The node's tailnet addresses: what it answers for and connects from.
    pub fn set_addresses(&mut self, addrs: &[IpAddr]) {
        if self.addrs == addrs {
            return;
        }
        self.addrs = addrs.to_vec();
        self.iface.update_ip_addrs(|ips| {
            ips.clear();
            for addr in addrs {
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                let _ = ips.push(IpCidr::new(IpAddress::from(*addr), prefix));
            }
        });
        // Every peer is "elsewhere": with Medium::Ip a default route is all smoltcp needs.
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        routes.remove_default_ipv6_route();
        for addr in addrs {
            let _ = match addr {
                IpAddr::V4(v4) => routes.add_default_ipv4_route(*v4).map(|_| ()),
                IpAddr::V6(v6) => routes.add_default_ipv6_route(*v6).map(|_| ()),
            };
        }
    }

    /// A packet from WireGuard. Returns false when dropped (queue full).
    pub fn inject(&mut self, packet: &[u8]) -> bool {
        self.counters.packets_in += 1;
        if let Ok(summary) = PacketSummary::parse(packet) {
            if self.addrs.contains(&summary.dst) {
                match summary.proto {
                    proto::TCP => self.prepare_listener(&summary),
                    proto::UDP => self.prepare_udp_port(&summary),
                    _ => {}
                }
            }
        }
        if self.device.push_rx(packet) {
            true
        } else {
            self.counters.queue_full += 1;
            false
        }
    }

    /// A SYN to one of our addresses gets a listener of its own before smoltcp sees it (unless
    /// one is there already, or the packet is a retransmission of a SYN being answered).
    /// Called only for TCP to our addresses.
    fn prepare_listener(&mut self, summary: &PacketSummary) {
        let syn = summary.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
        if !syn || summary.later_fragment {
            return;
        }
        let local = IpEndpoint::new(summary.dst.into(), summary.dst_port);
        let remote = IpEndpoint::new(summary.src.into(), summary.src_port);
        // One listener per SYN: smoltcp gives a listener to the first SYN that reaches it, so
        // a burst of SYNs to one port needs as many. A retransmitted SYN needs none: its
        // connection exists, or the listener put up for it is still waiting.
        let taken = self.conns.iter().any(|c| {
            let s = self.sockets.get::<tcp::Socket>(c.handle);
            let waiting = s.state() == tcp::State::Listen && c.syn_from == Some(remote);
            waiting || (s.local_endpoint() == Some(local) && s.remote_endpoint() == Some(remote))
        });
        if taken {
            return;
        }
        if self.conns.len() >= MAX_CONNS {
            self.counters.tcp_refused_full += 1;
            return;
        }
        let mut socket = new_socket();
        if socket.listen(IpListenEndpoint::from(local)).is_err() {
            return;
        }
        self.add_conn(socket, Kind::Inbound, Some(remote));
    }

    /// A connection in the making: its socket, and the duplex whose far half the application
    /// gets once it is established.
    fn add_conn(&mut self, socket: tcp::Socket<'static>, kind: Kind, syn_from: Option<IpEndpoint>) {
        let (stream, app) = tokio::io::duplex(DUPLEX_BUFFER);
        let handle = self.sockets.add(socket);
        let created = self.now();
        self.conns.push(Conn {
            handle,
            stream,
            app: Some(app),
            kind,
            created,
            app_eof: false,
            peer_eof: false,
            app_gone: false,
            syn_from,
        });
    }

    /// A UDP datagram to one of our addresses gets a socket on its port before smoltcp sees it
    /// (called only for UDP to our addresses).
    fn prepare_udp_port(&mut self, summary: &PacketSummary) {
        if summary.later_fragment {
            return;
        }
        let local = IpEndpoint::new(summary.dst.into(), summary.dst_port);
        if self.udp.iter().any(|u| u.local == local) {
            return;
        }
        if self.udp.len() >= MAX_UDP_PORTS {
            self.counters.udp_dropped += 1;
            return;
        }
        let buffer =
            || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1024]);
        let mut socket = udp::Socket::new(buffer(), buffer());
        if socket.bind(IpListenEndpoint::from(local)).is_ok() {
            let handle = self.sockets.add(socket);
            let now = self.now();
            self.udp.push(UdpPort {
                handle,
                local,
                last_active: now,
            });
        }
    }

    /// A reply from a loopback service, sent from our address and port to the peer.
    pub fn send_udp(&mut self, datagram: &Datagram) {
        let local = IpEndpoint::from(datagram.local);
        let now = self.now();
        let Some(port) = self.udp.iter_mut().find(|u| u.local == local) else {
            self.counters.udp_dropped += 1;
            return;
        };
        port.last_active = now;
        let meta = udp::UdpMetadata {
            endpoint: IpEndpoint::from(datagram.remote),
            local_address: Some(local.addr),
            meta: Default::default(),
        };
        let socket = self.sockets.get_mut::<udp::Socket>(port.handle);
        match socket.send_slice(&datagram.data, meta) {
            Ok(()) => self.counters.udp_out += 1,
            Err(_) => self.counters.udp_dropped += 1,
        }
    }

    /// Datagrams the UDP sockets received, and idle ports closed.
    fn collect_udp(&mut self, now: SmolInstant) {
        let idle = smoltcp::time::Duration::from_micros(UDP_IDLE.as_micros() as u64);
        for port in &mut self.udp {
            let socket = self.sockets.get_mut::<udp::Socket>(port.handle);
            while let Ok((data, meta)) = socket.recv() {
                port.last_active = now;
                if self.udp_in.len() >= UDP_QUEUE {
                    self.counters.udp_dropped += 1;
                    continue;
                }
                self.counters.udp_in += 1;
                self.udp_in.push(Datagram {
                    local: endpoint_addr(port.local),
                    remote: endpoint_addr(meta.endpoint),
                    data: data.to_vec(),
                });
            }
        }
        let sockets = &mut self.sockets;
        self.udp.retain(|port| {
            let keep = now - port.last_active <= idle;
            if !keep {
                sockets.remove(port.handle);
            }
            keep
        });
    }

    /// UDP datagrams for loopback services.
    pub fn take_udp(&mut self) -> Vec<Datagram> {
        std::mem::take(&mut self.udp_in)
    }

    /// Starts a connection to `remote`; the reply comes when the handshake is done or failed.
    pub fn connect(
        &mut self,
        remote: SocketAddr,
        reply: oneshot::Sender<Result<DuplexStream, DialError>>,
    ) {
        if self.conns.len() >= MAX_CONNS {
            let _ = reply.send(Err(DialError::TooMany));
            return;
        }
        let Some(source) = self
            .addrs
            .iter()
            .find(|a| a.is_ipv4() == remote.is_ipv4())
            .copied()
        else {
            let _ = reply.send(Err(DialError::NoSource));
            return;
        };
        let port = self.ephemeral_port();
        let mut socket = new_socket();
        let local = IpListenEndpoint {
            addr: Some(source.into()),
            port,
        };
        if socket
            .connect(self.iface.context(), IpEndpoint::from(remote), local)
            .is_err()
        {
            let _ = reply.send(Err(DialError::NoSource));
            return;
        }
        self.add_conn(socket, Kind::Outbound { reply: Some(reply) }, None);
    }

    /// The next ephemeral port no connection uses.
    fn ephemeral_port(&mut self) -> u16 {
        loop {
            let port = self.next_port;
            self.next_port = if port >= *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                port + 1
            };
            let used = self.conns.iter().any(|c| {
                self.sockets
                    .get::<tcp::Socket>(c.handle)
                    .local_endpoint()
                    .is_some_and(|e| e.port == port)
            });
            if !used {
                return port;
            }
        }
    }

    /// Resets an accepted connection.
    pub fn abort(&mut self, id: ConnId) {
        if self.conns.iter().any(|c| c.handle == id.0) {
            self.sockets.get_mut::<tcp::Socket>(id.0).abort();
        }
    }

    /// Runs the stack: packets in, bytes between sockets and applications, packets out. `cx`
    /// wakes the caller when an application reads or writes.
    pub fn poll(&mut self, cx: &mut Context<'_>) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        for conn in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            settle_handshake(conn, socket, &mut self.accepted, &mut self.counters);
            pump(conn, socket, cx);
        }
        self.collect_udp(now);
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.reap(now);
    }

    /// Drops finished connections and handshakes that took too long.
    fn reap(&mut self, now: SmolInstant) {
        let limit = smoltcp::time::Duration::from_micros(HANDSHAKE_TIMEOUT.as_micros() as u64);
        let sockets = &mut self.sockets;
        let counters = &mut self.counters;
        self.conns.retain_mut(|conn| {
            let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
            let state = socket.state();
            let connecting = conn.app.is_some();
            if connecting && now - conn.created > limit {
                counters.handshake_timeouts += 1;
                if let Kind::Outbound { reply } = &mut conn.kind {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Err(DialError::Timeout(HANDSHAKE_TIMEOUT)));
                    }
                }
                socket.abort();
                sockets.remove(conn.handle);
                return false;
            }
            // Closed or in TIME-WAIT, and what the peer sent has reached the application
            // (or the application is gone): done. TIME-WAIT itself is not needed with ports
            // chosen fresh for every connection.
            let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
                && (!socket.can_recv() || conn.app_gone);
            if finished && !connecting {
                sockets.remove(conn.handle);
                return false;
            }
            if state == tcp::State::Closed && connecting {
                // An outbound attempt the peer reset.
                if let Kind::Outbound { reply } = &mut conn.kind {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Err(DialError::Refused));
                    }
                }
                sockets.remove(conn.handle);
                return false;
            }
            true
        });
        self.counters.open_connections = self.conns.len() as u64;
    }

    /// Inbound connections ready for the application.
    pub fn take_accepted(&mut self) -> Vec<Accepted> {
        self.accepted.drain(..).collect()
    }

    /// Packets for WireGuard.
    pub fn take_output(&mut self) -> Vec<Vec<u8>> {
        let out = self.device.take_tx();
        self.counters.packets_out += out.len() as u64;
        out
    }

    /// How long until smoltcp's timers want a poll.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        let timer = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(Duration::from);
        // Handshake timeouts and idle UDP ports are checked on a slow clock of their own.
        let connecting = self.conns.iter().any(|c| c.app.is_some()) || !self.udp.is_empty();
        match (timer, connecting) {
            (Some(t), true) => Some(t.min(Duration::from_secs(1))),
            (None, true) => Some(Duration::from_secs(1)),
            (t, false) => t,
        }
    }

    pub fn counters(&self) -> UserCounters {
        self.counters
    }
}

impl Default for UserStack {
    fn default() -> Self {
        Self::new()
    }
}

fn new_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
    );
    socket.set_keep_alive(Some(KEEP_ALIVE.into()));
    socket.set_timeout(Some(DEAD_PEER.into()));
    // Bulk data and interactive use alike: no delayed ACKs holding a window back.
    socket.set_ack_delay(None);
    socket
}

/// An established connection's application half goes out: the reply of a connect, or the
/// queue of accepted ones.
fn settle_handshake(
    conn: &mut Conn,
    socket: &mut tcp::Socket<'static>,
    accepted: &mut VecDeque<Accepted>,
    counters: &mut UserCounters,
) {
    if conn.app.is_none() || !socket.may_send() {
        return;
    }
    let (Some(local), Some(remote)) = (socket.local_endpoint(), socket.remote_endpoint()) else {
        return;
    };
    let Some(app) = conn.app.take() else {
        return;
    };
    match &mut conn.kind {
        Kind::Outbound { reply } => {
            counters.tcp_outbound += 1;
            if let Some(reply) = reply.take() {
                if reply.send(Ok(app)).is_err() {
                    socket.abort(); // the dialer gave up meanwhile
                }
            }
        }
        Kind::Inbound => {
            counters.tcp_inbound += 1;
            accepted.push_back(Accepted {
                id: ConnId(conn.handle),
                local: endpoint_addr(local),
                remote: endpoint_addr(remote),
                stream: app,
            });
        }
    }
}

fn endpoint_addr(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(e.addr.into(), e.port)
}

/// Moves bytes both ways between a socket and its duplex, as far as buffers allow; what does
/// not fit waits in smoltcp (its window closes) or in the duplex (the application waits).
fn pump(conn: &mut Conn, socket: &mut tcp::Socket<'static>, cx: &mut Context<'_>) {
    if conn.app.is_some() {
        return; // not connected yet
    }
    app_to_socket(conn, socket, cx);
    socket_to_app(conn, socket, cx);
}

fn app_to_socket(conn: &mut Conn, socket: &mut tcp::Socket<'static>, cx: &mut Context<'_>) {
    while !conn.app_eof && socket.may_send() && socket.send_queue() < socket.send_capacity() {
        let stream = &mut conn.stream;
        let read = socket.send(|buf| {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    (n, Some(n))
                }
                Poll::Ready(Err(_)) => (0, Some(0)),
                Poll::Pending => (0, None),
            }
        });
        match read {
            Ok(Some(0)) => {
                // The application is done sending (or gone): FIN after what is queued.
                conn.app_eof = true;
                socket.close();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
}

fn socket_to_app(conn: &mut Conn, socket: &mut tcp::Socket<'static>, cx: &mut Context<'_>) {
    while socket.can_recv() {
        let stream = &mut conn.stream;
        let written = socket.recv(|buf| match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => (n, Ok(n)),
            Poll::Ready(Err(e)) => (0, Err(e)),
            Poll::Pending => (0, Ok(0)),
        });
        match written {
            Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                // The application dropped its half: nobody will read the rest.
                conn.app_gone = true;
                socket.abort();
                return;
            }
            Err(_) => break,
        }
    }
    let peer_done = !socket.may_recv() && socket.recv_queue() == 0;
    if !conn.peer_eof && peer_done && Pin::new(&mut conn.stream).poll_shutdown(cx).is_ready() {
        conn.peer_eof = true;
    }
}

/// Wakes the stack's task when an application's read or write can make progress.
struct TaskWaker(Arc<Notify>);

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// What the proxies need from the running data plane (the engine publishes it).
#[derive(Clone)]
pub struct TailnetDialer {
    /// The userspace stack (`None` in TUN mode: the kernel routes tailnet addresses).
    pub stack: Option<StackHandle>,
    /// MagicDNS as quad-100 answers it.
    pub dns: watch::Receiver<Arc<MagicDnsConfig>>,
    /// The prefixes the tailnet routes (tailnet ranges, accepted subnet routes).
    pub routes: watch::Receiver<Arc<Vec<IpNet>>>,
}

impl std::fmt::Debug for TailnetDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailnetDialer")
            .field("userspace", &self.stack.is_some())
            .finish_non_exhaustive()
    }
}

/// The handle the engine and the proxies hold.
#[derive(Clone)]
pub struct StackHandle {
    commands: mpsc::Sender<Command>,
    counters: watch::Receiver<UserCounters>,
    /// Packets for the stack dropped before it saw them (its queue was full).
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl StackHandle {
    /// A TCP connection to a tailnet address through the stack.
    pub async fn connect(&self, remote: SocketAddr) -> Result<DuplexStream, DialError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Connect { remote, reply })
            .await
            .map_err(|_| DialError::Gone)?;
        answer.await.map_err(|_| DialError::Gone)?
    }

    /// The node's tailnet addresses changed.
    pub fn set_addresses(&self, addrs: Vec<IpAddr>) {
        let _ = self.commands.try_send(Command::SetAddresses(addrs));
    }

    /// What the stack counted, with the drops in front of it.
    pub fn counters(&self) -> UserCounters {
        let mut counters = *self.counters.borrow();
        counters.queue_full += self.dropped.load(std::sync::atomic::Ordering::Relaxed);
        counters
    }

    /// A packet for the stack was dropped before it.
    pub fn note_dropped(&self) {
        self.dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl UserCounters {
    /// By name, for the status snapshot.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("packets_in", self.packets_in),
            ("packets_out", self.packets_out),
            ("queue_full", self.queue_full),
            ("tcp_inbound", self.tcp_inbound),
            ("tcp_outbound", self.tcp_outbound),
            ("tcp_refused_full", self.tcp_refused_full),
            ("handshake_timeouts", self.handshake_timeouts),
            ("open_connections", self.open_connections),
            ("udp_in", self.udp_in),
            ("udp_out", self.udp_out),
            ("udp_dropped", self.udp_dropped),
        ]
    }
}

/// What the task needs besides the stack.
pub struct StackIo {
    /// Decrypted packets from WireGuard.
    pub inbound: mpsc::Receiver<Vec<u8>>,
    /// The stack's packets, for WireGuard.
    pub outbound: mpsc::Sender<Vec<u8>>,
}

/// Starts the stack's task; inbound connections are forwarded to the host's loopback on the
/// same port. The task ends when `io.inbound` closes.
pub fn spawn(io: StackIo) -> (StackHandle, tokio::task::JoinHandle<()>) {
    let (commands_tx, commands) = mpsc::channel(QUEUE);
    let (counters_tx, counters) = watch::channel(UserCounters::default());
    let handle = StackHandle {
        commands: commands_tx.clone(),
        counters,
        dropped: Default::default(),
    };
    let task = tokio::spawn(run(io, commands, commands_tx, counters_tx));
    (handle, task)
}

async fn run(
    mut io: StackIo,
    mut commands: mpsc::Receiver<Command>,
    aborts: mpsc::Sender<Command>,
    counters: watch::Sender<UserCounters>,
) {
    let mut stack = UserStack::new();
    let mut udp = super::user_udp::UdpForwarder::new(aborts.clone());
    let notify = Arc::new(Notify::new());
    let waker = Waker::from(Arc::new(TaskWaker(notify.clone())));
    loop {
        let delay = stack.poll_delay().unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            packet = io.inbound.recv() => match packet {
                Some(p) => {
                    stack.inject(&p);
                    // A burst is handled in one poll.
                    while let Ok(p) = io.inbound.try_recv() {
                        stack.inject(&p);
                    }
                }
                None => return,
            },
            Some(command) = commands.recv() => match command {
                Command::Connect { remote, reply } => stack.connect(remote, reply),
                Command::SetAddresses(addrs) => stack.set_addresses(&addrs),
                Command::Abort(id) => stack.abort(id),
                Command::UdpReply(datagram) => stack.send_udp(&datagram),
            },
            _ = notify.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        stack.poll(&mut Context::from_waker(&waker));
        for accepted in stack.take_accepted() {
            tokio::spawn(forward_to_loopback(accepted, aborts.clone()));
        }
        for datagram in stack.take_udp() {
            udp.forward(datagram);
        }
        udp.expire();
        stack.counters.udp_dropped += udp.take_dropped();
        for packet in stack.take_output() {
            if io.outbound.try_send(packet).is_err() {
                stack.counters.queue_full += 1;
            }
        }
        counters.send_if_modified(|c| std::mem::replace(c, stack.counters()) != *c);
    }
}

/// An inbound connection to port P of our tailnet address goes to the host's loopback port P
/// (Go's userspace mode); nothing listening there resets the peer's connection.
async fn forward_to_loopback(accepted: Accepted, aborts: mpsc::Sender<Command>) {
    let loopback = if accepted.local.is_ipv4() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
    };
    let target = SocketAddr::new(loopback, accepted.local.port());
    let connect = tokio::net::TcpStream::connect(target);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Ok(Ok(mut local)) => {
            let mut stream = accepted.stream;
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut local).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(%target, remote = %accepted.remote, error = %e, "inbound connection: nothing on loopback");
            let _ = aborts.send(Command::Abort(accepted.id)).await;
        }
        Err(_) => {
            let _ = aborts.send(Command::Abort(accepted.id)).await;
        }
    }
}

#[cfg(test)]
#[path = "user_tests.rs"]
mod tests;
