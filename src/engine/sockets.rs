//! The engine's UDP sockets (one per family on `--port`, shared by WireGuard, disco and STUN)
//! and its sends: consecutive datagrams to one address leave in one GSO `sendmsg`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;

use super::{Engine, EngineError};
use crate::udp::{self, offload};

/// One UDP socket per address family on `--port` (one socket per family; WireGuard,
/// disco and STUN share it).
pub(super) struct UdpSockets {
    pub(super) v4: Arc<UdpSocket>,
    pub(super) v6: Option<Arc<UdpSocket>>,
}

impl UdpSockets {
    pub(super) fn bind(port: u16) -> Result<Self, EngineError> {
        let err = |source| EngineError::Udp { port, source };
        let v4 =
            udp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).map_err(err)?;
        // The v6 socket takes the port v4 got (they differ only with --port 0).
        let port6 = v4.local_addr().map(|a| a.port()).unwrap_or(port);
        let v6 = match udp::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port6)) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                tracing::info!(error = %e, "no IPv6 UDP socket");
                None
            }
        };
        for socket in std::iter::once(&v4).chain(v6.as_deref()) {
            if !offload::enable_gro(socket) {
                tracing::debug!("UDP GRO not available: one datagram per read");
            }
        }
        Ok(Self {
            v4: Arc::new(v4),
            v6,
        })
    }

    /// The socket of `to`'s address family.
    pub(super) fn socket_for(&self, to: SocketAddr) -> std::io::Result<&UdpSocket> {
        match (to.is_ipv4(), &self.v6) {
            (true, _) => Ok(&self.v4),
            (false, Some(v6)) => Ok(v6),
            (false, None) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no IPv6 socket",
            )),
        }
    }

    /// Sends without waiting: a full socket buffer drops the datagram (as a network would).
    pub(super) fn send(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<()> {
        self.socket_for(to)?.try_send_to(datagram, to).map(|_| ())
    }

    /// Datagrams already waiting on either socket (`WouldBlock` when none are); with GRO on,
    /// one read may hold several (see [`offload::Received`]).
    pub(super) fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<offload::Received> {
        match offload::recv(&self.v4, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => match &self.v6 {
                Some(v6) => offload::recv(v6, buf),
                None => Err(e),
            },
            other => other,
        }
    }

    /// Waits for datagrams on either socket.
    pub(super) async fn recv(&self, buf: &mut [u8]) -> std::io::Result<offload::Received> {
        loop {
            let socket = match &self.v6 {
                Some(v6) => tokio::select! {
                    r = self.v4.readable() => r.map(|()| &self.v4)?,
                    r = v6.readable() => r.map(|()| v6)?,
                },
                None => {
                    self.v4.readable().await?;
                    &self.v4
                }
            };
            match offload::recv(socket, buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

impl Engine {
    /// Queues a datagram for UDP: consecutive ones to one address go out in one GSO send at
    /// the end of this turn of the event loop (or when the batch is full).
    pub(super) fn send_udp(&mut self, udp: &UdpSockets, to: SocketAddr, datagram: &[u8]) {
        if self.udp_forbidden() {
            return;
        }
        if !self.gso_enabled {
            return self.send_udp_now(udp, to, datagram);
        }
        if let Some(ready) = self.gso.push(to, datagram) {
            self.send_batch(udp, ready);
        }
    }

    /// Like [`Self::send_udp`] for the datagram `prefix ‖ payload`.
    pub(super) fn send_udp_parts(
        &mut self,
        udp: &UdpSockets,
        to: SocketAddr,
        prefix: &[u8],
        payload: &[u8],
    ) {
        if self.udp_forbidden() {
            return;
        }
        if !self.gso_enabled {
            let datagram = [prefix, payload].concat();
            return self.send_udp_now(udp, to, &datagram);
        }
        if let Some(ready) = self.gso.push_parts(to, prefix, payload) {
            self.send_batch(udp, ready);
        }
    }

    /// Sends what [`Self::send_udp`] batched.
    pub(super) fn flush_udp(&mut self, udp: &UdpSockets) {
        if let Some(ready) = self.gso.take() {
            self.send_batch(udp, ready);
        }
    }

    pub(super) fn send_batch(&mut self, udp: &UdpSockets, ready: offload::Ready) {
        if ready.count == 1 {
            return self.send_udp_now(udp, ready.dest, &ready.bytes);
        }
        let sent = udp
            .socket_for(ready.dest)
            .and_then(|socket| offload::send(socket, &ready));
        match sent {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.drops.udp_send_failed += ready.count as u64;
            }
            Err(e) => {
                tracing::info!(error = %e, "UDP GSO is not available here: sending datagrams one by one");
                self.gso_enabled = false;
                for datagram in ready.datagrams() {
                    self.send_udp_now(udp, ready.dest, datagram);
                }
            }
        }
    }

    pub(super) fn send_udp_now(&mut self, udp: &UdpSockets, to: SocketAddr, datagram: &[u8]) {
        if self.udp_forbidden() {
            return;
        }
        if let Err(e) = udp.send(to, datagram) {
            tracing::trace!(%to, error = %e, "UDP send failed");
            self.drops.udp_send_failed += 1;
        }
    }
}

impl Engine {
    /// Control's `only-tcp-443` on this node, from each netmap (Go `SetOnlyTCP443`): no UDP at
    /// all, so no direct or relay paths and no STUN; DERP over TCP carries everything.
    pub(super) fn update_only_tcp_443(&mut self, map: &crate::netmap::NetworkMap) {
        let on = map
            .self_node
            .as_ref()
            .is_some_and(|me| me.cap_map.contains_key(crate::relay::ATTR_ONLY_TCP_443));
        if on != self.udp_off {
            self.udp_off = on;
            self.only_tcp_443.send_replace(on);
            tracing::info!(
                "only-tcp-443 {}",
                if on {
                    "set by control: no UDP, DERP over TCP carries everything"
                } else {
                    "lifted: UDP again"
                }
            );
            self.netcheck_trigger.notify_one();
        }
    }

    /// Whether UDP may not be sent now (counted when so).
    fn udp_forbidden(&mut self) -> bool {
        if self.udp_off {
            self.drops.udp_only_tcp_443 += 1;
        }
        self.udp_off
    }
}
