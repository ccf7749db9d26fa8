//! The HTTP proxy: `CONNECT host:port` tunnels, and plain requests in absolute form
//! (`GET http://host/path`) passed on in origin form with `Connection: close` (one request per
//! connection keeps the proxy a byte pipe after the head).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{dial, Dialers, ProxyCounters, ProxyDialError, Target, HANDSHAKE_TIMEOUT};

/// The request head at most (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Headers meant for the proxy or for this hop only, not passed on.
const HOP_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
];

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyRequest {
    /// A tunnel: answer 200, then bytes both ways.
    Connect(Target),
    /// A request to pass on: `head` is what goes to the server (origin form).
    Forward { target: Target, head: Vec<u8> },
}

/// What is wrong with a request head (all answered with 400, or 431 when too large).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpProxyError {
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error("the request head is over {MAX_HEAD} bytes")]
    TooLarge,
    #[error("CONNECT needs host:port, got {0:?}")]
    BadAuthority(String),
    #[error(
        "a proxy request needs an absolute http:// URL, got {0:?} (https goes through CONNECT)"
    )]
    NotAbsolute(String),
}

impl HttpProxyError {
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HttpProxyError::TooLarge => (431, "Request Header Fields Too Large"),
            _ => (400, "Bad Request"),
        }
    }
}

/// Parses a request head. `Ok(None)` = not complete yet; else the request and the bytes the
/// head took (what follows is body).
pub fn parse_request(buf: &[u8]) -> Result<Option<(ProxyRequest, usize)>, HttpProxyError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(HttpProxyError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpProxyError::Malformed(e.to_string())),
    };
    let method = req.method.unwrap_or_default();
    let path = req.path.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        let target =
            parse_authority(path, None).ok_or_else(|| HttpProxyError::BadAuthority(path.into()))?;
        return Ok(Some((ProxyRequest::Connect(target), used)));
    }
    let rest = strip_prefix_ignore_case(path, "http://")
        .ok_or_else(|| HttpProxyError::NotAbsolute(path.into()))?;
    let (authority, origin) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let origin = if origin.starts_with('?') {
        format!("/{origin}")
    } else {
        origin.to_string()
    };
    let target = parse_authority(authority, Some(80))
        .ok_or_else(|| HttpProxyError::NotAbsolute(path.into()))?;
    let version = req.version.unwrap_or(1);
    let mut head = format!("{method} {origin} HTTP/1.{version}\r\n").into_bytes();
    let mut has_host = false;
    for h in req.headers.iter() {
        if HOP_HEADERS
            .iter()
            .any(|hop| h.name.eq_ignore_ascii_case(hop))
        {
            continue;
        }
        has_host |= h.name.eq_ignore_ascii_case("host");
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    if !has_host {
        head.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Some((ProxyRequest::Forward { target, head }, used)))
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// `host:port`, `[v6]:port`, or with `default_port` a bare host; user info is refused.
fn parse_authority(authority: &str, default_port: Option<u16>) -> Option<Target> {
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    if let Ok(addr) = authority.parse::<std::net::SocketAddr>() {
        return (addr.port() != 0).then_some(Target::Addr(addr));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            match port.parse::<u16>() {
                Ok(p) if p != 0 => (host, p),
                _ => return None,
            }
        }
        _ => (authority, default_port?),
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Some(Target::Addr(std::net::SocketAddr::new(ip, port)));
    }
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then(|| Target::Name(host.to_string(), port))
}

