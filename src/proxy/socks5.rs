//! SOCKS5 (RFC 1928), no authentication, CONNECT only: the pure parsers of the client's two
//! messages and the per-client task.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{dial, Dialers, ProxyCounters, ProxyDialError, Target, HANDSHAKE_TIMEOUT};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE: u8 = 0xff;
const CONNECT: u8 = 1;

/// Reply codes (RFC 1928 §6).
pub mod reply {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const NETWORK_UNREACHABLE: u8 = 3;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const TTL_EXPIRED: u8 = 6;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

/// What is wrong with a client's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    #[error("the client offers no method without authentication")]
    NoAcceptableMethod,
    #[error("command {0} is not supported (CONNECT only)")]
    Command(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("the host name is empty or not text")]
    Name,
    #[error("reserved byte is {0}, not 0")]
    Reserved(u8),
}

impl SocksError {
    /// The reply the client gets before the connection is closed (`None`: just close).
    pub fn reply_code(&self) -> Option<u8> {
        match self {
            SocksError::Command(_) => Some(reply::COMMAND_NOT_SUPPORTED),
            SocksError::AddressType(_) => Some(reply::ADDRESS_TYPE_NOT_SUPPORTED),
            SocksError::Name | SocksError::Reserved(_) => Some(reply::GENERAL_FAILURE),
            SocksError::Version(_) | SocksError::NoAcceptableMethod => None,
        }
    }
}

/// The greeting: version, then the methods offered. `Ok(None)` = not complete yet; else the
/// bytes it took.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, SocksError> {
    let Some((&version, rest)) = buf.split_first() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(SocksError::Version(version));
    }
    let Some((&count, rest)) = rest.split_first() else {
        return Ok(None);
    };
    let Some(methods) = rest.get(..usize::from(count)) else {
        return Ok(None);
    };
    if !methods.contains(&NO_AUTH) {
        return Err(SocksError::NoAcceptableMethod);
    }
    Ok(Some(2 + usize::from(count)))
}

/// The request: `VER CMD RSV ATYP DST.ADDR DST.PORT`. `Ok(None)` = not complete yet.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Target, usize)>, SocksError> {
    let [version, command, reserved, atyp, rest @ ..] = buf else {
        return Ok(None);
    };
    if *version != VERSION {
        return Err(SocksError::Version(*version));
    }
    if *reserved != 0 {
        return Err(SocksError::Reserved(*reserved));
    }
    let (addr_len, name) = match *atyp {
        1 => (4, false),
        4 => (16, false),
        3 => match rest.first() {
            Some(&n) => (1 + usize::from(n), true),
            None => return Ok(None),
        },
        other => return Err(SocksError::AddressType(other)),
    };
    let Some(addr) = rest.get(..addr_len) else {
        return Ok(None);
    };
    let Some(port) = rest.get(addr_len..addr_len + 2) else {
        return Ok(None);
    };
    // The command is checked once the message is whole, so the reply goes after all of it.
    if *command != CONNECT {
        return Err(SocksError::Command(*command));
    }
    let port = u16::from_be_bytes([port[0], port[1]]);
    let target = if name {
        let text = std::str::from_utf8(&addr[1..]).map_err(|_| SocksError::Name)?;
        if text.is_empty() {
            return Err(SocksError::Name);
        }
        Target::Name(text.to_string(), port)
    } else if let Ok(v4) = <[u8; 4]>::try_from(addr) {
        Target::Addr(SocketAddr::from((Ipv4Addr::from(v4), port)))
    } else {
        let v6 = <[u8; 16]>::try_from(addr).map_err(|_| SocksError::AddressType(*atyp))?;
        Target::Addr(SocketAddr::from((Ipv6Addr::from(v6), port)))
    };
    Ok(Some((target, 4 + addr_len + 2)))
}

/// The reply for a failed dial.
pub fn dial_reply(e: &ProxyDialError) -> u8 {
    match e {
        ProxyDialError::NoSuchHost(_) | ProxyDialError::Unreachable(..) => reply::HOST_UNREACHABLE,
        ProxyDialError::TailnetDown(_) => reply::NETWORK_UNREACHABLE,
        ProxyDialError::Refused(_) => reply::CONNECTION_REFUSED,
        ProxyDialError::Timeout(..) => reply::TTL_EXPIRED,
    }
}

