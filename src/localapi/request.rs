//! The pure part of a LocalAPI request: which endpoint a method and path name ([`endpoint`]:
//! 404 for an unknown path, 405 for a known one with another method), and what the request
//! asks once its body is read ([`parse`]: JSON for `up`, `prefs` and `ping`, the `nodekey`
//! query for `whois`). The server reads a body (at most [`MAX_BODY`] bytes) only for the
//! endpoints that take one ([`Endpoint::reads_body`]), then acts on the [`ApiRequest`].
//! [`parse_request`] chains the steps for a whole request, as the fuzz target drives them.

use http::{Method, StatusCode, Uri};

use super::{ApiError, PingRequest, SetRequest, UpRequest, MAX_PING_TIMEOUT_MS, WATCH_PATH};
use crate::keys::NodePublic;

/// Largest request body the server reads.
pub const MAX_BODY: usize = 64 * 1024;

/// A LocalAPI endpoint: one path, one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Status,
    Ip,
    Up,
    Down,
    Logout,
    Prefs,
    Ping,
    Netcheck,
    WhoIs,
    Watch,
    CheckIpForwarding,
    Logs,
}

impl Endpoint {
    pub const ALL: [Endpoint; 12] = [
        Endpoint::Status,
        Endpoint::Ip,
        Endpoint::Up,
        Endpoint::Down,
        Endpoint::Logout,
        Endpoint::Prefs,
        Endpoint::Ping,
        Endpoint::Netcheck,
        Endpoint::WhoIs,
        Endpoint::Watch,
        Endpoint::CheckIpForwarding,
        Endpoint::Logs,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Status => "/localapi/v0/status",
            Endpoint::Ip => "/localapi/v0/ip",
            Endpoint::Up => "/localapi/v0/up",
            Endpoint::Down => "/localapi/v0/down",
            Endpoint::Logout => "/localapi/v0/logout",
            Endpoint::Prefs => "/localapi/v0/prefs",
            Endpoint::Ping => "/localapi/v0/ping",
            Endpoint::Netcheck => "/localapi/v0/netcheck",
            Endpoint::WhoIs => "/localapi/v0/whois",
            Endpoint::Watch => WATCH_PATH,
            Endpoint::CheckIpForwarding => "/localapi/v0/check-ip-forwarding",
            Endpoint::Logs => "/localapi/v0/logs",
        }
    }

    pub fn method(self) -> Method {
        match self {
            Endpoint::Status
            | Endpoint::Ip
            | Endpoint::WhoIs
            | Endpoint::Watch
            | Endpoint::CheckIpForwarding
            | Endpoint::Logs => Method::GET,
            Endpoint::Prefs => Method::PATCH,
            Endpoint::Up | Endpoint::Down | Endpoint::Logout | Endpoint::Ping => Method::POST,
            Endpoint::Netcheck => Method::POST,
        }
    }

    /// Whether the server reads the request body (JSON); the others ignore it.
    pub fn reads_body(self) -> bool {
        matches!(self, Endpoint::Up | Endpoint::Prefs | Endpoint::Ping)
    }
}

/// What a well-formed request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    Status,
    Ip,
    Up(UpRequest),
    Down,
    Logout,
    Set(SetRequest),
    /// `timeout_ms` is within `1..=MAX_PING_TIMEOUT_MS`.
    Ping(PingRequest),
    Netcheck,
    WhoIs(NodePublic),
    Watch,
    /// What keeps the host (the daemon's network namespace) from forwarding.
    CheckIpForwarding,
    /// The daemon's recent log lines.
    Logs,
}

impl ApiRequest {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            ApiRequest::Status => Endpoint::Status,
            ApiRequest::Ip => Endpoint::Ip,
            ApiRequest::Up(_) => Endpoint::Up,
            ApiRequest::Down => Endpoint::Down,
            ApiRequest::Logout => Endpoint::Logout,
            ApiRequest::Set(_) => Endpoint::Prefs,
            ApiRequest::Ping(_) => Endpoint::Ping,
            ApiRequest::Netcheck => Endpoint::Netcheck,
            ApiRequest::WhoIs(_) => Endpoint::WhoIs,
            ApiRequest::Watch => Endpoint::Watch,
            ApiRequest::CheckIpForwarding => Endpoint::CheckIpForwarding,
            ApiRequest::Logs => Endpoint::Logs,
        }
    }
}

