//! The daemon's recent log lines, kept in memory for `tern bugreport` (LocalAPI
//! `GET /localapi/v0/logs`): every line the log writes to stderr also lands in a bounded ring
//! ([`MAX_LINES`] lines, [`MAX_BYTES`] bytes; the oldest go first), colour codes removed.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// Lines kept at most.
pub const MAX_LINES: usize = 2000;
/// Bytes kept at most (the text of the lines).
pub const MAX_BYTES: usize = 512 * 1024;
/// A longer line is cut (its start kept).
const MAX_LINE: usize = 4096;

/// A bounded ring of log lines.
#[derive(Debug, Default)]
pub struct LogRing {
    lines: VecDeque<String>,
    bytes: usize,
    /// A line written in pieces, until its newline.
    partial: String,
}

impl LogRing {
    /// Appends written bytes; complete lines enter the ring.
    pub fn write(&mut self, bytes: &[u8]) {
        let text = strip_ansi(&String::from_utf8_lossy(bytes));
        for piece in text.split_inclusive('\n') {
            match piece.strip_suffix('\n') {
                Some(end) => {
                    let mut line = std::mem::take(&mut self.partial);
                    line.push_str(end);
                    self.push(line);
                }
                None => self.partial.push_str(piece),
            }
        }
        if self.partial.len() > MAX_LINE {
            let line = std::mem::take(&mut self.partial);
            self.push(line);
        }
    }

    fn push(&mut self, mut line: String) {
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > MAX_LINES || self.bytes > MAX_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let skip = self.lines.len().saturating_sub(n);
        self.lines.iter().skip(skip).cloned().collect()
    }
}

/// Removes terminal colour sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The daemon's ring (empty in other commands).
pub fn global() -> &'static Mutex<LogRing> {
    static RING: OnceLock<Mutex<LogRing>> = OnceLock::new();
    RING.get_or_init(|| Mutex::new(LogRing::default()))
}

/// The last `n` lines of the daemon's log.
pub fn recent(n: usize) -> Vec<String> {
    global().lock().map(|r| r.tail(n)).unwrap_or_default()
}

/// A log writer for `tracing_subscriber`: stderr, and a copy into the ring.
pub struct TeeWriter;

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut ring) = global().lock() {
            ring.write(buf);
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TeeWriter {
    type Writer = TeeWriter;

    fn make_writer(&'a self) -> Self::Writer {
        TeeWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_assembled_stripped_and_bounded() {
        let mut ring = LogRing::default();
        ring.write(b"\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m first");
        ring.write(b" line\nsecond\nthi");
        assert_eq!(ring.tail(10), ["2026  INFO first line", "second"]);
        ring.write(b"rd\n");
        assert_eq!(ring.tail(1), ["third"]);
        for i in 0..MAX_LINES + 10 {
            ring.write(format!("line {i}\n").as_bytes());
        }
        assert_eq!(ring.lines.len(), MAX_LINES);
        assert_eq!(ring.tail(1), [format!("line {}", MAX_LINES + 9)]);
        let long = "x".repeat(MAX_BYTES);
        for _ in 0..3 {
            ring.write(format!("{long}\n").as_bytes());
        }
        assert!(ring.bytes <= MAX_BYTES, "{}", ring.bytes);
        assert!(ring.tail(1)[0].len() <= MAX_LINE);
        let bytes: usize = ring.lines.iter().map(String::len).sum();
        assert_eq!(bytes, ring.bytes);
    }
}
