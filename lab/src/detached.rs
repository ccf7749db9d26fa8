//! Long-lived processes of the long-lived lab (`tern lab up`): started inside a namespace in their
//! own session with output to a log file, so they outlive the command that started them, and
//! stopped later (by another command) from what the state file recorded.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{LabError, Result};
use crate::netns::{describe, Netns};
use crate::state::ProcessState;

/// A process just started by [`spawn`]: what to record, and the child to watch while the
/// starting command still runs (it is never killed on Drop: it is meant to outlive us).
#[derive(Debug)]
pub struct Detached {
    /// What goes into the state file.
    pub state: ProcessState,
    child: Child,
}

impl Detached {
    /// Its exit status, if it has already exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// Start `program args…` in node `node` (namespace `ns`) in a new session, stdin from /dev/null,
/// stdout and stderr appended to `log`.
pub fn spawn(
    ns: &Netns,
    node: &str,
    name: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<Detached> {
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|err| LabError::io(format!("opening {log:?}"), err))
    };
    let mut cmd = ns.command(&program.to_string_lossy());
    // Plain text in the log file (tracing's formatter honours NO_COLOR).
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?);
    // SAFETY: setsid is async-signal-safe; it only detaches the child from our terminal and
    // process group, so Ctrl-C on (or the exit of) the starting command does not reach it.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(Into::into));
    }
    let command = describe(&cmd);
    let child = cmd
        .spawn()
        .map_err(|err| LabError::io(format!("starting {command}"), err))?;
    let pid = child.id();
    tracing::debug!(netns = ns.name(), %command, pid, "started detached");
    Ok(Detached {
        state: ProcessState {
            name: name.to_string(),
            node: node.to_string(),
            netns: ns.name().to_string(),
            pid,
            command,
            log: Some(log.to_path_buf()),
            alive: None,
            start_time: start_time(pid),
        },
        child,
    })
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot. Together with the PID it
/// names one process for good (a PID alone may be reused after a reboot-free while).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // `rest` starts at field 3 (state), so field 22 is index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the recorded process still runs: its PID exists with the recorded start time and it
/// is not a zombie.
pub fn is_alive(process: &ProcessState) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", process.pid)) else {
        return false;
    };
    let zombie = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|rest| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X");
    let same = match process.start_time {
        Some(recorded) => start_time(process.pid) == Some(recorded),
        None => true,
    };
    same && !zombie
}

/// Stop recorded processes: SIGTERM to each that is still the recorded process, wait up to
/// `grace` for all of them, then SIGKILL the rest. Returns the names of those that needed SIGKILL.
pub fn stop_all(processes: &[ProcessState], grace: Duration) -> Vec<String> {
    let signal_live = |signal: Signal| {
        for process in processes.iter().filter(|p| is_alive(p)) {
            let _ = kill(Pid::from_raw(process.pid as i32), signal);
        }
    };
    signal_live(Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while processes.iter().any(is_alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stubborn: Vec<String> = processes
        .iter()
        .filter(|p| is_alive(p))
        .map(|p| p.name.clone())
        .collect();
    signal_live(Signal::SIGKILL);
    stubborn
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_ourselves_is_stable_and_a_fake_one_is_not_alive() {
        let me = std::process::id();
        let started = start_time(me).expect("our own start time");
        assert_eq!(start_time(me), Some(started));
        let mut process = ProcessState {
            name: "me".into(),
            node: "n".into(),
            netns: "ns".into(),
            pid: me,
            command: "test".into(),
            log: None,
            alive: None,
            start_time: Some(started),
        };
        assert!(is_alive(&process));
        process.start_time = Some(started + 1);
        assert!(!is_alive(&process), "another start time is another process");
    }
}
