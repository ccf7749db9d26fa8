//! tern's own sockets (WireGuard/disco UDP, DERP and control TCP, netcheck) carry the bypass
//! mark 0x80000: the policy rules send marked traffic to `main`, never to table 52, so tern's own
//! packets cannot loop through its tunnel, also while an exit node takes the default route
//! (tailscaled's `net/netns`). Loopback destinations are left alone, as Go does.
//!
//! Setting a mark needs CAP_NET_ADMIN; without it the mark is skipped (logged once), which only
//! matters once routes in table 52 would catch tern's own traffic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpSocket, TcpStream};

pub use tern_platform::policy::BYPASS_MARK;

static WARNED: AtomicBool = AtomicBool::new(false);
/// Off in userspace networking: no table 52 to bypass (and no CAP_NET_ADMIN to set marks).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// No marks from now on (`--tun userspace-networking`).
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// Marks `socket` so its traffic bypasses table 52.
pub fn mark(socket: socket2::SockRef<'_>) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = socket.set_mark(BYPASS_MARK) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %e,
                "cannot set the bypass mark on tern's sockets (needs CAP_NET_ADMIN): with an exit \
                 node or subnet routes, tern's own traffic could loop"
            );
        }
    }
}

/// TCP to `addr` from a marked socket (unmarked to loopback).
pub async fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !addr.ip().is_loopback() {
        mark(socket2::SockRef::from(&socket));
    }
    socket.connect(addr).await
}

/// TCP to the first address of `host:port` that answers, like `TcpStream::connect` on a name.
pub async fn tcp_connect_host(target: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(target).await? {
        match tcp_connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{target}: no address to connect to"),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marked_connection_carries_the_bypass_mark() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Loopback stays unmarked (Go skips it); mark a socket by hand to check the call.
        let stream = tcp_connect(addr).await.unwrap();
        assert_eq!(socket2::SockRef::from(&stream).mark().unwrap(), 0);
        let socket = TcpSocket::new_v4().unwrap();
        mark(socket2::SockRef::from(&socket));
        assert_eq!(
            socket2::SockRef::from(&socket).mark().unwrap(),
            BYPASS_MARK,
            "tests run as root, so the mark must stick"
        );
    }
}
