//! The I/O seam: the [`Backend`] the CLI implements, and [`pump`], which turns its watch stream
//! into [`Feed`] events and reconnects after every failure.

use std::time::Duration;

use crate::app::{Feed, PingAnswer};
use crate::snapshot::Status;

/// Lines of the watch stream; an `Err` item is a broken connection.
pub type Lines = Box<dyn Iterator<Item = Result<String, String>> + Send>;

/// What `tern top` needs from a daemon.
pub trait Backend: Send + Sync + 'static {
    /// Open the watch stream (newline-delimited status JSON). `Err` = not reachable.
    fn watch(&self) -> Result<Lines, String>;
    /// Disco-ping `target` (a tailnet IP or name) and wait for the answer.
    fn ping(&self, target: &str) -> Result<PingAnswer, String>;
    /// Turn the relay server on at `port` (0 = the kernel picks) or off (`None`).
    fn set_relay_port(&self, port: Option<u16>) -> Result<(), String>;
    /// Whether this user may change things (write access to the socket).
    fn writable(&self) -> bool;
}

/// Errors reading one line of the stream.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("a JSON {0}, not a status object")]
    NotObject(&'static str),
}

/// One line of the watch stream → a snapshot.
pub fn parse_line(line: &str) -> Result<Status, LineError> {
    let value: serde_json::Value = serde_json::from_str(line)?;
    let kind = match &value {
        serde_json::Value::Object(_) => return Ok(serde_json::from_value(value)?),
        serde_json::Value::Array(_) => "array",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Null => "null",
    };
    Err(LineError::NotObject(kind))
}

/// Read one stream until it ends; `false` when `send` says to stop.
fn drain(lines: Lines, send: &mut impl FnMut(Feed) -> bool) -> bool {
    for item in lines {
        let feed = match item {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => match parse_line(&line) {
                Ok(status) => Feed::Snapshot(Box::new(status)),
                Err(e) => return send(Feed::Malformed(e.to_string())),
            },
            Err(e) => return send(Feed::Closed(e)),
        };
        if !send(feed) {
            return false;
        }
    }
    send(Feed::Closed("the daemon closed the stream".into()))
}

/// Feed the dashboard from `backend` until `send` returns `false`: open the stream, forward
/// snapshots, and after a bad line, a close or a failed connect wait `retry` and start again.
pub fn pump(backend: &dyn Backend, retry: Duration, mut send: impl FnMut(Feed) -> bool) {
    loop {
        let go_on = match backend.watch() {
            Ok(lines) => send(Feed::Connected) && drain(lines, &mut send),
            Err(e) => send(Feed::Unreachable(e)),
        };
        if !go_on {
            return;
        }
        std::thread::sleep(retry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// One connection of the script: its lines, or the connect error.
    type Connection = Result<Vec<Result<String, String>>, String>;

    /// A daemon that serves a scripted stream per connection.
    struct Scripted(Mutex<Vec<Connection>>);

    impl Backend for Scripted {
        fn watch(&self) -> Result<Lines, String> {
            let mut script = self.0.lock().map_err(|e| e.to_string())?;
            if script.is_empty() {
                return Err("script over".into());
            }
            script
                .remove(0)
                .map(|lines| Box::new(lines.into_iter()) as Lines)
        }
        fn ping(&self, _: &str) -> Result<PingAnswer, String> {
            Err("no".into())
        }
        fn set_relay_port(&self, _: Option<u16>) -> Result<(), String> {
            Ok(())
        }
        fn writable(&self) -> bool {
            true
        }
    }

    fn kinds(
        script: Vec<Result<Vec<Result<String, String>>, String>>,
        stop_after: usize,
    ) -> Vec<String> {
        let backend = Scripted(Mutex::new(script));
        let mut seen = Vec::new();
        pump(&backend, Duration::ZERO, |f| {
            seen.push(match f {
                Feed::Connected => "connected".to_string(),
                Feed::Snapshot(s) => format!("snapshot {}", s.peers.len()),
                Feed::Malformed(_) => "malformed".into(),
                Feed::Closed(e) => format!("closed {e}"),
                Feed::Unreachable(e) => format!("unreachable {e}"),
            });
            seen.len() < stop_after
        });
        seen
    }

    #[test]
    fn bad_truncated_and_closed_streams_reconnect() {
        let ok = || Ok(r#"{"peers":[{"name":"a"}]}"#.to_string());
        let seen = kinds(
            vec![
                Ok(vec![ok(), Ok(r#"{"peers":[{"na"#.into()), ok()]),
                Ok(vec![Ok("[1,2]".into())]),
                Ok(vec![ok(), Err("connection reset".into())]),
                Err("connection refused".into()),
                Ok(vec![Ok(String::new()), ok()]),
            ],
            13,
        );
        assert_eq!(
            seen,
            [
                "connected",
                "snapshot 1",
                "malformed",
                "connected",
                "malformed",
                "connected",
                "snapshot 1",
                "closed connection reset",
                "unreachable connection refused",
                "connected",
                "snapshot 1",
                "closed the daemon closed the stream",
                "unreachable script over",
            ]
        );
    }

    #[test]
    fn non_objects_are_named() {
        let err = parse_line("42").unwrap_err().to_string();
        assert!(err.contains("a JSON number"), "{err}");
        assert!(parse_line("{}").is_ok());
    }
}
