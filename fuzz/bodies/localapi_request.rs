//! Fuzz the LocalAPI request parser: `localapi::request::parse_request` (method, request
//! target, body), i.e. the steps the server runs on every request (`endpoint` on the method and
//! path, then `parse` on the query and the body it read).
//!
//! A model of the API (its own table of method, path and whether the body is read) predicts the
//! outcome class:
//! * never a panic; a result is `Ok` only for a known path with its own method (the model's path
//!   of the target: origin form up to `?`/`#`, or the path of an absolute-form target);
//! * every error is a 4xx with a non-empty message, and exactly the predicted one: 400 for a
//!   method that is not an HTTP token, 400 "bad request target" (only for targets with fuzzer
//!   text, or the empty one), else 404 for an unknown path, 405 for another method, 413 for a body over
//!   `MAX_BODY` sent to an endpoint that reads one, 400 (only `up`, `prefs`, `ping`, `whois`);
//! * `up`, `prefs` and `ping` bodies that parse re-serialise to JSON that parses (through the
//!   same request) to the same value; a ping's timeout is within `1..=MAX_PING_TIMEOUT_MS`; a
//!   `whois` key formatted back into a query gives the same key; the other endpoints ignore the
//!   body (same result with an empty one);
//! * padding the body with spaces to exactly `MAX_BODY` bytes changes nothing (same value, or an
//!   error with the same status); to `MAX_BODY + 1` it is refused with 413 by the endpoints that
//!   read a body and changes nothing for the others.
//!
//! Input: a method byte (low nibble 0-7: a known method, else a length-prefixed raw method), a
//! target byte (low nibble 0-11: an endpoint's path, 12-15: near misses; high nibble: path only,
//! `?` + query, absolute form `http://local-tern` + path + `?` + query, `#` + fragment, path +
//! raw suffix, or a raw target; the text after it is length-prefixed), a padding byte (1: to
//! `MAX_BODY`, 2: to `MAX_BODY + 1`), then the body (the rest). Missing bytes read as zero.

use tern::localapi::request::{parse_request, ApiRequest, MAX_BODY};
use tern::localapi::{ApiError, MAX_PING_TIMEOUT_MS};

use super::input::Input;

/// The API as the model knows it: method, path, whether the server reads the body.
const API: [(&str, &str, bool); 12] = [
    ("GET", "/localapi/v0/status", false),
    ("GET", "/localapi/v0/ip", false),
    ("POST", "/localapi/v0/up", true),
    ("POST", "/localapi/v0/down", false),
    ("POST", "/localapi/v0/logout", false),
    ("PATCH", "/localapi/v0/prefs", true),
    ("POST", "/localapi/v0/ping", true),
    ("POST", "/localapi/v0/netcheck", false),
    ("GET", "/localapi/v0/whois", false),
    ("GET", "/localapi/v0/watch", false),
    ("GET", "/localapi/v0/check-ip-forwarding", false),
    ("GET", "/localapi/v0/logs", false),
];
const WHOIS: usize = 8;

const METHODS: [&str; 8] = [
    "GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS", "get",
];

const NEAR_PATHS: [&str; 4] = [
    "",
    "/localapi/v0/",
    "/localapi/v1/status",
    "/LOCALAPI/v0/status",
];

