//! Long-running processes inside a namespace, with stdout and stderr captured, killed on Drop.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{LabError, Result};
use crate::netns::{describe, Netns};

/// Output collected so far (stdout and stderr interleaved as they arrive).
type Captured = Arc<Mutex<Vec<u8>>>;

/// A process started inside a namespace. Killed (SIGTERM, then SIGKILL after a grace period) on
/// Drop, also when a test panics.
#[derive(Debug)]
pub struct Process {
    name: String,
    netns: String,
    command: String,
    child: Child,
    output: Captured,
    readers: Vec<JoinHandle<()>>,
    grace: Duration,
    exited: Option<ExitStatus>,
}

impl Process {
    /// Start `program args…` inside `ns`, capturing its output. `name` labels it in messages.
    pub fn spawn(ns: &Netns, name: &str, program: &str, args: &[&str]) -> Result<Process> {
        let mut cmd = ns.command(program);
        cmd.args(args);
        Process::spawn_command(ns, name, cmd)
    }

    /// Start a prepared command (from `Netns::command`, with env and cwd set by the caller).
    pub fn spawn_command(ns: &Netns, name: &str, mut cmd: Command) -> Result<Process> {
        let command = describe(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| LabError::io(format!("starting {command}"), err))?;
        let output: Captured = Arc::default();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(capture(out, output.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(capture(err, output.clone()));
        }
        tracing::debug!(netns = ns.name(), %command, pid = child.id(), "started");
        Ok(Process {
            name: name.to_string(),
            netns: ns.name().to_string(),
            command,
            child,
            output,
            readers,
            grace: Duration::from_secs(3),
            exited: None,
        })
    }

    /// How long Drop waits after SIGTERM before SIGKILL (default 3 s).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its PID (the real program's: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn command_line(&self) -> &str {
        &self.command
    }

    /// Everything it printed so far, lossily decoded.
    pub fn output(&self) -> String {
        let bytes = self.output.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .map_err(|err| LabError::io(format!("waiting for {}", self.name), err))?;
        }
        Ok(self.exited)
    }

    /// Wait until its output contains `needle`; fails on timeout or if it exits first.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                return Err(LabError::Invalid(format!(
                    "{} exited ({status}) before printing {needle:?}; output:\n{}",
                    self.name,
                    self.output()
                )));
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!("{} to print {needle:?}", self.name),
                    seconds: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send a signal.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal)
            .map_err(|errno| LabError::io(format!("signalling {}", self.name), errno.into()))
    }

    /// Stop it: SIGTERM, wait up to the grace period, then SIGKILL. Returns its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(self.finish(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(|err| LabError::io(format!("waiting for {}", self.name), err))?;
        self.exited = Some(status);
        Ok(self.finish(status))
    }

    fn finish(&mut self, status: ExitStatus) -> ExitStatus {
        // The readers end when the pipes close; a grandchild holding them open must not hang us,
        // so they are detached rather than joined.
        self.readers.clear();
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!(process = %self.name, %err, "could not stop");
        }
    }
}

fn capture(mut stream: impl Read + Send + 'static, into: Captured) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let (Ok(mut out), Some(chunk)) = (into.lock(), buf.get(..n)) {
                out.extend_from_slice(chunk);
            }
        }
    })
}
