//! Hearing about host changes instead of polling for them: netlink multicast groups announce
//! every change to ip rules and addresses (rtnetlink) and to the nftables ruleset (nfnetlink,
//! which also carries iptables-nft's changes). The daemon re-checks its rules when something
//! changed, and only rarely otherwise; listing the firewall means spawning `iptables`/`nft`,
//! which is most of what an idle daemon would spend.
//!
//! The messages themselves are not parsed: any message means "look again". A socket whose queue
//! overflowed (`ENOBUFS`) lost messages, which also means "look again".

use std::io;

use netlink_sys::{protocols, Socket};
use tokio::io::unix::AsyncFd;

/// rtnetlink groups: IPv4/IPv6 addresses and policy rules (linux/rtnetlink.h).
const ROUTE_GROUPS: [u32; 4] = [
    libc::RTNLGRP_IPV4_IFADDR,
    libc::RTNLGRP_IPV4_RULE,
    libc::RTNLGRP_IPV6_IFADDR,
    libc::RTNLGRP_IPV6_RULE,
];

/// Bytes read per `recv` while draining (a message larger than this is cut: all we need is
/// that it came).
const DRAIN_BUF: usize = 16 * 1024;

/// Netlink sockets subscribed to the host's rule, address and firewall changes, in the network
/// namespace of the thread that opened them.
pub struct HostWatch {
    route: AsyncFd<Socket>,
    /// None where nfnetlink cannot be joined (no nf_tables in the kernel).
    netfilter: Option<AsyncFd<Socket>>,
}

impl HostWatch {
    /// Joins the groups; must run inside a tokio runtime. Fails only when rtnetlink's do.
    pub fn open() -> io::Result<Self> {
        let route = subscribed(protocols::NETLINK_ROUTE, &ROUTE_GROUPS)?;
        let nftables = [libc::NFNLGRP_NFTABLES as u32];
        let netfilter = match subscribed(protocols::NETLINK_NETFILTER, &nftables) {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::debug!(error = %e, "nftables change notifications unavailable");
                None
            }
        };
        Ok(Self {
            route: registered(route)?,
            netfilter: netfilter.map(registered).transpose()?,
        })
    }

    /// Whether nftables changes (also iptables-nft's) are announced here.
    pub fn sees_netfilter(&self) -> bool {
        self.netfilter.is_some()
    }

    /// Waits until something changed, then takes every queued announcement of that socket,
    /// so that one burst (a whole `nft flush ruleset`) is one wakeup.
    pub async fn changed(&self) -> io::Result<()> {
        match &self.netfilter {
            Some(nf) => tokio::select! {
                r = drained(&self.route) => r,
                r = drained(nf) => r,
            },
            None => drained(&self.route).await,
        }
    }
}

/// A non-blocking netlink socket of `protocol` that has joined `groups`.
fn subscribed(protocol: isize, groups: &[u32]) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.set_non_blocking(true)?;
    for &group in groups {
        socket.add_membership(group)?;
    }
    Ok(socket)
}

/// `socket` in the runtime's reactor, for reading.
fn registered(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: a Socket owns its fd: it stays open and the same until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// Waits until `socket` has messages, then reads and discards all of them (the readiness is
/// cleared when it is empty). An overflow (`ENOBUFS`) only means messages were lost, which the
/// caller treats like any change.
async fn drained(socket: &AsyncFd<Socket>) -> io::Result<()> {
    let mut guard = socket.readable().await?;
    let mut buf = Vec::with_capacity(DRAIN_BUF);
    loop {
        buf.clear();
        match guard.try_io(|socket| socket.get_ref().recv(&mut buf, 0)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EINTR)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => return Ok(()),
        }
    }
}
