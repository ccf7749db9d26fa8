//! Running `nft` / `iptables` subprocesses and finding them on PATH.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{PlatformError, Result};

/// PATH used when the environment has none (a bare systemd unit): where Debian puts the tools.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The full path of executable `name`, searched on PATH (or the default PATH).
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A command line as text, for logs and errors.
pub(crate) fn display(program: &str, args: &[String]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `program args` with `stdin` fed in; returns the raw output whatever the exit status.
pub(crate) fn output(program: &str, args: &[String], stdin: Option<&[u8]>) -> Result<Output> {
    let cmd = display(program, args);
    let spawn_err = |source| PlatformError::CommandSpawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Dropping the pipe after writing closes it, so the tool sees EOF.
        pipe.write_all(data).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    tracing::trace!(%cmd, status = %out.status, "ran");
    Ok(out)
}

/// Runs the command and fails unless it exits 0; returns stdout.
pub(crate) fn run(program: &str, args: &[String], stdin: Option<&[u8]>) -> Result<String> {
    let out = output(program, args, stdin)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(failed(program, args, &out))
}

/// The error for a command that exited non-zero.
pub(crate) fn failed(program: &str, args: &[String], out: &Output) -> PlatformError {
    PlatformError::CommandFailed {
        cmd: display(program, args),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// Owned argument vector from string slices.
pub(crate) fn args<S: AsRef<str>>(parts: &[S]) -> Vec<String> {
    parts.iter().map(|s| s.as_ref().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_finds_sh_and_not_nonsense() {
        assert!(which("sh").is_some());
        assert!(which("tern-no-such-tool-xyz").is_none());
    }

    #[test]
    fn run_reports_stderr_of_failures() {
        let err = run("sh", &args(&["-c", "echo oops >&2; exit 3"]), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("oops"), "{err}");
        let out = run("cat", &[], Some(b"fed")).ok();
        assert_eq!(out.as_deref(), Some("fed"));
    }
}
