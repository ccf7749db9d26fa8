//! Interactive logins (`interactive_login = true`): a node that registers without a pre-auth key
//! gets a login ID (its `AuthURL` is `<server_url>/register/<id>`), waits on it with `Followup`,
//! and is admitted once someone approves the ID on the server's page. Pending logins live in
//! memory only and are bounded.

use std::collections::HashMap;
use std::io::Read;

use super::{RegisterInput, RegisterOutcome, Tailnet};
use crate::control::ControlError;

/// Pending logins kept at most; the oldest goes first.
const MAX_PENDING: usize = 256;

/// One login waiting for approval.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    machine_key: String,
    hostname: String,
    approved: bool,
    /// Order of creation, to drop the oldest when full.
    serial: u64,
}

#[derive(Debug, Default)]
pub(super) struct PendingLogins {
    by_id: HashMap<String, Pending>,
    next_serial: u64,
}

/// What the approval page shows for a login ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub hostname: String,
    pub approved: bool,
}

impl Tailnet {
    /// A register request without a pre-auth key.
    pub(super) fn interactive(
        &mut self,
        req: &RegisterInput,
        now_unix: u64,
    ) -> Result<RegisterOutcome, ControlError> {
        if !self.config.interactive_login {
            return Ok(RegisterOutcome::Rejected(
                "this lab server registers nodes only with a pre-auth key (interactive_login is off)"
                    .into(),
            ));
        }
        let Some(followup) = req.followup.as_deref().filter(|f| !f.is_empty()) else {
            return self.start_login(req);
        };
        let id = followup.rsplit('/').next().unwrap_or_default();
        let Some(pending) = self.logins.by_id.get(id) else {
            return Ok(RegisterOutcome::Rejected(
                "unknown or expired login; run `tern up` again".into(),
            ));
        };
        if pending.machine_key != req.machine_key {
            return Ok(RegisterOutcome::MachineMismatch);
        }
        if !pending.approved {
            return Ok(RegisterOutcome::NeedsLogin {
                login_id: id.to_string(),
            });
        }
        self.logins.by_id.remove(id);
        self.admit(req, None, now_unix)
    }

    fn start_login(&mut self, req: &RegisterInput) -> Result<RegisterOutcome, ControlError> {
        let id = random_id()?;
        if self.logins.by_id.len() >= MAX_PENDING {
            if let Some(oldest) = self
                .logins
                .by_id
                .iter()
                .min_by_key(|(_, p)| p.serial)
                .map(|(id, _)| id.clone())
            {
                self.logins.by_id.remove(&oldest);
            }
        }
        let serial = self.logins.next_serial;
        self.logins.next_serial += 1;
        let hostname = req
            .hostinfo
            .get("Hostname")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
            .to_string();
        self.logins.by_id.insert(
            id.clone(),
            Pending {
                machine_key: req.machine_key.clone(),
                hostname,
                approved: false,
                serial,
            },
        );
        Ok(RegisterOutcome::NeedsLogin { login_id: id })
    }

    /// The pending login `id`, for the approval page.
    pub fn login_request(&self, id: &str) -> Option<LoginRequest> {
        self.logins.by_id.get(id).map(|p| LoginRequest {
            hostname: p.hostname.clone(),
            approved: p.approved,
        })
    }

    /// Approves login `id`; its node is admitted at its next follow-up. `None` if unknown.
    pub fn approve_login(&mut self, id: &str) -> Option<LoginRequest> {
        let pending = self.logins.by_id.get_mut(id)?;
        pending.approved = true;
        Some(LoginRequest {
            hostname: pending.hostname.clone(),
            approved: true,
        })
    }
}

/// 16 random bytes as hex: login IDs must not be guessable (whoever knows one may approve it).
fn random_id() -> Result<String, ControlError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| ControlError::Io {
            what: "reading /dev/urandom".into(),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
