//! A private tmux server (its own `-L` socket) running one command in a pane of a fixed size,
//! for driving full-screen programs like `tern top` from tests. Killed on Drop.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct Tmux {
    server: String,
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("terntest-{}-{nanos}", std::process::id())
}

impl Tmux {
    /// Run `shell_command` (via `sh -c`) in a `cols`×`rows` pane.
    pub fn start(cols: u16, rows: u16, shell_command: &str) -> Tmux {
        let tmux = Tmux { server: unique() };
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            shell_command,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.server)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    /// The pane's visible text.
    pub fn capture(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "t"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Send keys (tmux key names: `q`, `Enter`, `Down`, `C-c`, or literal text).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        let out = self.run(&args);
        assert!(out.status.success(), "tmux send-keys {keys:?}");
    }

    /// Wait until the pane shows something `test` accepts; panics with the pane after `secs`.
    pub fn wait_for(&self, what: &str, secs: u64, test: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let pane = self.capture();
            if test(&pane) {
                return pane;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {secs} s waiting for {what}; pane:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}
