//! Asking an exit node's peer API for DNS: one query per HTTP/1.1 POST to
//! `http://<exit node>:<peerapi port>/dns-query` (RFC 8484 framing over WireGuard, as Go's
//! forwarder does for exit nodes). The connection goes through the tailnet like any other
//! (the kernel routes the exit node's tailnet address into the TUN), and is kept for the next
//! query a while (Go keeps idle DoH connections 30 s), so a lookup costs no TCP handshake.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;

use crate::peerapi::{DOH_CONTENT_TYPE, DOH_PATH, MAX_QUERY};

/// The whole exchange: connect, ask, read the answer (Go waits 10 s for the response headers).
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection is used again within this long, else closed (Go's `dohIdleConnTimeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per server, and in all.
const IDLE_PER_SERVER: usize = 2;
const IDLE_TOTAL: usize = 8;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Idle connections: server, sender, since when idle.
static IDLE: Mutex<Vec<(SocketAddr, Sender, Instant)>> = Mutex::new(Vec::new());

/// An idle connection to `server`, if one is still open; old and closed ones are dropped.
fn take_idle(server: SocketAddr) -> Option<Sender> {
    let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
    idle.retain(|(_, sender, since)| !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT);
    let at = idle.iter().position(|(to, _, _)| *to == server)?;
    Some(idle.swap_remove(at).1)
}

/// Keeps a connection whose exchange completed, within the limits.
fn put_idle(server: SocketAddr, sender: Sender) {
    let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
    let for_server = idle.iter().filter(|(to, _, _)| *to == server).count();
    if !sender.is_closed() && for_server < IDLE_PER_SERVER && idle.len() < IDLE_TOTAL {
        idle.push((server, sender, Instant::now()));
    }
}

#[derive(Debug, Error)]
pub enum DohError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("HTTP with {0}: {1}")]
    Http(SocketAddr, String),
    #[error("{0} answered HTTP {1}")]
    Status(SocketAddr, StatusCode),
    #[error("{0} answered with Content-Type {1:?}, not a DNS message")]
    ContentType(SocketAddr, String),
    #[error("{0}'s answer is longer than a DNS message can be")]
    TooLong(SocketAddr),
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
}

/// The answer of the DoH server at `server` (its peer API address) to `query`.
pub async fn exchange(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, DohError> {
    tokio::time::timeout(TIMEOUT, ask(server, query))
        .await
        .map_err(|_| DohError::Timeout(server, TIMEOUT))?
}

async fn ask(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, DohError> {
    if let Some(sender) = take_idle(server) {
        // The server may have closed it meanwhile: then once more on a new connection.
        if let Ok(answer) = ask_on(server, sender, query).await {
            return Ok(answer);
        }
    }
    let sender = connect(server).await?;
    ask_on(server, sender, query).await
}

/// A new HTTP/1.1 connection; its driver task ends when the connection closes or its sender
/// is dropped.
async fn connect(server: SocketAddr) -> Result<Sender, DohError> {
    let stream = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|e| DohError::Connect(server, e))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| DohError::Http(server, e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One query on `sender`'s connection, kept for the next one when all went well.
async fn ask_on(server: SocketAddr, mut sender: Sender, query: &[u8]) -> Result<Vec<u8>, DohError> {
    let http = |e: hyper::Error| DohError::Http(server, e.to_string());
    // A kept connection is ready once its driver has read the end of the last answer.
    sender.ready().await.map_err(http)?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(DOH_PATH)
        .header(hyper::header::HOST, server.to_string())
        .header(hyper::header::CONTENT_TYPE, DOH_CONTENT_TYPE)
        .header(hyper::header::ACCEPT, DOH_CONTENT_TYPE)
        .body(Full::new(Bytes::copy_from_slice(query)))
        .map_err(|e| DohError::Http(server, e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let answer = read_answer(server, response).await?;
    put_idle(server, sender);
    Ok(answer)
}

async fn read_answer(
    server: SocketAddr,
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<Vec<u8>, DohError> {
    if response.status() != StatusCode::OK {
        return Err(DohError::Status(server, response.status()));
    }
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !crate::peerapi::is_doh_content_type(Some(&content_type)) {
        return Err(DohError::ContentType(server, content_type));
    }
    let body = Limited::new(response.into_body(), MAX_QUERY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                DohError::TooLong(server)
            } else {
                DohError::Http(server, e.to_string())
            }
        })?;
    Ok(body.to_bytes().to_vec())
}
