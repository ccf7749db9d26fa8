//! Inbound UDP in userspace networking: a datagram from a peer to port P of our tailnet address
//! goes to the host's loopback port P from a socket of its own per (peer, port) flow, so the
//! service's replies find their way back to that peer (Go's userspace mode does the same).
//! Flows are bounded ([`MAX_FLOWS`]) and forgotten after [`FLOW_IDLE`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::user::{Command, Datagram};

/// (peer, port) flows at most.
pub const MAX_FLOWS: usize = 256;
/// A flow without a datagram either way for this long is closed.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Largest datagram read back from a loopback service.
const MAX_DATAGRAM: usize = 65535;

struct Flow {
    socket: Arc<UdpSocket>,
    last: Instant,
    reader: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

pub(super) struct UdpForwarder {
    flows: HashMap<(SocketAddr, SocketAddr), Flow>,
    replies: mpsc::Sender<Command>,
    dropped: u64,
    last_expiry: Instant,
}

impl UdpForwarder {
    /// Replies go back to the stack as [`Command::UdpReply`] on `replies`.
    pub(super) fn new(replies: mpsc::Sender<Command>) -> Self {
        UdpForwarder {
            flows: HashMap::new(),
            replies,
            dropped: 0,
            last_expiry: Instant::now(),
        }
    }

    /// Sends a peer's datagram to the loopback service on its port.
    pub(super) fn forward(&mut self, datagram: Datagram) {
        let key = (datagram.local, datagram.remote);
        if !self.flows.contains_key(&key) {
            if self.flows.len() >= MAX_FLOWS {
                self.dropped += 1;
                return;
            }
            match self.open(datagram.local, datagram.remote) {
                Ok(flow) => {
                    self.flows.insert(key, flow);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP flow to loopback");
                    self.dropped += 1;
                    return;
                }
            }
        }
        if let Some(flow) = self.flows.get_mut(&key) {
            flow.last = Instant::now();
            // Nothing listening (ECONNREFUSED) or a full buffer: lost, as UDP is.
            let _ = flow.socket.try_send(&datagram.data);
        }
    }

    /// A connected socket to the loopback port and the task that reads its replies.
    fn open(&self, local: SocketAddr, remote: SocketAddr) -> std::io::Result<Flow> {
        let (bind, loopback): (SocketAddr, IpAddr) = if local.is_ipv4() {
            (([127, 0, 0, 1], 0).into(), [127, 0, 0, 1].into())
        } else {
            ((Ipv6Addr::LOCALHOST, 0).into(), Ipv6Addr::LOCALHOST.into())
        };
        let std_socket = std::net::UdpSocket::bind(bind)?;
        std_socket.connect(SocketAddr::new(loopback, local.port()))?;
        std_socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std_socket)?);
        let reader = tokio::spawn(read_replies(
            socket.clone(),
            local,
            remote,
            self.replies.clone(),
        ));
        Ok(Flow {
            socket,
            last: Instant::now(),
            reader,
        })
    }

    /// Closes idle flows (checked at most once a second).
    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_expiry) < Duration::from_secs(1) {
            return;
        }
        self.last_expiry = now;
        self.flows
            .retain(|_, flow| now.duration_since(flow.last) < FLOW_IDLE);
    }

    /// Datagrams dropped since the last call.
    pub(super) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

async fn read_replies(
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    remote: SocketAddr,
    replies: mpsc::Sender<Command>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) => {
                let datagram = Datagram {
                    local,
                    remote,
                    data: buf[..n].to_vec(),
                };
                if replies.send(Command::UdpReply(datagram)).await.is_err() {
                    return;
                }
            }
            // ECONNREFUSED after a send to a closed port: keep reading, the service may start.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
