//! `tern bugreport`: status, netcheck and the daemon's recent log in one text for an issue
//! report, redacted (pure; the CLI fetches the parts).
//!
//! Always removed: node, machine and disco keys, auth keys (`tskey-…`), private keys
//! (`privkey:…`), the login URL. Unless `--include-endpoints`: every `ip:port` that is not a
//! tailnet address (peers' and our own UDP endpoints, relay legs, DERP and control addresses
//! in the log) becomes `[endpoint]`, and endpoint fields in the status are emptied.

use serde_json::Value;

/// What to leave in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redaction {
    pub include_endpoints: bool,
}

/// Status keys whose values identify a node's keys or a login.
const SECRET_KEYS: [&str; 5] = [
    "node_key",
    "machine_key",
    "disco_key",
    "server_disco_key",
    "auth_url",
];
/// Status keys that hold network endpoints (strings or lists of them).
const ENDPOINT_KEYS: [&str; 7] = [
    "endpoints",
    "endpoint",
    "addr",
    "bound",
    "addr_ports",
    "static_endpoints",
    "global_v4",
];

/// The status JSON with keys and (unless asked) endpoints taken out.
pub fn redact_status(status: &Value, how: Redaction) -> Value {
    match status {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if SECRET_KEYS.contains(&k.as_str()) && !v.is_null() {
                        Value::from("[redacted]")
                    } else if !how.include_endpoints
                        && (ENDPOINT_KEYS.contains(&k.as_str()) || k == "global_v6")
                    {
                        blank(v)
                    } else {
                        redact_status(v, how)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact_status(v, how)).collect()),
        Value::String(text) => Value::from(redact_text(text, how)),
        other => other.clone(),
    }
}

/// An endpoint field's value replaced, keeping its shape (list, string, null).
fn blank(v: &Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(|_| "[endpoint]".into()).collect()),
        Value::Null => Value::Null,
        _ => Value::from("[endpoint]"),
    }
}

/// One line of text (a log line, a JSON string) with secrets and, unless asked, endpoints
/// taken out.
pub fn redact_text(text: &str, how: Redaction) -> String {
    let mut out = redact_tokens(text);
    if !how.include_endpoints {
        out = redact_endpoints(&out);
    }
    out
}

