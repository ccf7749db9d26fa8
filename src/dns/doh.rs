//! Asking an exit node's peer API for DNS: one query per HTTP/1.1 POST to
//! `http://<exit node>:<peerapi port>/dns-query` (RFC 8484 framing over WireGuard, as Go's
//! forwarder does for exit nodes). The connection goes through the tailnet like any other
//! (the kernel routes the exit node's tailnet address into the TUN).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;

use crate::peerapi::{DOH_CONTENT_TYPE, DOH_PATH, MAX_QUERY};

/// The whole exchange: connect, ask, read the answer (Go waits 10 s for the response headers).
pub const TIMEOUT: Duration = Duration::from_secs(10);

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
    let stream = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|e| DohError::Connect(server, e))?;
    let http = |e: hyper::Error| DohError::Http(server, e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::builder()
        .method(Method::POST)
        .uri(DOH_PATH)
        .header(hyper::header::HOST, server.to_string())
        .header(hyper::header::CONTENT_TYPE, DOH_CONTENT_TYPE)
        .header(hyper::header::ACCEPT, DOH_CONTENT_TYPE)
        .body(Full::new(Bytes::copy_from_slice(query)))
        .map_err(|e| DohError::Http(server, e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http);
    let answer = match response {
        Ok(response) => read_answer(server, response).await,
        Err(e) => Err(e),
    };
    driver.abort();
    answer
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
