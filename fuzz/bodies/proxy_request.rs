//! Fuzz what the SOCKS5 and HTTP proxies read from a local client before they dial:
//! `proxy::socks5::{parse_greeting, parse_request}` and `proxy::http::parse_request`.
//!
//! Input: a mode byte (even: SOCKS5, greeting then request from the rest; odd: HTTP request
//! head), then the client's bytes. Checked:
//! * never a panic; a complete parse takes at most the input, and parsing exactly the bytes it
//!   took gives the same answer (nothing after a message changes it);
//! * "incomplete" is only ever said of an input some extension could complete: every shorter
//!   prefix of a complete message is incomplete too, never an error;
//! * SOCKS5: a parsed request re-encodes to bytes that parse to the same target; an error's
//!   reply code is one RFC 1928 defines;
//! * HTTP: a forwarded head is one request in origin form (path from `/`), ends with
//!   `Connection: close` and a blank line, names a host, and carries no proxy headers; CONNECT
//!   targets have a port; errors are 400 or 431 (431 only for a head at the size limit).

use tern::proxy::http::{self, ProxyRequest, MAX_HEAD};
use tern::proxy::socks5::{self, SocksError};
use tern::proxy::Target;

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        socks(rest);
    } else {
        http_head(rest);
    }
}

fn socks(data: &[u8]) {
    match socks5::parse_greeting(data) {
        Ok(Some(used)) => {
            assert!(used <= data.len());
            assert_eq!(socks5::parse_greeting(&data[..used]), Ok(Some(used)));
            for len in 0..used {
                assert_eq!(
                    socks5::parse_greeting(&data[..len]),
                    Ok(None),
                    "prefix {len}"
                );
            }
            socks_request(&data[used..]);
        }
        Ok(None) => {}
        Err(e) => assert!(matches!(
            e,
            SocksError::Version(_) | SocksError::NoAcceptableMethod
        )),
    }
    // The request parser on its own too (the fuzzer need not build a greeting first).
    socks_request(data);
}

fn socks_request(data: &[u8]) {
    match socks5::parse_request(data) {
        Ok(Some((target, used))) => {
            assert!(used <= data.len());
            assert_eq!(
                socks5::parse_request(&data[..used]),
                Ok(Some((target.clone(), used)))
            );
            for len in 0..used {
                assert_eq!(
                    socks5::parse_request(&data[..len]),
                    Ok(None),
                    "prefix {len}"
                );
            }
            let encoded = encode_request(&target);
            assert_eq!(
                socks5::parse_request(&encoded),
                Ok(Some((target, encoded.len())))
            );
        }
        Ok(None) => {}
        Err(e) => {
            if let Some(code) = e.reply_code() {
                assert!((1..=8).contains(&code), "{e}: {code}");
            }
        }
    }
}

fn encode_request(target: &Target) -> Vec<u8> {
    let mut out = vec![5, 1, 0];
    let port = match target {
        Target::Addr(addr) => {
            match addr.ip() {
                std::net::IpAddr::V4(v4) => {
                    out.push(1);
                    out.extend_from_slice(&v4.octets());
                }
                std::net::IpAddr::V6(v6) => {
                    out.push(4);
                    out.extend_from_slice(&v6.octets());
                }
            }
            addr.port()
        }
        Target::Name(name, port) => {
            assert!(!name.is_empty() && name.len() <= 255, "{name:?}");
            out.push(3);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            *port
        }
    };
    out.extend_from_slice(&port.to_be_bytes());
    out
}

fn http_head(data: &[u8]) {
    match http::parse_request(data) {
        Ok(Some((request, used))) => {
            assert!(used <= data.len());
            assert_eq!(
                http::parse_request(&data[..used]),
                Ok(Some((request.clone(), used)))
            );
            check_request(&request);
        }
        Ok(None) => assert!(data.len() < MAX_HEAD, "incomplete at the size limit"),
        Err(e) => {
            let (code, _) = e.status();
            assert!(code == 400 || code == 431, "{e}");
            if code == 431 {
                assert!(data.len() >= MAX_HEAD, "431 for {} bytes", data.len());
            }
        }
    }
}

fn check_request(request: &ProxyRequest) {
    match request {
        ProxyRequest::Connect(target) => assert_ne!(port_of(target), 0),
        ProxyRequest::Forward { target, head } => {
            assert_ne!(port_of(target), 0);
            assert!(head.ends_with(b"Connection: close\r\n\r\n"));
            let mut headers = [httparse::EMPTY_HEADER; 80];
            let mut parsed = httparse::Request::new(&mut headers);
            let status = parsed.parse(head).expect("the forwarded head parses");
            assert_eq!(status, httparse::Status::Complete(head.len()));
            assert!(
                parsed.path.is_some_and(|p| p.starts_with('/')),
                "{:?}",
                parsed.path
            );
            assert!(parsed
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("host")));
            let proxy_headers = parsed.headers.iter().filter(|h| {
                h.name.eq_ignore_ascii_case("proxy-connection")
                    || h.name.eq_ignore_ascii_case("proxy-authorization")
            });
            assert_eq!(proxy_headers.count(), 0);
        }
    }
}

fn port_of(target: &Target) -> u16 {
    match target {
        Target::Addr(a) => a.port(),
        Target::Name(_, p) => *p,
    }
}