/// `tskey-…`, `privkey:…`, `nodekey:…`, `mkey:…`, `discokey:…` tokens.
fn redact_tokens(text: &str) -> String {
    const PREFIXES: [&str; 5] = ["tskey-", "privkey:", "nodekey:", "mkey:", "discokey:"];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((at, prefix)) = PREFIXES
        .iter()
        .filter_map(|p| rest.find(p).map(|i| (i, *p)))
        .min_by_key(|(i, _)| *i)
    {
        out.push_str(&rest[..at]);
        out.push_str(prefix);
        out.push_str("[redacted]");
        let after = &rest[at + prefix.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Every `ip:port` / `[ip]:port` whose address is not a tailnet one becomes `[endpoint]`.
fn redact_endpoints(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // An address starts after a non-address character, or inside brackets (`[1.2.3.4:5]`).
        let starts_word = i == 0 || !is_addr_char(bytes[i - 1]) || bytes[i - 1] == b'[';
        if starts_word {
            if let Some(len) = endpoint_at(&text[i..]) {
                out.push_str("[endpoint]");
                i += len;
                continue;
            }
        }
        let ch = text[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn is_addr_char(b: u8) -> bool {
    b.is_ascii_hexdigit() || b == b'.' || b == b':' || b == b'[' || b == b']'
}

/// The length of a non-tailnet `ip:port` at the start of `text`, if there is one.
fn endpoint_at(text: &str) -> Option<usize> {
    let end = text
        .bytes()
        .position(|b| !is_addr_char(b) && !b.is_ascii_digit())
        .unwrap_or(text.len());
    // Punctuation after an address (`dial 1.2.3.4:443: refused`) is not part of it.
    let candidate = text[..end].trim_end_matches([':', '.', ']']);
    // A bracket only opens `[v6]:port`; a port-less `[v6]` is no endpoint.
    if candidate.starts_with('[') && !candidate.contains("]:") {
        return None;
    }
    let end = candidate.len();
    let addr: std::net::SocketAddr = candidate.parse().ok()?;
    let ip = crate::udp::unmap_v4(addr).ip();
    let tailnet = ipnet::IpNet::from(crate::routing::cgnat()).contains(&ip)
        || ipnet::IpNet::from(crate::routing::tailnet_ula()).contains(&ip);
    (!tailnet && !ip.is_loopback()).then_some(end)
}

/// The whole report.
pub fn assemble(
    version: &str,
    status: Option<&Value>,
    netcheck: Result<&Value, &str>,
    log: &[String],
    how: Redaction,
) -> String {
    let mut out = format!(
        "# tern bugreport\ntern {version}\nendpoints: {}\n\n## status\n",
        if how.include_endpoints {
            "included"
        } else {
            "redacted"
        }
    );
    match status {
        Some(s) => {
            let redacted = redact_status(s, how);
            out.push_str(&serde_json::to_string_pretty(&redacted).unwrap_or_default());
            out.push('\n');
        }
        None => out.push_str("(the daemon did not answer)\n"),
    }
    out.push_str("\n## netcheck\n");
    match netcheck {
        Ok(report) => {
            let redacted = redact_status(report, how);
            out.push_str(&serde_json::to_string_pretty(&redacted).unwrap_or_default());
            out.push('\n');
        }
        Err(why) => {
            out.push_str(&format!("(no report: {})\n", redact_text(why, how)));
        }
    }
    out.push_str(&format!("\n## log (last {} lines)\n", log.len()));
    for line in log {
        out.push_str(&redact_text(line, how));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIDE: Redaction = Redaction {
        include_endpoints: false,
    };
    const SHOW: Redaction = Redaction {
        include_endpoints: true,
    };

    #[test]
    fn log_lines_lose_keys_and_foreign_endpoints() {
        let line = "path peer=nodekey:0123abcd to=Direct { addr: 198.18.2.2:41641 } via \
                    [2001:db8::5]:3478 key tskey-auth-xyz_1 from 100.64.0.2:80 and \
                    [fd7a:115c:a1e0::2]:22 local 127.0.0.1:1080 at 10:42:07.123 v1.2.3 \
                    endpoints=[10.77.0.1:38534, 10.0.0.1:9] dial 203.0.113.7:443: refused";
        let hidden = redact_text(line, HIDE);
        assert_eq!(
            hidden,
            "path peer=nodekey:[redacted] to=Direct { addr: [endpoint] } via [endpoint] key \
             tskey-[redacted] from 100.64.0.2:80 and [fd7a:115c:a1e0::2]:22 local \
             127.0.0.1:1080 at 10:42:07.123 v1.2.3 endpoints=[[endpoint], [endpoint]] dial \
             [endpoint]: refused"
        );
        let shown = redact_text(line, SHOW);
        assert!(shown.contains("198.18.2.2:41641") && shown.contains("tskey-[redacted]"));
        assert!(!shown.contains("0123abcd"));
    }

    #[test]
    fn status_keeps_its_shape_without_secrets() {
        let status = serde_json::json!({
            "self": {"node_key": "nodekey:aa", "tailnet_ips": ["100.64.0.1"], "home_derp": 900},
            "auth_url": null,
            "peers": [{"name": "c2", "endpoints": ["198.18.2.2:41641"], "endpoint": "198.18.2.2:41641",
                       "disco_key": "discokey:bb", "candidates": [{"addr": "198.18.2.2:41641"}],
                       "path_history": [{"endpoint": null, "reason": "direct"}]}],
            "control": {"last_error": {"message": "dial 203.0.113.7:443: refused"}},
        });
        let r = redact_status(&status, HIDE);
        assert_eq!(r["self"]["node_key"], "[redacted]");
        assert_eq!(r["self"]["tailnet_ips"][0], "100.64.0.1");
        assert!(r["auth_url"].is_null());
        assert_eq!(
            r["peers"][0]["endpoints"],
            serde_json::json!(["[endpoint]"])
        );
        assert_eq!(r["peers"][0]["endpoint"], "[endpoint]");
        assert_eq!(r["peers"][0]["candidates"][0]["addr"], "[endpoint]");
        assert!(r["peers"][0]["path_history"][0]["endpoint"].is_null());
        assert_eq!(r["peers"][0]["disco_key"], "[redacted]");
        assert_eq!(
            r["control"]["last_error"]["message"],
            "dial [endpoint]: refused"
        );
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("198.18.2.2") && !text.contains("nodekey:aa"));
        let shown = redact_status(&status, SHOW);
        assert_eq!(shown["peers"][0]["endpoint"], "198.18.2.2:41641");
        assert_eq!(shown["peers"][0]["disco_key"], "[redacted]");
    }

    #[test]
    fn the_report_has_every_section() {
        let status = serde_json::json!({"backend_state": "Running"});
        let log = vec!["INFO DERP connected region=900 addr=198.18.0.10:443".to_string()];
        let report = assemble("0.1.0", Some(&status), Err("timed out"), &log, HIDE);
        for part in [
            "# tern bugreport\ntern 0.1.0\nendpoints: redacted\n",
            "## status\n{\n  \"backend_state\": \"Running\"\n}\n",
            "## netcheck\n(no report: timed out)\n",
            "## log (last 1 lines)\nINFO DERP connected region=900 addr=[endpoint]\n",
        ] {
            assert!(report.contains(part), "{part:?} in\n{report}");
        }
    }
}
