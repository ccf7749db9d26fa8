//! Control URLs and the ports Go dials for them (`control/ts2021` `NewClient`): `/ts2021` is tried
//! over plain HTTP on `http_port` and over TLS on `https_port`, and `GET /key` uses the URL's own
//! scheme and port. Pure: parsing and the port table only.

use std::net::IpAddr;

use super::error::ControlError;

/// `http://` or `https://`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Where control lives, split out of its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub scheme: Scheme,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// The port in the URL, or the scheme's default: where `GET /key` goes.
    pub port: u16,
    /// Where `/ts2021` is tried over plain HTTP; `None` = never.
    pub http_port: Option<u16>,
    /// Where `/ts2021` is tried over TLS; `None` = never.
    pub https_port: Option<u16>,
    /// `host[:port]` exactly as the URL had it, for `Host` and `:authority`.
    pub authority: String,
    /// Dial this address instead of resolving `host` (a `ControlDialPlan` candidate); TLS and
    /// HTTP still name `host`.
    pub dial_ip: Option<IpAddr>,
}

impl ControlUrl {
    /// Parses `http://host[:port]` or `https://host[:port]` (a trailing `/` is fine). Paths,
    /// queries, user info and port 0 are refused with what to fix.
    pub fn parse(url: &str) -> Result<Self, ControlError> {
        let bad = |why: &str| ControlError::Transient(format!("control URL {url:?}: {why}"));
        let uri: http::Uri = url
            .trim_end_matches('/')
            .parse()
            .map_err(|e| ControlError::transient(&format!("control URL {url:?}"), e))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(bad("want http://HOST[:PORT] or https://HOST[:PORT]")),
        };
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info (user@) is not allowed"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad(
                "a control URL has no path or query; give only scheme://host[:port]",
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let explicit_port = match written_port(authority.as_str()) {
            None => None,
            Some(text) => match text.parse::<u16>() {
                Ok(0) => return Err(bad("port 0 is not a port")),
                Ok(port) => Some(port),
                Err(_) => return Err(bad("the port must be a number from 1 to 65535")),
            },
        };
        let (http_port, https_port) = noise_ports(scheme, &host, explicit_port);
        let port = explicit_port.unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        Ok(Self {
            scheme,
            host,
            port,
            http_port,
            https_port,
            authority: authority.to_string(),
            dial_ip: None,
        })
    }

    /// What to connect to for `host:port`: the plan's address if one is set, else `host` (IPv6
    /// in brackets).
    pub fn host_for_dial(&self) -> String {
        let host = self
            .dial_ip
            .map_or_else(|| self.host.clone(), |ip| ip.to_string());
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        }
    }

    /// `scheme://authority`, for messages.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme.as_str(), self.authority)
    }
}

/// The port as written after the host (`host:PORT`, `[v6]:PORT`), if any; an empty one is none.
fn written_port(authority: &str) -> Option<&str> {
    let (_, port) = authority.rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(port)
}

/// Go's port table for `/ts2021`: `http://` to a private host (an RFC 1918, ULA or loopback IP
/// literal, or `localhost`) is never tried over TLS; any other `http://` also tries TLS on 443;
/// `https://host` tries plain HTTP on 80 first, `https://host:P` plain on 80 and TLS on P.
pub fn noise_ports(scheme: Scheme, host: &str, port: Option<u16>) -> (Option<u16>, Option<u16>) {
    match scheme {
        Scheme::Http => {
            let http = Some(port.unwrap_or(80));
            if is_private_host(host) {
                (http, None)
            } else {
                (http, Some(443))
            }
        }
        Scheme::Https => (Some(80), Some(port.unwrap_or(443))),
    }
}

/// `localhost`, or an IP literal that is loopback, RFC 1918 or IPv6 unique-local.
pub fn is_private_host(host: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback() || v4.is_private(),
        Ok(IpAddr::V6(v6)) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(url: &str) -> (Option<u16>, Option<u16>) {
        let u = ControlUrl::parse(url).unwrap();
        (u.http_port, u.https_port)
    }

    #[test]
    fn port_table_follows_go() {
        assert_eq!(ports("http://ctl.example"), (Some(80), Some(443)));
        assert_eq!(ports("http://10.0.0.1"), (Some(80), None));
        assert_eq!(ports("http://ctl.example:8080"), (Some(8080), Some(443)));
        assert_eq!(ports("http://127.0.0.1:8080"), (Some(8080), None));
        assert_eq!(ports("http://localhost:9"), (Some(9), None));
        assert_eq!(ports("http://[fd7a::1]:9"), (Some(9), None));
        assert_eq!(ports("http://198.18.0.1:8080"), (Some(8080), Some(443)));
        assert_eq!(ports("https://ctl.example"), (Some(80), Some(443)));
        assert_eq!(ports("https://10.0.0.1:8443"), (Some(80), Some(8443)));
    }

    #[test]
    fn url_forms() {
        let u = ControlUrl::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority.as_str()),
            ("127.0.0.1", 8080, "127.0.0.1:8080")
        );
        let u = ControlUrl::parse("http://[fd00::1]:9").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fd00::1", 9));
        assert_eq!(u.host_for_dial(), "[fd00::1]");
        assert_eq!(ControlUrl::parse("http://localhost").unwrap().port, 80);
        let u = ControlUrl::parse("https://ctl.example").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Https, 443));
        assert_eq!(u.origin(), "https://ctl.example");
    }

    #[test]
    fn bad_urls_say_what_to_fix() {
        let err = |url| ControlUrl::parse(url).unwrap_err().to_string();
        assert!(err("ctl.example").contains("want http://"));
        assert!(err("ftp://ctl.example").contains("want http://"));
        assert!(err("https://ctl.example/login").contains("no path"));
        assert!(err("https://ctl.example/?x=1").contains("no path"));
        assert!(err("https://alice@ctl.example").contains("user info"));
        assert!(err("https://ctl.example:0").contains("port 0"));
        assert!(err("https://ctl.example:99999").contains("1 to 65535"));
        assert!(err("https://").contains("control URL"));
    }
}
