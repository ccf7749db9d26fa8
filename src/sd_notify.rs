//! systemd's readiness protocol (`Type=notify`), the one message tern sends: `READY=1` once the
//! LocalAPI socket listens, so that `systemctl start tern` returns when `tern up` can connect and
//! units ordered after it (or `ExecStartPost=tern set …`) find the socket.
//!
//! The protocol is one datagram on the Unix socket named by `NOTIFY_SOCKET` (a path, or an
//! abstract name when it starts with `@`); without the variable (not under systemd) nothing is
//! sent. No crate: std has both kinds of address.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd the daemon is ready, if it runs under `Type=notify`. Failures are logged, never
/// fatal: a daemon that works but could not say so is better than none (systemd will time the
/// start out and say why).
pub fn ready() {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    match send(&target, "READY=1") {
        Ok(()) => tracing::debug!("told systemd we are ready"),
        Err(e) => tracing::warn!(
            error = %e,
            socket = %target.to_string_lossy(),
            "could not tell systemd we are ready (NOTIFY_SOCKET)"
        ),
    }
}

/// Sends `state` (e.g. `READY=1`) to the notify socket `target` as given in `NOTIFY_SOCKET`.
pub fn send(target: &OsStr, state: &str) -> io::Result<()> {
    let addr = address(target)?;
    let socket = UnixDatagram::unbound()?;
    let sent = socket.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to the notify socket",
        ));
    }
    Ok(())
}

/// `NOTIFY_SOCKET`'s value as an address: `@name` is the abstract name `name`, anything else a
/// filesystem path (systemd only ever sets absolute paths or `@`).
fn address(target: &OsStr) -> io::Result<SocketAddr> {
    let bytes = target.as_bytes();
    match bytes.split_first() {
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is empty",
        )),
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)
        }
        Some(_) => SocketAddr::from_pathname(target),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), "READY=1").expect("send");
        assert_eq!(receive(&listener), "READY=1");
    }

    #[test]
    fn ready_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("tern-sd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind");
        let target = format!("@{name}");
        send(OsStr::from_bytes(target.as_bytes()), "READY=1").expect("send");
        assert_eq!(receive(&listener), "READY=1");
    }

    #[test]
    fn nobody_listening_and_empty_values_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nobody");
        assert!(send(missing.as_os_str(), "READY=1").is_err());
        assert!(send(OsStr::new(""), "READY=1").is_err());
    }
}
