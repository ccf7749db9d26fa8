//! Dialing control over ts2021 (spec §2, §3): `GET /key`, the HTTP/1.1 `POST /ts2021` upgrade
//! carrying the Noise initiation, the Noise response, the optional early payload, and an HTTP/2
//! client (prior knowledge) over the Noise record stream.
//!
//! Only `http://` control URLs are dialed for now (the lab and headscale-on-loopback setups);
//! `https://` is refused with a clear error.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;

use super::client::ControlError;

/// Time allowed for TCP connect + upgrade + Noise handshake (spec §3.1: 10 s).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `/key` response body read (spec §2: 64 KiB).
const MAX_KEY_BODY: usize = 64 * 1024;
/// Largest HTTP/1.1 response head accepted during the upgrade.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Where control lives, split out of its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub host: String,
    pub port: u16,
    /// `host[:port]` exactly as the URL had it, for `Host` and `:authority`.
    pub authority: String,
}

impl ControlUrl {
    pub fn parse(url: &str) -> Result<Self, ControlError> {
        let uri: http::Uri = url
            .trim_end_matches('/')
            .parse()
            .map_err(|e| ControlError::transient(&format!("control URL {url:?}"), e))?;
        let authority = uri
            .authority()
            .ok_or_else(|| ControlError::Transient(format!("control URL {url:?} has no host")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(ControlError::Transient(format!(
                    "control URL {url:?}: https control servers are not supported yet; use http://"
                )))
            }
            _ => {
                return Err(ControlError::Transient(format!(
                    "control URL {url:?}: want http://"
                )))
            }
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.to_string(),
        })
    }
}

/// Connect TCP to control.
pub async fn connect_tcp(url: &ControlUrl) -> Result<TcpStream, ControlError> {
    let target = format!("{}:{}", url.authority_host_for_dial(), url.port);
    let stream = TcpStream::connect(&target)
        .await
        .map_err(|e| ControlError::transient(&format!("dial {target}"), e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl ControlUrl {
    fn authority_host_for_dial(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// `GET /key?v=N` over plain HTTP/1.1; returns the response body (JSON) on 200.
pub async fn fetch_key_body(url: &ControlUrl, version: u32) -> Result<Bytes, ControlError> {
    let ctx = format!("GET http://{}/key", url.authority);
    let stream = connect_tcp(url).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ControlError::transient(&ctx, e))?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("/key?v={version}"))
        .header(http::header::HOST, &url.authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| ControlError::transient(&ctx, e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ControlError::transient(&ctx, e))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_KEY_BODY)
        .collect()
        .await
        .map_err(|e| ControlError::transient(&ctx, e))?
        .to_bytes();
    driver.abort();
    if status != http::StatusCode::OK {
        return Err(ControlError::Transient(format!("{ctx}: HTTP {status}")));
    }
    Ok(body)
}

/// Send the `POST /ts2021` upgrade carrying `initiation`, check the `101` answer, and return
/// the stream positioned at the first byte after the response head (the Noise response).
pub async fn upgrade(
    stream: TcpStream,
    url: &ControlUrl,
    initiation: &[u8],
) -> Result<BufReader<TcpStream>, ControlError> {
    use base64::Engine as _;
    let ctx = format!("POST http://{}/ts2021", url.authority);
    let handshake = base64::engine::general_purpose::STANDARD.encode(initiation);
    let request = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: {}\r\nUser-Agent: tern/{}\r\nUpgrade: tailscale-control-protocol\r\n\
         Connection: upgrade\r\nX-Tailscale-Handshake: {handshake}\r\nContent-Length: 0\r\n\r\n",
        url.authority,
        env!("CARGO_PKG_VERSION"),
    );
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ControlError::transient(&ctx, e))?;
    let head = read_response_head(&mut stream)
        .await
        .map_err(|e| ControlError::transient(&ctx, e))?;
    check_upgrade_response(&head).map_err(|e| ControlError::Transient(format!("{ctx}: {e}")))?;
    Ok(stream)
}

/// Read lines up to the empty line that ends an HTTP/1.1 response head (bounded).
async fn read_response_head(stream: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut head = String::new();
    loop {
        let before = head.len();
        let n = (&mut *stream)
            .take((MAX_RESPONSE_HEAD - before) as u64)
            .read_line(&mut head)
            .await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed during the upgrade response",
            ));
        }
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        if head[before..].trim_end_matches(['\r', '\n']).is_empty() {
            return Ok(head);
        }
    }
}

/// The server must switch to exactly `tailscale-control-protocol` (spec §3.2).
pub fn check_upgrade_response(head: &str) -> Result<(), String> {
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "101" {
        return Err(format!(
            "server answered {status_line:?}, want 101 Switching Protocols"
        ));
    }
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    match header("upgrade") {
        Some(v) if v == "tailscale-control-protocol" => Ok(()),
        other => Err(format!("server switched to unexpected protocol {other:?}")),
    }
}

/// A stream with some bytes pushed back in front of it (for the early-payload peek).
pub struct Rewind<S> {
    front: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(front: Bytes, inner: S) -> Self {
        Self { front, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.front.is_empty() {
            let n = self.front.len().min(buf.remaining());
            let chunk = self.front.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_url_forms() {
        let u = ControlUrl::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority.as_str()),
            ("127.0.0.1", 8080, "127.0.0.1:8080")
        );
        let u = ControlUrl::parse("http://[fd00::1]:9").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fd00::1", 9));
        assert_eq!(u.authority_host_for_dial(), "[fd00::1]");
        assert_eq!(ControlUrl::parse("http://localhost").unwrap().port, 80);
        assert!(ControlUrl::parse("https://ctl.example")
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(ControlUrl::parse("ctl.example").is_err());
    }

    #[test]
    fn upgrade_response_checks() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n";
        assert!(check_upgrade_response(ok).is_ok());
        let wrong = ok.replace("tailscale-control-protocol", "websocket");
        assert!(check_upgrade_response(&wrong)
            .unwrap_err()
            .contains("unexpected protocol"));
        let denied = "HTTP/1.1 400 Bad Request\r\n\r\n";
        assert!(check_upgrade_response(denied)
            .unwrap_err()
            .contains("want 101"));
        assert!(check_upgrade_response("").is_err());
    }

    #[tokio::test]
    async fn rewind_serves_front_bytes_first() {
        let inner: &[u8] = b" world";
        let mut r = Rewind::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
