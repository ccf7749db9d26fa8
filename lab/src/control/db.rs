//! The node database: every registered node, persisted as JSON in the state directory.
//!
//! Writes are atomic (temporary file, fsync, rename), so a crash leaves either the old or the new
//! database, never half of one. Keys are kept in their Tailscale text form (`mkey:…`,
//! `nodekey:…`); this crate does not interpret them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ControlError;

/// File name of the node database inside the state directory.
pub const DB_FILE: &str = "nodes.json";
/// File name of the server's Noise private key inside the state directory.
pub const NOISE_KEY_FILE: &str = "noise.key";

/// One registered node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node ID (positive, never reused).
    pub id: u64,
    /// Stable node ID string.
    pub stable_id: String,
    /// Machine key (`mkey:…`), the Noise identity; addresses stay with it.
    pub machine_key: String,
    /// Current node key (`nodekey:…`).
    pub node_key: String,
    /// Latest disco key (`discokey:…`), empty until the first map request.
    #[serde(default)]
    pub disco_key: String,
    /// DNS label, unique in the tailnet.
    pub name: String,
    /// Tailnet IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Tailnet IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Latest Hostinfo, as the node sent it (NetInfo kept across updates that omit it).
    #[serde(default)]
    pub hostinfo: serde_json::Value,
    /// Latest UDP endpoints (`ip:port`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Home DERP region (0 = unknown).
    #[serde(default)]
    pub home_derp: u32,
    /// Capability version from the node's latest request.
    #[serde(default)]
    pub cap_version: u32,
    /// Whether the node is removed once it goes offline.
    #[serde(default)]
    pub ephemeral: bool,
    /// Whether the node logged out (its key is expired until it registers again).
    #[serde(default)]
    pub logged_out: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// When the node key expires, seconds since the Unix epoch (`None` = never).
    #[serde(default)]
    pub key_expiry_unix: Option<u64>,
    /// Whether a map stream is connected (runtime only, not persisted).
    #[serde(skip)]
    pub online: bool,
    /// When the node was last connected, seconds since the Unix epoch (runtime only).
    #[serde(skip)]
    pub last_seen_unix: Option<u64>,
}

impl NodeRecord {
    /// Whether the node key has expired at `now_unix`.
    pub fn key_expired(&self, now_unix: u64) -> bool {
        self.key_expiry_unix.is_some_and(|t| t <= now_unix)
    }

    /// The Hostinfo hostname, if the node sent one.
    pub fn hostname(&self) -> Option<&str> {
        self.hostinfo.get("Hostname").and_then(|h| h.as_str())
    }
}

/// On-disk form of the database.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDb {
    /// Next node ID to hand out.
    pub next_id: u64,
    /// Nodes, sorted by ID.
    pub nodes: Vec<NodeRecord>,
    /// One-shot pre-auth keys already used, and the machine key that used each.
    #[serde(default)]
    pub used_auth_keys: BTreeMap<String, String>,
}

impl NodeDb {
    /// Loads the database from `state_dir`, or an empty one if it does not exist yet.
    pub fn load(state_dir: &Path) -> Result<Self, ControlError> {
        let path = state_dir.join(DB_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(NodeDb {
                    next_id: 1,
                    ..NodeDb::default()
                })
            }
            Err(source) => return Err(io_err(format!("read {}", path.display()), source)),
        };
        let mut db: NodeDb = serde_json::from_str(&text).map_err(|err| ControlError::Database {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        db.nodes.sort_by_key(|n| n.id);
        let max_id = db.nodes.iter().map(|n| n.id).max().unwrap_or(0);
        db.next_id = db.next_id.max(max_id + 1);
        Ok(db)
    }

    /// Writes the database to `state_dir` atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), ControlError> {
        let text = serde_json::to_vec_pretty(self).map_err(|err| ControlError::Database {
            path: state_dir.join(DB_FILE),
            reason: err.to_string(),
        })?;
        write_atomic(&state_dir.join(DB_FILE), &text)
    }

