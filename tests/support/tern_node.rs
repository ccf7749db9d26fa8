//! Running `tern daemon` processes and their CLI from integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    pub fn start(state_dir: &Path, socket: &Path) -> Self {
        Self::start_with(state_dir, socket, &[])
    }

    /// Start with extra `tern daemon` flags.
    pub fn start_with(state_dir: &Path, socket: &Path, extra: &[&str]) -> Self {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_tern")),
            state_dir,
            socket,
            extra,
        )
    }

    /// Start inside the network namespace `netns` (its data plane then dials only there).
    pub fn start_in(netns: &str, state_dir: &Path, socket: &Path) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_tern")]);
        Self::spawn(cmd, state_dir, socket, &[])
    }

    fn spawn(mut cmd: Command, state_dir: &Path, socket: &Path, extra: &[&str]) -> Self {
        let child = cmd
            .args([
                "daemon",
                "--tun",
                "userspace-networking",
                "--port",
                "0",
                "--state-dir",
            ])
            .arg(state_dir)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env("TERN_LOG", "info,tern=debug")
            .spawn()
            .expect("spawn tern daemon");
        let daemon = Self {
            child,
            socket: socket.to_path_buf(),
        };
        wait_for("the LocalAPI socket to accept", || {
            std::os::unix::net::UnixStream::connect(socket)
                .is_ok()
                .then_some(())
        });
        daemon
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tern CLI")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tern {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `probe` until it yields a value; fail the test after 20 s.
pub fn wait_for<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    wait_for_secs(what, 20, probe)
}

/// Poll `probe` until it yields a value; fail the test after `secs` seconds.
pub fn wait_for_secs<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