/// A short plain-text answer, then the connection closes.
pub fn error_response(code: u16, reason: &str, message: &str) -> Vec<u8> {
    let body = format!("{message}\n");
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The status for a failed dial.
pub fn dial_status(e: &ProxyDialError) -> (u16, &'static str) {
    match e {
        ProxyDialError::Timeout(..) => (504, "Gateway Timeout"),
        _ => (502, "Bad Gateway"),
    }
}

/// Reads the head within [`HANDSHAKE_TIMEOUT`]; the request and what came after it.
async fn read_head(
    conn: &mut TcpStream,
) -> Result<Option<(ProxyRequest, Vec<u8>)>, HttpProxyError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((request, used)) = parse_request(&buf)? {
            return Ok(Some((request, buf.split_off(used))));
        }
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        match conn.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One HTTP proxy client.
pub async fn handle(mut conn: TcpStream, dialers: &Dialers, counters: &ProxyCounters) {
    let (request, early_body) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut conn)).await {
            Ok(Ok(Some(r))) => r,
            Ok(Err(e)) => {
                ProxyCounters::bump(&counters.bad_requests);
                let (code, reason) = e.status();
                let _ = conn
                    .write_all(&error_response(code, reason, &e.to_string()))
                    .await;
                return;
            }
            Ok(Ok(None)) | Err(_) => {
                ProxyCounters::bump(&counters.bad_requests);
                return;
            }
        };
    let target = match &request {
        ProxyRequest::Connect(t) | ProxyRequest::Forward { target: t, .. } => t.clone(),
    };
    let mut upstream = match dial(&target, dialers).await {
        Ok(s) => s,
        Err(e) => {
            ProxyCounters::bump(&counters.dial_failures);
            let (code, reason) = dial_status(&e);
            let _ = conn
                .write_all(&error_response(code, reason, &e.to_string()))
                .await;
            return;
        }
    };
    ProxyCounters::bump(&counters.connected);
    let ready = match &request {
        ProxyRequest::Connect(_) => conn
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_ok(),
        ProxyRequest::Forward { head, .. } => upstream.write_all(head).await.is_ok(),
    };
    if ready && (early_body.is_empty() || upstream.write_all(&early_body).await.is_ok()) {
        super::splice(conn, upstream).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> ProxyRequest {
        parse_request(text.as_bytes())
            .expect("valid")
            .expect("complete")
            .0
    }

    #[test]
    fn connect_by_name_address_and_v6() {
        assert_eq!(
            parsed("CONNECT tsd.lab:443 HTTP/1.1\r\nHost: tsd.lab:443\r\n\r\n"),
            ProxyRequest::Connect(Target::Name("tsd.lab".into(), 443))
        );
        assert_eq!(
            parsed("CONNECT 100.64.0.2:80 HTTP/1.1\r\n\r\n"),
            ProxyRequest::Connect(Target::Addr("100.64.0.2:80".parse().unwrap()))
        );
        assert_eq!(
            parsed("CONNECT [fd7a:115c:a1e0::2]:22 HTTP/1.1\r\n\r\n"),
            ProxyRequest::Connect(Target::Addr("[fd7a:115c:a1e0::2]:22".parse().unwrap()))
        );
    }

    #[test]
    fn absolute_requests_are_rewritten_to_origin_form() {
        let req = parsed(
            "GET http://tsd/x?y=1 HTTP/1.1\r\nHost: tsd\r\nProxy-Connection: keep-alive\r\n\
             Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        );
        let ProxyRequest::Forward { target, head } = req else {
            panic!("a forward");
        };
        assert_eq!(target, Target::Name("tsd".into(), 80));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /x?y=1 HTTP/1.1\r\nHost: tsd\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let ProxyRequest::Forward { target, head } =
            parsed("HEAD HTTP://10.0.0.1:8080 HTTP/1.0\r\n\r\n")
        else {
            panic!("a forward");
        };
        assert_eq!(target, Target::Addr("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HEAD / HTTP/1.0\r\nHost: 10.0.0.1:8080\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn bad_heads_are_refused_with_a_reason() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n"), Ok(None));
        for bad in [
            "GET /relative HTTP/1.1\r\n\r\n",
            "GET https://tsd/ HTTP/1.1\r\n\r\n",
            "CONNECT tsd HTTP/1.1\r\n\r\n",
            "CONNECT tsd:0 HTTP/1.1\r\n\r\n",
            "CONNECT [a::f21d]:00 HTTP/1.1\r\n\r\n",
            "CONNECT 100.64.0.2:0 HTTP/1.1\r\n\r\n",
            "CONNECT user@tsd:80 HTTP/1.1\r\n\r\n",
            "GET http://:80/ HTTP/1.1\r\n\r\n",
            "\x00\x01 junk\r\n\r\n",
        ] {
            let e = parse_request(bad.as_bytes()).expect_err(bad);
            assert_eq!(e.status().0, 400, "{bad}: {e}");
        }
        let huge = format!("GET http://x/ HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            parse_request(huge.as_bytes()),
            Err(HttpProxyError::TooLarge)
        );
        let answer = String::from_utf8(error_response(502, "Bad Gateway", "nope")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(answer.ends_with("\r\n\r\nnope\n"));
    }
}