    /// Addresses in use.
    pub fn used_v4(&self) -> BTreeSet<Ipv4Addr> {
        self.nodes.iter().map(|n| n.ipv4).collect()
    }
}

/// Creates the state directory (mode 0700) if needed.
pub fn ensure_state_dir(state_dir: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| io_err(format!("create state dir {}", state_dir.display()), source))
}

/// Loads the server's Noise private key from the state directory, creating it on first start.
///
/// The key must persist: clients keep the first Noise public key they saw (control.md §2).
/// File format: `privkey:<64 hex>` and a newline, mode 0600.
pub fn load_or_create_noise_key(state_dir: &Path) -> Result<[u8; 32], ControlError> {
    let path = state_dir.join(NOISE_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_private_key(text.trim()).ok_or_else(|| ControlError::Database {
            path,
            reason: "not a `privkey:` followed by 64 hex digits".into(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let key = random_key()?;
            write_atomic(&path, format!("privkey:{}\n", to_hex(&key)).as_bytes())?;
            Ok(key)
        }
        Err(source) => Err(io_err(format!("read {}", path.display()), source)),
    }
}

fn parse_private_key(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("privkey:")?;
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from the kernel's CSPRNG, clamped as an X25519 scalar.
fn random_key() -> Result<[u8; 32], ControlError> {
    let mut key = [0u8; 32];
    let mut n = 0;
    while n < key.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `key`.
        let got = unsafe { libc::getrandom(key[n..].as_mut_ptr().cast(), key.len() - n, 0) };
        if got < 0 {
            return Err(io_err("getrandom".into(), std::io::Error::last_os_error()));
        }
        n += got as usize;
    }
    key[0] &= 248;
    key[31] = (key[31] & 127) | 64;
    Ok(key)
}

/// Writes a file atomically: a temporary file in the same directory, fsync, rename, mode 0600.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), ControlError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|source| io_err(format!("write {}", path.display()), source))
}

fn io_err(what: String, source: std::io::Error) -> ControlError {
    ControlError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> NodeRecord {
        NodeRecord {
            id,
            stable_id: format!("n{id}"),
            machine_key: format!("mkey:{:064x}", id),
            node_key: format!("nodekey:{:064x}", id),
            disco_key: String::new(),
            name: format!("node{id}"),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: super::super::addr::v6_for(Ipv4Addr::new(100, 64, 0, id as u8)),
            hostinfo: serde_json::json!({"Hostname": "h"}),
            endpoints: vec!["10.0.0.1:41641".into()],
            home_derp: 900,
            cap_version: 130,
            ephemeral: false,
            logged_out: false,
            created_unix: 1,
            key_expiry_unix: None,
            online: true,
            last_seen_unix: None,
        }
    }

    #[test]
    fn database_round_trips_and_skips_runtime_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = NodeDb::load(dir.path()).unwrap();
        assert_eq!(db.next_id, 1);
        db.nodes.push(record(1));
        db.used_auth_keys.insert("k".into(), "mkey:1".into());
        db.next_id = 2;
        db.save(dir.path()).unwrap();
        let loaded = NodeDb::load(dir.path()).unwrap();
        assert_eq!(loaded.nodes.len(), 1);
        assert!(!loaded.nodes[0].online, "online is runtime state");
        assert_eq!(loaded.nodes[0].ipv4, db.nodes[0].ipv4);
        assert_eq!(loaded.used_auth_keys, db.used_auth_keys);
        assert!(!dir.path().join("nodes.tmp").exists());
    }

    #[test]
    fn corrupt_database_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), b"{\"next_id\": 1, \"nodes\": [").unwrap();
        let err = NodeDb::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("nodes.json"), "{err}");
    }

    #[test]
    fn noise_key_persists() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_noise_key(dir.path()).unwrap();
        let second = load_or_create_noise_key(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_ne!(first, [0u8; 32]);
        std::fs::write(dir.path().join(NOISE_KEY_FILE), "privkey:zz").unwrap();
        assert!(load_or_create_noise_key(dir.path()).is_err());
    }
}
