//! `tern top` against daemons: `--once` on a real daemon, the watch stream it reads, and a
//! fake daemon that sends truncated and malformed JSON or closes the stream: `tern top` (in
//! tmux) shows an error line, reconnects, and leaves the terminal as it found it. Loopback
//! Unix sockets only.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;

#[path = "support/tern_node.rs"]
mod tern_node;
#[path = "support/tmux.rs"]
mod tmux;
use tern_node::{wait_for, Daemon};
use tmux::Tmux;

#[test]
fn once_prints_a_frame_of_a_real_daemon_and_the_watch_stream_serves_it() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("tern.sock");
    let daemon = Daemon::start(&tmp.path().join("state"), &socket);
    let out = daemon.cli(&["top", "--once", "--size", "100x30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frame = String::from_utf8_lossy(&out.stdout);
    assert_eq!(frame.lines().count(), 30, "{frame}");
    assert!(frame.lines().all(|l| l.chars().count() <= 100), "{frame}");
    assert!(
        frame.starts_with(" tern top  (not in a tailnet yet)"),
        "{frame}"
    );
    assert!(frame.contains("peers 0"), "{frame}");
    assert!(frame.contains("no peers in the network map yet"), "{frame}");

    // The stream itself: the snapshot at once, as one JSON line.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = tern::localapi::Client::new(&socket);
    let first = runtime.block_on(async {
        let mut watch = client.watch().await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.next()).await
    });
    let first = first.expect("a snapshot at once").unwrap().unwrap();
    assert_eq!(first.backend_state, tern::status::BackendState::NoState);
}

#[test]
fn once_without_a_daemon_prints_the_not_reachable_frame_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--socket"])
        .arg(tmp.path().join("none.sock"))
        .args(["top", "--once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let frame = String::from_utf8_lossy(&out.stdout);
    assert!(frame.contains("tern daemon not reachable"), "{frame}");
    assert!(frame.contains("none.sock"), "{frame}");
}

/// What the fake daemon does with the next watch request.
enum Reply {
    /// Send these bytes as the stream body, then close.
    Lines(String),
    /// Send this line and keep the stream open until told otherwise.
    Hold(String),
}

const GOOD: &str = r#"{"schema_version":1,"backend_state":"Running","control":{"state":"connected"},"self":{"name":"c1.t","tailnet_ips":["100.64.0.1"]},"peers":[{"name":"c2.t","node_key":"nodekey:c2","tailnet_ips":["100.64.0.2"],"path":"direct","endpoint":"198.18.2.2:41641","latency_ms":0.6,"path_reason":"direct"}]}"#;

/// A fake LocalAPI: every connection takes the next [`Reply`]; a held stream ends when the
/// next reply arrives (so the test decides when the client must reconnect).
fn fake_daemon(listener: UnixListener, replies: mpsc::Receiver<Reply>) {
    let mut held: Option<UnixStream> = None;
    while let Ok(reply) = replies.recv() {
        // Ending the held stream makes the client reconnect, to be served this reply.
        drop(held.take());
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        // Read the request head.
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = |body: &str| format!("{:x}\r\n{body}\r\n", body.len());
        let _ = conn.write_all(head.as_bytes());
        match reply {
            Reply::Lines(body) => {
                let _ = conn.write_all(chunk(&body).as_bytes());
                // Cut the connection without the final chunk: a broken stream.
            }
            Reply::Hold(body) => {
                let _ = conn.write_all(chunk(&format!("{body}\n")).as_bytes());
                held = Some(conn);
            }
        }
    }
}

fn stty_ok(stty: &str) {
    // Cooked mode again: canonical input and echo on.
    let words: Vec<&str> = stty.split_whitespace().collect();
    assert!(
        words.contains(&"icanon") && words.contains(&"echo"),
        "terminal not restored: {stty}"
    );
}

#[test]
fn bad_and_cut_streams_show_an_error_line_and_reconnect_and_quit_restores_the_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || fake_daemon(listener, rx));
    let stty = tmp.path().join("stty.txt");
    let cmd = format!(
        "{} --socket {} top; echo TOP-EXITED $?; stty -a > {}; sleep 60",
        env!("CARGO_BIN_EXE_tern"),
        socket.display(),
        stty.display()
    );
    let tmux = Tmux::start(80, 24, &cmd);
    let stty_before = tmux.run(&["display", "-p", "ok"]);
    assert!(stty_before.status.success());

    tx.send(Reply::Hold(GOOD.into())).unwrap();
    tmux.wait_for("c2 DIRECT", 10, |p| p.contains("DIRECT c2"));

    // Truncated JSON, then the stream cut.
    tx.send(Reply::Lines(GOOD[..60].to_string())).unwrap();
    let pane = tmux.wait_for("the error line", 10, |p| {
        p.contains("! stream ended: the stream was cut in the middle of a snapshot")
    });
    assert!(pane.contains("DIRECT c2"), "the last data stays:\n{pane}");

    // Not JSON at all.
    tx.send(Reply::Lines("<html>oops</html>\n".into())).unwrap();
    tmux.wait_for("a second error line", 10, |p| {
        p.contains("! bad data from the daemon: expected value")
    });

    // Back to good: the error line goes.
    tx.send(Reply::Hold(GOOD.replace("0.6", "0.9"))).unwrap();
    tmux.wait_for("recovery", 10, |p| p.contains("0.9ms") && !p.contains("! "));

    // A close after a whole line also reconnects.
    tx.send(Reply::Lines(format!("{GOOD}\n"))).unwrap();
    tmux.wait_for("stream ended", 10, |p| p.contains("! stream ended"));
    tx.send(Reply::Hold(GOOD.into())).unwrap();
    tmux.wait_for("recovery again", 10, |p| {
        p.contains("0.6ms") && !p.contains("! ")
    });

    tmux.keys(&["q"]);
    let pane = tmux.wait_for("top to exit", 10, |p| p.contains("TOP-EXITED"));
    assert!(pane.contains("TOP-EXITED 0"), "{pane}");
    assert!(
        !pane.contains("DIRECT"),
        "the alternate screen must be gone:\n{pane}"
    );
    let stty = wait_for("stty output", || {
        std::fs::read_to_string(&stty)
            .ok()
            .filter(|s| !s.is_empty())
    });
    stty_ok(&stty);
}

#[test]
fn sigterm_and_sighup_restore_the_terminal() {
    for signal in ["TERM", "HUP"] {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("none.sock");
        let stty = tmp.path().join("stty.txt");
        let pidfile = tmp.path().join("pid");
        let cmd = format!(
            "{} --socket {} top & echo $! > {}; wait $!; echo TOP-EXITED $?; stty -a > {}; sleep 60",
            env!("CARGO_BIN_EXE_tern"),
            socket.display(),
            pidfile.display(),
            stty.display()
        );
        let tmux = Tmux::start(80, 24, &cmd);
        tmux.wait_for("the not-reachable screen", 10, |p| {
            p.contains("tern daemon not reachable")
        });
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let kill = std::process::Command::new("kill")
            .args([&format!("-{signal}"), pid.trim()])
            .status()
            .unwrap();
        assert!(kill.success());
        let pane = tmux.wait_for("top to exit", 10, |p| p.contains("TOP-EXITED"));
        assert!(
            !pane.contains("not reachable"),
            "{signal}: alternate screen left:\n{pane}"
        );
        let stty = wait_for("stty output", || {
            std::fs::read_to_string(&stty)
                .ok()
                .filter(|s| !s.is_empty())
        });
        stty_ok(&stty);
    }
}
