//! The lab's error type: what went wrong and, where a person can fix it, what to do.

use std::io;

/// Errors from building, driving or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab needs root (namespaces, nftables).
    #[error("the network lab needs root (network namespaces, nftables): run it as root")]
    NotRoot,
    /// A command-line tool the lab shells out to is not installed.
    #[error("`{tool}` not found in PATH: install it (Debian: apt-get install -y {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    /// A namespace with the lab's prefix already exists.
    #[error(
        "a lab with prefix `{prefix}` already exists (namespace `{name}`): remove it with \
         `tern lab down --force` or pick another prefix"
    )]
    NameClash { prefix: String, name: String },
    /// A command ran but failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A name (NAT mode, node, prefix) that the lab does not know.
    #[error("{0}")]
    Invalid(String),
    /// The Caddy/tsnet binary is missing.
    #[error(
        "Caddy with the Tailscale plugin not found at {path}: run `bash .ci/install-test-deps` \
         (or set TERN_CADDY to its path)"
    )]
    CaddyMissing { path: String },
    /// Something did not happen in time.
    #[error("timed out after {seconds:.1} s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
}

impl LabError {
    /// Wrap an I/O error with what the lab was doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias for the lab.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
