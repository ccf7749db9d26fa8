//! Control-plane wire JSON (Go `tailcfg`), with Go's exact key casing.

use serde::{Deserialize, Serialize};

use crate::keys::ChallengePublic;

/// Early payload JSON (§3.5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyNoise {
    /// Challenge key (unused by OSS v1.90 clients).
    #[serde(rename = "nodeKeyChallenge", default)]
    pub node_key_challenge: ChallengePublic,
}
