//! Hearing about host changes instead of polling for them: netlink multicast groups announce
//! every change to ip rules and addresses (rtnetlink) and to the nftables ruleset (nfnetlink,
//! which also carries iptables-nft's changes). The daemon re-checks its rules when something
//! changed, and only rarely otherwise; listing the firewall means spawning `iptables`/`nft`,
//! which is most of what an idle daemon would spend.
//!
//! The messages themselves are not parsed: any message means "look again". A socket whose queue
//! overflowed (`ENOBUFS`) lost messages, which also means "look again".

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// rtnetlink groups: IPv4/IPv6 addresses and policy rules (linux/rtnetlink.h).
const ROUTE_GROUPS: [libc::c_uint; 4] = [
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
    route: AsyncFd<OwnedFd>,
    /// None where nfnetlink cannot be joined (no nf_tables in the kernel).
    netfilter: Option<AsyncFd<OwnedFd>>,
}

impl HostWatch {
    /// Joins the groups; must run inside a tokio runtime. Fails only when rtnetlink's do.
    pub fn open() -> io::Result<Self> {
        let route = subscribed(libc::NETLINK_ROUTE, &ROUTE_GROUPS)?;
        let netfilter = match subscribed(libc::NETLINK_NETFILTER, &[libc::NFNLGRP_NFTABLES as _]) {
            Ok(fd) => Some(fd),
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
fn subscribed(protocol: libc::c_int, groups: &[libc::c_uint]) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_nl is valid (the kernel picks the port id).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `addr` is a sockaddr_nl of the size given.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    for &group in groups {
        // SAFETY: a valid fd and a c_uint option value of the right size.
        let joined = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                std::ptr::addr_of!(group).cast(),
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        if joined != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// `fd` in the runtime's reactor, for reading.
fn registered(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and the same for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// Waits until `fd` has messages, then reads and discards all of them (the readiness is
/// cleared when the socket is empty). An overflow (`ENOBUFS`) only means messages were lost,
/// which the caller treats like any change.
async fn drained(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    let mut guard = fd.readable().await?;
    let mut buf = [0u8; DRAIN_BUF];
    loop {
        match guard.try_io(|fd| recv_discard(fd.get_ref(), &mut buf)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EINTR)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => return Ok(()),
        }
    }
}

/// One non-blocking `recv` into `buf`, its content dropped.
fn recv_discard(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