fn api_index(req: &ApiRequest) -> usize {
    match req {
        ApiRequest::Status => 0,
        ApiRequest::Ip => 1,
        ApiRequest::Up(_) => 2,
        ApiRequest::Down => 3,
        ApiRequest::Logout => 4,
        ApiRequest::Set(_) => 5,
        ApiRequest::Ping(_) => 6,
        ApiRequest::Netcheck => 7,
        ApiRequest::WhoIs(_) => 8,
        ApiRequest::Watch => 9,
        ApiRequest::CheckIpForwarding => 10,
        ApiRequest::Logs => 11,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An HTTP method token (RFC 9110 `tchar`s).
fn is_token(method: &str) -> bool {
    !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The path of a request target: origin form up to `?` or `#`, or the path after the authority
/// of an absolute-form target; `None` for anything else.
fn model_path(target: &str) -> Option<&str> {
    let cut = |s: &'_ str| -> usize { s.find(['?', '#']).unwrap_or(s.len()) };
    if target.starts_with('/') {
        return Some(&target[..cut(target)]);
    }
    let (_, rest) = target.split_once("://")?;
    let rest = &rest[..cut(rest)];
    rest.find('/').map(|i| &rest[i..])
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let m = input.u8();
    let method = match METHODS.get(usize::from(m & 0x0f)) {
        Some(known) => known.to_string(),
        None => text(input.bytes()),
    };
    let t = input.u8();
    let i = usize::from(t & 0x0f);
    let base = match API.get(i) {
        Some(api) => api.1,
        None => NEAR_PATHS[i - API.len()],
    };
    let mode = t >> 4;
    let target = match mode {
        0 => base.to_string(),
        1 => format!("{base}?{}", text(input.bytes())),
        2 => format!("http://local-tern{base}?{}", text(input.bytes())),
        3 => format!("{base}#{}", text(input.bytes())),
        4 => format!("{base}{}", text(input.bytes())),
        _ => text(input.bytes()),
    };
    let pad = input.u8() % 4;
    let body = input.rest();
    // Only the empty near-miss path is an invalid target without fuzzer text.
    let plain_target = mode == 0 && !base.is_empty();
    let result = check(&method, &target, body, plain_target);
    let len = match pad {
        1 => MAX_BODY,
        2 => MAX_BODY + 1,
        _ => return,
    };
    if body.len() >= len {
        return;
    }
    let mut big = body.to_vec();
    big.resize(len, b' ');
    let padded = check(&method, &target, &big, plain_target);
    let refused = |r: &Result<ApiRequest, ApiError>| r.as_ref().err().map(|e| e.status.as_u16());
    // A bad method or target is refused before the body is looked at.
    let bad_request_line = !is_token(&method)
        || result
            .as_ref()
            .is_err_and(|e| e.message.starts_with("bad request target"));
    let reads_body = model_path(&target)
        .and_then(|p| API.iter().find(|a| a.1 == p && a.0 == method))
        .is_some_and(|a| a.2);
    if len > MAX_BODY && reads_body && !bad_request_line {
        assert_eq!(refused(&padded), Some(413), "{method} {target:?}: padded");
    } else {
        assert_eq!(
            padded.as_ref().ok(),
            result.as_ref().ok(),
            "{method} {target:?}: padded to {len}"
        );
        assert_eq!(refused(&padded), refused(&result), "{method} {target:?}");
    }
}

/// Parse one request and check it against the model; returns the result.
fn check(
    method: &str,
    target: &str,
    body: &[u8],
    plain_target: bool,
) -> Result<ApiRequest, ApiError> {
    let result = parse_request(method, target, body);
    let known = model_path(target).and_then(|p| API.iter().position(|a| a.1 == p));
    match &result {
        Ok(req) => {
            let i = api_index(req);
            assert_eq!(known, Some(i), "{method} {target:?} parsed as {req:?}");
            assert_eq!(method, API[i].0, "{target:?} parsed as {req:?}");
            assert!(!API[i].2 || body.len() <= MAX_BODY, "a body over MAX_BODY");
            let again = |json: Vec<u8>| parse_request(method, target, &json);
            match req {
                ApiRequest::Up(up) => {
                    let json = serde_json::to_vec(up).expect("UpRequest serialises");
                    assert_eq!(again(json).as_ref(), Ok(req), "up round trip");
                }
                ApiRequest::Set(set) => {
                    let json = serde_json::to_vec(set).expect("SetRequest serialises");
                    assert_eq!(again(json).as_ref(), Ok(req), "prefs round trip");
                }
                ApiRequest::Ping(ping) => {
                    assert!((1..=MAX_PING_TIMEOUT_MS).contains(&ping.timeout_ms));
                    let json = serde_json::to_vec(ping).expect("PingRequest serialises");
                    assert_eq!(again(json).as_ref(), Ok(req), "ping round trip");
                }
                ApiRequest::WhoIs(key) => {
                    let query = format!("/localapi/v0/whois?nodekey={key}");
                    assert_eq!(parse_request("GET", &query, b"").as_ref(), Ok(req));
                }
                _ => assert_eq!(again(Vec::new()).as_ref(), Ok(req), "the body is ignored"),
            }
        }
        Err(e) => {
            let status = e.status.as_u16();
            assert!((400..500).contains(&status), "{e:?}");
            assert!(!e.message.is_empty(), "{e:?}");
            let bad_target = e.message.starts_with("bad request target");
            let expected = if !is_token(method) {
                400
            } else if bad_target {
                assert!(!plain_target, "{target:?} refused: {e:?}");
                400
            } else {
                match known {
                    None => 404,
                    Some(i) if method != API[i].0 => 405,
                    Some(i) if API[i].2 && body.len() > MAX_BODY => 413,
                    Some(i) => {
                        assert!(API[i].2 || i == WHOIS, "{method} {target:?}: {e:?}");
                        400
                    }
                }
            };
            assert_eq!(status, expected, "{method} {target:?}: {e:?}");
        }
    }
    result
}
