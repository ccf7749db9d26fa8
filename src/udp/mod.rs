//! UDP socket plumbing shared by the engine and the peer relay server: sockets with large
//! buffers, IPv4-mapped source addresses, GSO/GRO ([`offload`]) and our own endpoints
//! ([`endpoints`]).

pub mod endpoints;
pub mod offload;

use std::net::{IpAddr, SocketAddr};

use tokio::net::UdpSocket;

/// Socket buffer size asked for on the UDP sockets (Go magicsock's `socketBufferSize`).
const UDP_BUFFER_BYTES: usize = 7 << 20;

/// Large buffers as Go's magicsock asks for (7 MiB): bursts of WireGuard at line rate would
/// otherwise overflow the default ~200 KiB and be dropped. Like Go, the `…FORCE` options first
/// (root may exceed `net.core.{r,w}mem_max`, which a fresh network namespace keeps at the
/// default), then the plain ones (capped by the kernel).
fn set_buffer_sizes(socket: &socket2::Socket) {
    use std::os::fd::AsRawFd as _;
    let size = libc::c_int::try_from(UDP_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |option| {
            // SAFETY: a valid socket fd and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    std::ptr::addr_of!(size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(plain) != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "UDP socket buffer size");
        }
    }
}

/// A non-blocking UDP socket bound to `addr` (IPv6 sockets are v6-only) with large buffers and
/// the bypass mark (its packets never enter table 52).
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    set_buffer_sizes(&socket);
    crate::bypass::mark(socket2::SockRef::from(&socket));
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// An IPv4-mapped IPv6 source as the plain IPv4 address it is.
pub fn unmap_v4(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