/// The endpoint `method` and `path` name: 404 for an unknown path, 405 for another method.
pub fn endpoint(method: &Method, path: &str) -> Result<Endpoint, ApiError> {
    let Some(found) = Endpoint::ALL.into_iter().find(|e| e.path() == path) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no LocalAPI endpoint {path}"),
        ));
    };
    if *method != found.method() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ));
    }
    Ok(found)
}

/// The 413 for a body that could not be read whole within [`MAX_BODY`].
pub fn body_error(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body: {error}"),
    )
}

/// What a request to `endpoint` asks, from its query string and body (ignored by the endpoints
/// that do not read one).
pub fn parse(endpoint: Endpoint, query: Option<&str>, body: &[u8]) -> Result<ApiRequest, ApiError> {
    if endpoint.reads_body() && body.len() > MAX_BODY {
        // The server's reader stops at the limit with this message.
        return Err(body_error("length limit exceeded"));
    }
    Ok(match endpoint {
        Endpoint::Status => ApiRequest::Status,
        Endpoint::Ip => ApiRequest::Ip,
        Endpoint::Up => ApiRequest::Up(json(body)?),
        Endpoint::Down => ApiRequest::Down,
        Endpoint::Logout => ApiRequest::Logout,
        Endpoint::Prefs => ApiRequest::Set(json(body)?),
        Endpoint::Ping => {
            let ping: PingRequest = json(body)?;
            if ping.timeout_ms == 0 || ping.timeout_ms > MAX_PING_TIMEOUT_MS {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("timeout_ms must be 1..={MAX_PING_TIMEOUT_MS}"),
                ));
            }
            ApiRequest::Ping(ping)
        }
        Endpoint::Netcheck => ApiRequest::Netcheck,
        Endpoint::WhoIs => ApiRequest::WhoIs(nodekey_param(query)?),
        Endpoint::Watch => ApiRequest::Watch,
        Endpoint::CheckIpForwarding => ApiRequest::CheckIpForwarding,
        Endpoint::Logs => ApiRequest::Logs,
    })
}

/// A whole request: method, request target (as hyper parses it) and body. A method or target
/// hyper would refuse before the server sees it is a 400 here.
pub fn parse_request(method: &str, target: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    let method = Method::from_bytes(method.as_bytes()).map_err(|e| bad(format!("{e}")))?;
    let uri: Uri = target
        .parse()
        .map_err(|e| bad(format!("bad request target: {e}")))?;
    parse(endpoint(&method, uri.path())?, uri.query(), body)
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))
}

/// The `nodekey` parameter of a query string.
fn nodekey_param(query: Option<&str>) -> Result<NodePublic, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, m);
    let value = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("nodekey="))
        .ok_or_else(|| bad("missing nodekey parameter"))?;
    // `:` may arrive percent-encoded.
    let value = value.replace("%3A", ":").replace("%3a", ":");
    value
        .parse()
        .map_err(|_| bad("nodekey must be nodekey:<64 hex digits>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(method: &str, target: &str, body: &[u8]) -> u16 {
        match parse_request(method, target, body) {
            Ok(_) => 200,
            Err(e) => e.status.as_u16(),
        }
    }

    #[test]
    fn requests_parse_or_get_the_status_the_server_answers() {
        let ping = br#"{"peer":"n2"}"#;
        assert_eq!(
            parse_request("POST", "/localapi/v0/ping", ping),
            Ok(ApiRequest::Ping(PingRequest {
                peer: "n2".into(),
                timeout_ms: 5000,
            }))
        );
        let key = format!("nodekey:{}", "11".repeat(32));
        let whois = format!("/localapi/v0/whois?nodekey={}", key.replace(':', "%3A"));
        assert_eq!(
            parse_request("GET", &whois, b""),
            Ok(ApiRequest::WhoIs(key.parse().unwrap()))
        );
        assert_eq!(status("GET", "/localapi/v0/nope", b""), 404);
        assert_eq!(status("POST", WATCH_PATH, b""), 405);
        assert_eq!(status("POST", "/localapi/v0/up", b"{oops"), 400);
        assert_eq!(
            status(
                "POST",
                "/localapi/v0/ping",
                br#"{"peer":"a","timeout_ms":0}"#
            ),
            400
        );
        let mut big = b"{}".to_vec();
        big.resize(MAX_BODY, b' ');
        assert_eq!(status("PATCH", "/localapi/v0/prefs", &big), 200);
        big.push(b' ');
        assert_eq!(status("PATCH", "/localapi/v0/prefs", &big), 413);
        // Endpoints without a body ignore it.
        assert_eq!(status("POST", "/localapi/v0/down", &big), 200);
    }
}
