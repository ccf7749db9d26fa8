//! Why a control attempt ended, shared by the dialer and the session (no cycle between them).

/// Why a control attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Worth retrying: control down, connection lost, bad bytes on the wire, a timeout.
    #[error("{0}")]
    Transient(String),
    /// Control refused the login (e.g. a bad auth key); retrying without new input won't help.
    #[error("login refused: {0}")]
    LoginRefused(String),
}

impl ControlError {
    /// A retryable error: `context: error: cause: …` with the whole source chain, since the
    /// outer errors (hyper's "connection error") often hide the reason.
    pub fn transient(
        context: &str,
        err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Transient(format!("{context}: {}", error_chain(err.into().as_ref())))
    }
}

/// An error and its sources, joined by `: `, skipping sources the message already shows.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}
