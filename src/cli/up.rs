//! `tern up` and `tern down`: connect to or leave the tailnet through the daemon's LocalAPI.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::localapi::{Client, UpRequest};
use crate::status::{BackendState, ControlState, Status};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Coordination server URL (default: the stored one, else Tailscale's https://controlplane.tailscale.com).
    #[arg(long)]
    pub login_server: Option<String>,
    /// Pre-auth key, or `file:PATH` to read it from a file.
    #[arg(long)]
    pub auth_key: Option<String>,
    /// Hostname to register with.
    #[arg(long)]
    pub hostname: Option<String>,
    /// How long to wait for an interactive login to be approved (e.g. `5m`; default: no limit).
    #[arg(long, value_parser = super::ping::parse_duration)]
    pub timeout: Option<Duration>,
    /// Print the login URL and the final state as JSON lines (`{"AuthURL":…}`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub net: super::net_flags::NetFlags,
}

/// How long `tern up` waits for control's first answer before it leaves the daemon retrying.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(30);
/// How often `tern up` looks at the daemon's status while it waits.
const POLL: Duration = Duration::from_millis(200);

/// What `tern up` sees in the status while it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpProgress {
    /// Connected: done.
    Running,
    /// Control wants a person to visit this URL; keep waiting.
    VisitUrl(String),
    /// Control refused the login (the error text).
    Refused(String),
    /// The first attempt failed and the daemon is retrying on its own: done (as before).
    Retrying,
    /// Nothing decided yet.
    Pending,
}

/// Pure: where a login stands, from one status snapshot.
pub fn up_progress(status: &Status) -> UpProgress {
    match (
        &status.backend_state,
        &status.auth_url,
        status.control.state,
    ) {
        (BackendState::Running, _, _) => UpProgress::Running,
        (BackendState::NeedsLogin, Some(url), _) => UpProgress::VisitUrl(url.clone()),
        (_, _, ControlState::LoginFailed) => UpProgress::Refused(
            status
                .control
                .last_error
                .as_ref()
                .map_or_else(|| "login refused".into(), |e| e.message.clone()),
        ),
        (_, _, ControlState::Backoff) => UpProgress::Retrying,
        _ => UpProgress::Pending,
    }
}

/// `tern up`.
pub fn up(socket: &Path, args: &UpArgs) -> anyhow::Result<ExitCode> {
    let auth_key = args.auth_key.as_deref().map(resolve_auth_key).transpose()?;
    let req = UpRequest {
        login_server: args.login_server.clone(),
        auth_key,
        hostname: args.hostname.clone(),
    };
    super::runtime()?.block_on(async {
        let client = Client::new(socket);
        client.up(&req).await?;
        let code = wait_for_login(&client, args).await?;
        apply_net_flags(&client, args).await?;
        Ok(code)
    })
}

/// Routing flags given to `up` apply once the node runs: the exit node is looked up in the
/// netmap, which exists only then.
async fn apply_net_flags(client: &Client, args: &UpArgs) -> anyhow::Result<()> {
    let net = args.net.patch();
    if net.is_empty() {
        return Ok(());
    }
    let req = crate::localapi::SetRequest {
        net,
        ..Default::default()
    };
    client.set(&req).await?;
    super::net_flags::print_forwarding_advice(client, &req.net).await;
    Ok(())
}

/// Waits for control's first answer; when it is a login URL, shows it and waits (up to
/// `--timeout`) until the node is authorised, as `tailscale up` does.
async fn wait_for_login(client: &Client, args: &UpArgs) -> anyhow::Result<ExitCode> {
    let started = tokio::time::Instant::now();
    let mut shown: Option<String> = None;
    loop {
        let progress = up_progress(&client.status().await?);
        match progress {
            UpProgress::Running => {
                if args.json {
                    println!("{}", serde_json::json!({"BackendState": "Running"}));
                } else if shown.is_some() {
                    eprintln!("Success.");
                }
                return Ok(ExitCode::SUCCESS);
            }
            UpProgress::Refused(why) => anyhow::bail!("login refused: {why}"),
            UpProgress::Retrying if shown.is_none() => return Ok(ExitCode::SUCCESS),
            UpProgress::VisitUrl(url) if shown.as_ref() != Some(&url) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"AuthURL": url, "BackendState": "NeedsLogin"})
                    );
                } else {
                    eprintln!("\nTo authenticate, visit:\n\n\t{url}\n");
                }
                shown = Some(url);
            }
            _ => {}
        }
        let limit = match (&shown, args.timeout) {
            (Some(_), Some(t)) => Some(t),
            (Some(_), None) => None,
            (None, t) => Some(t.unwrap_or(FIRST_ANSWER_WAIT).min(FIRST_ANSWER_WAIT)),
        };
        if limit.is_some_and(|l| started.elapsed() >= l) {
            if shown.is_some() {
                anyhow::bail!("timed out waiting for the login to be approved");
            }
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `tern logout`.
pub fn logout(socket: &Path) -> anyhow::Result<ExitCode> {
    super::runtime()?.block_on(Client::new(socket).logout())?;
    Ok(ExitCode::SUCCESS)
}

/// `tern down`.
pub fn down(socket: &Path) -> anyhow::Result<ExitCode> {
    super::runtime()?.block_on(Client::new(socket).down())?;
    Ok(ExitCode::SUCCESS)
}

/// `KEY` or `file:PATH` (read as the user running the CLI; surrounding whitespace dropped).
fn resolve_auth_key(arg: &str) -> anyhow::Result<String> {
    let key = match arg.strip_prefix("file:") {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading auth key from {path}"))?,
        None => arg.to_string(),
    };
    let key = key.trim();
    anyhow::ensure!(!key.is_empty(), "the auth key is empty");
    Ok(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_waits_for_the_first_answer_and_for_a_login_url() {
        let mut s = Status::initial(Default::default(), std::time::SystemTime::UNIX_EPOCH);
        assert_eq!(up_progress(&s), UpProgress::Pending);
        s.control.state = ControlState::Connecting;
        assert_eq!(up_progress(&s), UpProgress::Pending);
        s.control.state = ControlState::Backoff;
        assert_eq!(up_progress(&s), UpProgress::Retrying);
        s.control.state = ControlState::WaitingForLogin;
        s.backend_state = BackendState::NeedsLogin;
        s.auth_url = Some("http://ctl/register/ab".into());
        assert_eq!(
            up_progress(&s),
            UpProgress::VisitUrl("http://ctl/register/ab".into())
        );
        s.backend_state = BackendState::Running;
        assert_eq!(up_progress(&s), UpProgress::Running);
        s.backend_state = BackendState::NeedsLogin;
        s.auth_url = None;
        s.control.state = ControlState::LoginFailed;
        assert!(matches!(up_progress(&s), UpProgress::Refused(_)));
    }

    #[test]
    fn auth_key_from_file_or_literal() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key");
        std::fs::write(&path, "tskey-abc\n").unwrap();
        assert_eq!(
            resolve_auth_key(&format!("file:{}", path.display())).unwrap(),
            "tskey-abc"
        );
        assert_eq!(resolve_auth_key("tskey-lit").unwrap(), "tskey-lit");
        let err = resolve_auth_key("file:/nonexistent/k").unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/k"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(resolve_auth_key(&format!("file:{}", path.display())).is_err());
    }
}
