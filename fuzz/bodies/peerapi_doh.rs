//! Fuzz what the peer API reads from a peer before any upstream is asked: the GET query
//! string (`peerapi::query_from_get`), a POST's Content-Type (`is_doh_content_type`), the DNS
//! query's question (`question_name`), the `ExitNodeFilteredSet` check (`Access::serves_name`)
//! and the REFUSED reply built for a filtered name (`dns::magic::refused`).
//!
//! Properties:
//! * never a panic;
//! * GET: `Ok` only when the first `dns=` pair has a value, never more than `MAX_QUERY` bytes,
//!   and the bytes encoded back (base64url, no padding) into `dns=` decode to the same bytes;
//!   `MissingDns` exactly when there is no `dns=` pair or the first one is empty;
//! * Content-Type: accepted exactly when the text before `;` is `application/dns-message` in
//!   any case, surrounded by spaces;
//! * a question name is ASCII and ends with `.`; the filter treats names case-insensitively and
//!   with or without the final dot, and refuses every name under `.ts.net` (not `ts.net`
//!   itself, as Go) and the exact name `blocked.example`, but not `www.blocked.example`;
//! * REFUSED keeps the query's ID, sets QR and carries RCODE 5 whenever there is a reply.
//!
//! Input: a mode byte (low 2 bits: 0 GET query string, 1 Content-Type, 2 and 3 a DNS query),
//! then the rest.

use base64::Engine as _;
use tern::peerapi::{self, Access, DohError};

use super::input::Input;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8() & 3;
    let rest = input.rest();
    match mode {
        0 => check_get(&String::from_utf8_lossy(rest)),
        1 => check_content_type(&String::from_utf8_lossy(rest)),
        _ => check_query(rest),
    }
}

/// Whether the first `dns=` pair has a value (Go's `FormValue` takes the first one too).
fn has_dns_pair(query_string: &str) -> bool {
    query_string
        .split('&')
        .find_map(|pair| pair.strip_prefix("dns="))
        .is_some_and(|v| !v.is_empty())
}

fn check_get(query_string: &str) {
    let got = peerapi::query_from_get(Some(query_string));
    assert_eq!(
        matches!(got, Err(DohError::MissingDns)),
        !has_dns_pair(query_string),
        "MissingDns for {query_string:?}"
    );
    if let Ok(bytes) = got {
        assert!(bytes.len() <= peerapi::MAX_QUERY, "over MAX_QUERY");
        let again = format!(
            "dns={}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes)
        );
        assert_eq!(
            peerapi::query_from_get(Some(&again)).ok(),
            Some(bytes),
            "round trip"
        );
    }
}

fn check_content_type(value: &str) {
    let expected = value
        .split(';')
        .next()
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/dns-message"));
    assert_eq!(
        peerapi::is_doh_content_type(Some(value)),
        expected,
        "{value:?}"
    );
}

fn access() -> Access {
    Access {
        exit_node_filtered: vec![".ts.net".into(), "blocked.example".into()],
        ..Default::default()
    }
}

fn check_query(query: &[u8]) {
    if let Some(name) = peerapi::question_name(query) {
        assert!(name.is_ascii(), "name {name:?}");
        assert!(name.ends_with('.'), "name {name:?} without the root");
        let access = access();
        let served = access.serves_name(&name);
        assert_eq!(
            access.serves_name(&name.to_ascii_uppercase()),
            served,
            "case"
        );
        assert_eq!(
            access.serves_name(name.trim_end_matches('.')),
            served,
            "dot"
        );
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".ts.net.") || lower == "blocked.example." {
            assert!(!served, "{name:?} is filtered");
        }
        if lower == "www.blocked.example." || lower == "ts.net." {
            assert!(served, "only the exact name, only what is under the suffix");
        }
    }
    if let Some(reply) = tern::dns::magic::refused(query) {
        assert!(reply.len() >= 12, "reply shorter than a header");
        assert_eq!(reply[..2], query[..2], "ID");
        assert_eq!(reply[2] & 0x80, 0x80, "QR");
        assert_eq!(reply[3] & 0x0f, 5, "REFUSED");
    }
}
