//! A tiny blocking HTTP "whoami" server for the lab: every `GET` gets `200` and, as body, the
//! client's IP address as this server sees it (one line). An exit node or subnet router test asks
//! it who is calling: the answer tells which address the traffic left from.
//!
//! It is built to be poked by anything on the lab network, so what one client can make it hold
//! is bounded: at most [`MAX_REQUEST`] bytes read per request, [`READ_TIMEOUT`] per read, and
//! [`MAX_CONNECTIONS`] connections served at a time (more are closed at once).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};

use crate::error::{LabError, Result};
use crate::netns::Netns;

/// Most bytes of a request read before answering (the rest is ignored).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Longest wait for request bytes (and for a write to go out).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// A running whoami server; dropping it stops accepting and joins the accept thread.
/// Connections in flight end on their own within [`READ_TIMEOUT`].
#[derive(Debug)]
pub struct WhoamiServer {
    addr: SocketAddr,
    /// A second handle on the listening socket, to wake the accept loop on drop.
    listener: TcpListener,
    thread: Option<JoinHandle<Result<()>>>,
}

impl WhoamiServer {
    /// The address it listens on (with the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WhoamiServer {
    fn drop(&mut self) {
        // shutdown() on a listening socket makes a blocked accept() fail at once (Linux), and
        // works whichever namespace the socket is in (a wake-up connection might not reach it).
        // SAFETY: shutdown() on a descriptor this struct owns; it does not close it.
        let rc = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // The accept loop would never wake: leave its thread rather than hang here.
            warn!(addr = %self.addr, %err, "stopping whoami server");
            return;
        }
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Err(err)) => warn!(addr = %self.addr, %err, "whoami server failed"),
                Err(_) => warn!(addr = %self.addr, "whoami server thread panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Starts a whoami server on `addr` inside namespace `ns`; it serves until dropped.
pub fn spawn_whoami(ns: &Netns, addr: SocketAddr) -> Result<WhoamiServer> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = ns.spawn_thread(move || {
        let bound = bind(addr).and_then(|listener| {
            let handle = listener
                .try_clone()
                .map_err(|err| LabError::io(format!("cloning whoami socket {addr}"), err))?;
            Ok((listener, handle))
        });
        match bound {
            Ok((listener, handle)) => {
                let _ = ready_tx.send(Ok(handle));
                serve(&listener);
            }
            Err(err) => {
                let _ = ready_tx.send(Err(err));
            }
        }
        Ok(())
    });
    let listener = match ready_rx.recv() {
        Ok(Ok(listener)) => listener,
        Ok(Err(err)) => {
            let _ = thread.join();
            return Err(err);
        }
        Err(_) => {
            // The thread ended without a word: it could not enter the namespace.
            return Err(match thread.join() {
                Ok(Err(err)) => err,
                _ => LabError::Invalid(format!("whoami server thread for {addr} died")),
            });
        }
    };
    let addr = listener
        .local_addr()
        .map_err(|err| LabError::io("whoami socket address", err))?;
    debug!(%addr, netns = ns.name(), "whoami server listening");
    Ok(WhoamiServer {
        addr,
        listener,
        thread: Some(thread),
    })
}

/// Serves on `addr` in this thread's own namespace until the process ends (the lab's internet
/// host runs it as `tern lab whoami ADDR`).
pub fn serve_forever(addr: SocketAddr) -> Result<()> {
    let listener = bind(addr)?;
    serve(&listener);
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(|err| LabError::io(format!("binding whoami on {addr}"), err))
}

/// Accepts until the listening socket is shut down; one thread per connection, at most
/// [`MAX_CONNECTIONS`] at once.
fn serve(listener: &TcpListener) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (conn, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // EINVAL after shutdown(): we are being stopped.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => return,
            Err(err) => {
                // ECONNABORTED, EMFILE…: keep serving, but do not spin.
                debug!(%err, "whoami accept failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            debug!(%peer, "whoami: too many connections, closing");
            continue;
        }
        let slot = ConnectionSlot(active.clone());
        let spawned = std::thread::Builder::new()
            .name("whoami-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(err) = answer(conn, peer.ip()) {
                    debug!(%peer, %err, "whoami connection failed");
                }
            });
        if let Err(err) = spawned {
            // The closure (and its slot) was dropped: the count is already back down.
            warn!(%err, "whoami: no thread for a connection");
        }
    }
}

/// Gives a connection's place back when its thread ends, however it ends.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads one request (bounded) and answers it.
fn answer(mut conn: TcpStream, client: IpAddr) -> std::io::Result<()> {
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    let head = read_head(&mut conn)?;
    conn.write_all(&response(&head, client))?;
    conn.flush()
}

/// The request up to the end of its header block, or the first [`MAX_REQUEST`] bytes, or what
/// came before the client stopped sending.
fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while head.len() < MAX_REQUEST && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let want = chunk.len().min(MAX_REQUEST - head.len());
        let n = conn.read(&mut chunk[..want])?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

/// The HTTP answer to a request head: the client's address for `GET`, 405 otherwise.
pub fn response(head: &[u8], client: IpAddr) -> Vec<u8> {
    let (status, body) = if head.starts_with(b"GET ") {
        ("200 OK", format!("{client}\n"))
    } else {
        ("405 Method Not Allowed", "only GET\n".to_string())
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_gets_the_client_address() {
        let text = String::from_utf8(response(
            b"GET / HTTP/1.1\r\n\r\n",
            "10.1.0.2".parse().unwrap(),
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 9\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n10.1.0.2\n"), "{text}");
    }

    /// A listener on loopback in this (the test's) namespace and a connected client.
    fn pair() -> (TcpListener, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (listener, client)
    }

    #[test]
    fn a_request_is_read_up_to_its_head_or_the_limit() {
        let (listener, mut client) = pair();
        client
            .write_all(&[b"GET / HTTP/1.1\r\n".as_slice(), &[b'a'; 3 * MAX_REQUEST]].concat())
            .unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let head = read_head(&mut server).unwrap();
        assert_eq!(head.len(), MAX_REQUEST);

        let (listener, mut client) = pair();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let head = read_head(&mut server).unwrap();
        assert!(head.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn connections_beyond_the_cap_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stopper = listener.try_clone().unwrap();
        let thread = std::thread::spawn(move || serve(&listener));
        // Idle clients hold every slot (their threads wait in read for READ_TIMEOUT).
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut extra = TcpStream::connect(addr).unwrap();
        extra.set_read_timeout(Some(READ_TIMEOUT / 2)).unwrap();
        let mut buf = [0u8; 16];
        let read = extra.read(&mut buf);
        assert!(
            matches!(read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the 65th connection must be closed, not served or left waiting: {read:?}"
        );
        // A freed slot serves again.
        drop(idle);
        let mut served = None;
        for _ in 0..100 {
            let mut client = TcpStream::connect(addr).unwrap();
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut text = String::new();
            if client.read_to_string(&mut text).is_ok() && !text.is_empty() {
                served = Some(text);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let served = served.expect("served after the idle clients left");
        assert!(served.ends_with("\r\n\r\n127.0.0.1\n"), "{served}");
        // SAFETY: as in WhoamiServer::drop.
        assert_eq!(
            unsafe { libc::shutdown(stopper.as_raw_fd(), libc::SHUT_RDWR) },
            0
        );
        thread.join().unwrap();
    }

    #[test]
    fn other_methods_are_refused() {
        let text = String::from_utf8(response(b"POST / HTTP/1.1", "::1".parse().unwrap())).unwrap();
        assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    }
}
