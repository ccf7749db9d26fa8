//! The host's resolver through openresolv's `resolvconf` (when /etc/resolv.conf says resolvconf
//! wrote it, as Go's `net/dns/openresolv.go`): tern's record is the interface `tailscale`, added
//! with metric 0 and exclusive (`-m 0 -x -a tailscale`, so only quad-100 is in the generated
//! file) and removed with `-f -d tailscale`. The host's own servers (the forwarder's base) are
//! the other interfaces' records (`-i`, then `-l IFACE`). Debian's older `resolvconf` is told
//! apart by `--version` (exit 99 or "Debian resolvconf") and left alone.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::os::{BaseConfig, OsDnsConfig};

/// tern's interface name in resolvconf (Go's, so a tailscaled leftover is ours to remove too).
pub const INTERFACE: &str = "tailscale";
/// Each `resolvconf` run at most.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Which `resolvconf` is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Openresolv,
    Debian,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolvconfError {
    #[error("running resolvconf {args}: {source}")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("resolvconf {args} did not finish within {TIMEOUT:?}")]
    Timeout { args: String },
    #[error("resolvconf {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Which `resolvconf` is on PATH; `None` when there is none.
pub async fn flavor() -> Option<Flavor> {
    let out = tokio::time::timeout(
        TIMEOUT,
        Command::new("resolvconf")
            .arg("--version")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let debian = out.status.code() == Some(99)
        || String::from_utf8_lossy(&out.stdout).contains("Debian resolvconf");
    Some(if debian {
        Flavor::Debian
    } else {
        Flavor::Openresolv
    })
}

/// The record tern hands resolvconf (resolv.conf syntax).
pub fn record(config: &OsDnsConfig) -> String {
    let mut out = String::new();
    for ns in &config.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !config.search.is_empty() {
        out.push_str(&format!("search {}\n", config.search.join(" ")));
    }
    out
}

/// Points resolvconf at `config` (exclusive, first).
pub async fn set(config: &OsDnsConfig) -> Result<(), ResolvconfError> {
    run(&["-m", "0", "-x", "-a", INTERFACE], Some(record(config))).await?;
    Ok(())
}

/// Removes tern's record (no error when there is none).
pub async fn clear() -> Result<(), ResolvconfError> {
    run(&["-f", "-d", INTERFACE], None).await?;
    Ok(())
}

/// [`clear`] without a runtime (for `Drop`).
pub fn clear_blocking() {
    let result = std::process::Command::new("resolvconf")
        .args(["-f", "-d", INTERFACE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match result {
        Ok(out) if out.status.success() => tracing::info!("openresolv: tern's record removed"),
        Ok(out) => tracing::warn!(
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "openresolv: removing tern's record"
        ),
        Err(e) => tracing::warn!(error = %e, "openresolv: removing tern's record"),
    }
}

/// The host's own configuration: every interface's record but tern's.
pub async fn base() -> BaseConfig {
    let Ok(list) = run(&["-i"], None).await else {
        return BaseConfig::default();
    };
    let mut text = String::new();
    for iface in list.split_whitespace().filter(|i| *i != INTERFACE) {
        if let Ok(records) = run(&["-l", iface], None).await {
            text.push_str(&records);
            text.push('\n');
        }
    }
    BaseConfig::parse(&text)
}

/// Runs `resolvconf ARGS` (stdin when given); its stdout.
async fn run(args: &[&str], stdin: Option<String>) -> Result<String, ResolvconfError> {
    let joined = args.join(" ");
    let mut child = Command::new("resolvconf")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ResolvconfError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes()).await;
    }
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| ResolvconfError::Timeout {
            args: joined.clone(),
        })?
        .map_err(|source| ResolvconfError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ResolvconfError::Failed {
            args: joined,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_resolv_conf_text() {
        let config = OsDnsConfig {
            nameservers: vec!["100.100.100.100".parse().unwrap()],
            search: vec!["lab.tern.test".into(), "example.lab".into()],
        };
        assert_eq!(
            record(&config),
            "nameserver 100.100.100.100\nsearch lab.tern.test example.lab\n"
        );
        assert_eq!(record(&OsDnsConfig::default()), "");
    }
}