/// A reply with an all-zero bound address (clients ignore it for CONNECT).
pub fn reply_bytes(code: u8) -> [u8; 10] {
    [VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Reads until `parse` has a whole message (or the client sent more than a SOCKS5 message
/// can hold).
async fn read_message<T>(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<T>, SocksError>,
) -> Result<Option<T>, SocksError> {
    // Greeting ≤ 257 bytes, request ≤ 262.
    const MAX: usize = 512;
    loop {
        if let Some(done) = parse(buf)? {
            return Ok(Some(done));
        }
        if buf.len() >= MAX {
            return Ok(None);
        }
        let mut chunk = [0u8; MAX];
        match conn.read(&mut chunk[..MAX - buf.len()]).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The greeting and the request, within [`HANDSHAKE_TIMEOUT`]; the target or why not.
async fn handshake(conn: &mut TcpStream) -> Result<Option<Target>, SocksError> {
    let mut buf = Vec::new();
    let Some(used) = read_message(conn, &mut buf, parse_greeting).await? else {
        return Ok(None);
    };
    buf.drain(..used);
    if conn.write_all(&[VERSION, NO_AUTH]).await.is_err() {
        return Ok(None);
    }
    Ok(read_message(conn, &mut buf, parse_request)
        .await?
        .map(|(target, _)| target))
}

/// One SOCKS5 client.
pub async fn handle(mut conn: TcpStream, dialers: &Dialers, counters: &ProxyCounters) {
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut conn)).await {
        Ok(Ok(Some(target))) => target,
        Ok(Err(e)) => {
            ProxyCounters::bump(&counters.bad_requests);
            tracing::debug!(error = %e, "SOCKS5 client");
            let answer = match e.reply_code() {
                Some(code) => reply_bytes(code).to_vec(),
                None if e == SocksError::NoAcceptableMethod => vec![VERSION, NO_ACCEPTABLE],
                None => Vec::new(),
            };
            let _ = conn.write_all(&answer).await;
            return;
        }
        Ok(Ok(None)) | Err(_) => {
            ProxyCounters::bump(&counters.bad_requests);
            return;
        }
    };
    match dial(&target, dialers).await {
        Ok(upstream) => {
            ProxyCounters::bump(&counters.connected);
            if conn.write_all(&reply_bytes(reply::SUCCEEDED)).await.is_ok() {
                super::splice(conn, upstream).await;
            }
        }
        Err(e) => {
            ProxyCounters::bump(&counters.dial_failures);
            tracing::debug!(%target, error = %e, "SOCKS5 dial");
            let _ = conn.write_all(&reply_bytes(dial_reply(&e))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_needs_no_auth_offered() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Some(4)));
        assert_eq!(parse_greeting(&[5, 1, 0, 9, 9]), Ok(Some(3)));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(SocksError::NoAcceptableMethod)
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(SocksError::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(SocksError::NoAcceptableMethod));
    }

    #[test]
    fn requests_by_address_and_by_name() {
        let v4 = [5, 1, 0, 1, 100, 64, 0, 7, 0x1f, 0x90];
        assert_eq!(
            parse_request(&v4),
            Ok(Some((Target::Addr("100.64.0.7:8080".parse().unwrap()), 10)))
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd7a:115c:a1e0::7".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&v6),
            Ok(Some((
                Target::Addr("[fd7a:115c:a1e0::7]:80".parse().unwrap()),
                22
            )))
        );
        let mut name = vec![5, 1, 0, 3, 3];
        name.extend_from_slice(b"tsd");
        name.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&name),
            Ok(Some((Target::Name("tsd".into(), 80), 10)))
        );
        // Every prefix is incomplete, never an error or a panic.
        for len in 0..name.len() {
            assert_eq!(parse_request(&name[..len]), Ok(None), "{len}");
        }
    }

    #[test]
    fn bad_requests_get_the_right_reply() {
        let bind = [5, 2, 0, 1, 1, 2, 3, 4, 0, 80];
        let e = parse_request(&bind).unwrap_err();
        assert_eq!(e.reply_code(), Some(reply::COMMAND_NOT_SUPPORTED));
        let e = parse_request(&[5, 1, 0, 9, 1, 2]).unwrap_err();
        assert_eq!(e.reply_code(), Some(reply::ADDRESS_TYPE_NOT_SUPPORTED));
        let e = parse_request(&[5, 1, 0, 3, 0, 0, 80]).unwrap_err();
        assert_eq!(e, SocksError::Name);
        let e = parse_request(&[5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80]).unwrap_err();
        assert_eq!(e, SocksError::Name);
        assert_eq!(parse_request(&[5, 1, 1, 1]), Err(SocksError::Reserved(1)));
        assert_eq!(
            dial_reply(&ProxyDialError::Refused("x".into())),
            reply::CONNECTION_REFUSED
        );
        assert_eq!(reply_bytes(4)[1], 4);
    }
}
