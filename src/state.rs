//! The node's state directory: long-lived private keys and the `up` preferences.
//!
//! Layout (directory mode 0700, every file 0600, written atomically via a temp file + rename):
//! - `machine.key`  `privkey:<64 hex>`: the Noise static key; never rotated casually.
//! - `node.key`     `privkey:<64 hex>`: the WireGuard/node key; rotated when control says it expired.
//! - `prefs.json`   [`Prefs`]: what `tern up` asked for, so a restart comes back the same way.
//!
//! The disco key is *not* stored: a fresh one is made on every process start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Text prefix of a private key on disk (Tailscale's `key.NodePrivate`/`MachinePrivate` form).
const PRIVATE_PREFIX: &str = "privkey:";
const MACHINE_KEY_FILE: &str = "machine.key";
const NODE_KEY_FILE: &str = "node.key";
const PREFS_FILE: &str = "prefs.json";

/// Errors reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a private key in `privkey:<64 hex>` form")]
    BadKey { path: PathBuf },
    #[error("{path}: bad preferences JSON: {source}")]
    BadPrefs {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Preferences set by `tern up` and cleared/kept by `tern down`; persisted across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Prefs {
    /// Coordination server URL, e.g. `http://127.0.0.1:8080`.
    pub login_server: Option<String>,
    /// Pre-auth key. Kept (in this 0600 file) because control may expire the node key later and
    /// re-registration then needs it again.
    pub auth_key: Option<String>,
    /// Hostname sent in Hostinfo (defaults to the machine's hostname).
    pub hostname: Option<String>,
    /// `true` after `up`, `false` after `down`: whether the daemon talks to control at start.
    pub want_running: bool,
    /// `tern set --relay-server-port=N`: run a peer relay server on UDP port N (0 = a port the
    /// kernel picks); `None` = no relay server (Go `RelayServerPort`).
    pub relay_server_port: Option<u16>,
    /// `tern set --relay-server-static-endpoints=ip:port,...`: addresses the relay server offers
    /// besides what it discovers (Go `RelayServerStaticEndpoints`), sorted, no duplicates.
    pub relay_server_static_endpoints: Vec<std::net::SocketAddr>,
    /// Exit node, subnet routes and firewall preferences.
    pub net: NetPrefs,
}

/// Routing preferences: using and offering an exit node, subnet routes, netfilter (Go's
/// `ExitNodeIP`, `ExitNodeAllowLANAccess`, `AdvertiseRoutes`, `RouteAll`, `NoSNAT`,
/// `NetfilterMode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetPrefs {
    /// The exit node in use, as the tailnet IP it had when chosen (`None` = none).
    pub exit_node: Option<std::net::IpAddr>,
    /// With an exit node, the LAN stays reachable directly.
    pub exit_node_allow_lan_access: bool,
    /// Offer this node as an exit node (advertises 0.0.0.0/0 and ::/0).
    pub advertise_exit_node: bool,
    /// Subnets offered to the tailnet (validated: no tailnet ranges, overlaps or hosts).
    pub advertise_routes: Vec<ipnet::IpNet>,
    /// Install the subnet routes peers offer (`--accept-routes`; off by default on Linux).
    pub accept_routes: bool,
    /// Masquerade traffic forwarded from the tailnet (default on).
    pub snat_subnet_routes: bool,
    /// `on`, `nodivert` or `off`.
    pub netfilter_mode: String,
    /// Point the host's resolver at MagicDNS (`--accept-dns`, default on as in Go).
    pub accept_dns: bool,
    /// Drop new connections from elsewhere into the TUN (`--stateful-filtering`, off by default
    /// as in Go).
    pub stateful_filtering: bool,
}

impl Default for NetPrefs {
    fn default() -> Self {
        Self {
            exit_node: None,
            exit_node_allow_lan_access: false,
            advertise_exit_node: false,
            advertise_routes: Vec::new(),
            accept_routes: false,
            snat_subnet_routes: true,
            netfilter_mode: "on".into(),
            accept_dns: true,
            stateful_filtering: false,
        }
    }
}

impl NetPrefs {
    /// What goes to control as `Hostinfo.RoutableIPs`: the subnets, plus both default routes
    /// when offering an exit node.
    pub fn routable_ips(&self) -> Vec<ipnet::IpNet> {
        let mut ips = self.advertise_routes.clone();
        if self.advertise_exit_node {
            ips.push(crate::routing::default_v4());
            ips.push(crate::routing::default_v6());
        }
        ips
    }

    /// Whether this node forwards traffic for others (and so needs ip_forward).
    pub fn forwards(&self) -> bool {
        self.advertise_exit_node || !self.advertise_routes.is_empty()
    }
}

/// A 32-byte private key as read from the state directory (clamping is the key type's job).
pub type PrivateKeyBytes = [u8; 32];

/// Handle on an existing, permission-checked state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Open `dir`, creating it with mode 0700 if needed, and tighten its mode if it is looser.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let io_err = |source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The machine private key, generated with `generate` and stored on first use.
    pub fn machine_key(
        &self,
        generate: impl FnOnce() -> PrivateKeyBytes,
    ) -> Result<PrivateKeyBytes, StateError> {
        self.load_or_create_key(MACHINE_KEY_FILE, generate)
    }

    /// The node private key, generated with `generate` and stored on first use.
    pub fn node_key(
        &self,
        generate: impl FnOnce() -> PrivateKeyBytes,
    ) -> Result<PrivateKeyBytes, StateError> {
        self.load_or_create_key(NODE_KEY_FILE, generate)
    }

    /// Replace the node key (after control reported it expired).
    pub fn store_node_key(&self, key: &PrivateKeyBytes) -> Result<(), StateError> {
        self.write_atomic(NODE_KEY_FILE, encode_private_key(key).as_bytes())
    }

    /// The stored preferences, or the defaults when none were saved yet.
    pub fn load_prefs(&self) -> Result<Prefs, StateError> {
        let path = self.dir.join(PREFS_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::BadPrefs { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Prefs::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn store_prefs(&self, prefs: &Prefs) -> Result<(), StateError> {
        let mut json = serde_json::to_vec_pretty(prefs).map_err(|source| StateError::BadPrefs {
            path: self.dir.join(PREFS_FILE),
            source,
        })?;
        json.push(b'\n');
        self.write_atomic(PREFS_FILE, &json)
    }

    fn load_or_create_key(
        &self,
        name: &str,
        generate: impl FnOnce() -> PrivateKeyBytes,
    ) -> Result<PrivateKeyBytes, StateError> {
        let path = self.dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => parse_private_key(&text).ok_or(StateError::BadKey { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = generate();
                self.write_atomic(name, encode_private_key(&key).as_bytes())?;
                Ok(key)
            }
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Write `name` so that a crash leaves either the old or the new content, never a mix,
    /// and the file is never readable by others, not even for a moment.
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let io_err = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        file.write_all(bytes).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        fs::rename(&tmp, &path).map_err(io_err)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
        Ok(())
    }
}

/// `privkey:<64 lowercase hex>` plus a newline.
pub fn encode_private_key(key: &PrivateKeyBytes) -> String {
    format!("{PRIVATE_PREFIX}{}\n", hex::encode(key))
}

/// Parse `privkey:<64 hex>` (either hex case, surrounding whitespace allowed).
pub fn parse_private_key(text: &str) -> Option<PrivateKeyBytes> {
    let hex_part = text.trim().strip_prefix(PRIVATE_PREFIX)?;
    if hex_part.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut key).ok()?;
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keys_are_created_once_with_tight_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let first = state.machine_key(|| [7; 32]).unwrap();
        assert_eq!(first, [7; 32]);
        let again = state.machine_key(|| [9; 32]).unwrap();
        assert_eq!(
            again, [7; 32],
            "an existing key must be kept, not regenerated"
        );
        assert_eq!(mode(&dir.join(MACHINE_KEY_FILE)), 0o600);
        let text = fs::read_to_string(dir.join(MACHINE_KEY_FILE)).unwrap();
        assert_eq!(text, format!("privkey:{}\n", "07".repeat(32)));
    }

    #[test]
    fn loose_directory_mode_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::open(tmp.path()).unwrap();
        assert_eq!(mode(tmp.path()), 0o700);
    }

    #[test]
    fn node_key_can_be_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        state.node_key(|| [1; 32]).unwrap();
        state.store_node_key(&[2; 32]).unwrap();
        assert_eq!(state.node_key(|| [3; 32]).unwrap(), [2; 32]);
        assert_eq!(mode(&tmp.path().join(NODE_KEY_FILE)), 0o600);
    }

    #[test]
    fn prefs_round_trip_and_default_when_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        assert_eq!(state.load_prefs().unwrap(), Prefs::default());
        let prefs = Prefs {
            login_server: Some("http://127.0.0.1:9".into()),
            auth_key: Some("tskey-x".into()),
            hostname: Some("n1".into()),
            want_running: true,
            relay_server_port: Some(40000),
            relay_server_static_endpoints: vec!["203.0.113.7:40000".parse().unwrap()],
            net: NetPrefs {
                exit_node: Some("100.64.0.2".parse().unwrap()),
                advertise_routes: vec!["10.2.9.0/24".parse().unwrap()],
                netfilter_mode: "nodivert".into(),
                ..NetPrefs::default()
            },
        };
        state.store_prefs(&prefs).unwrap();
        assert_eq!(
            StateDir::open(tmp.path()).unwrap().load_prefs().unwrap(),
            prefs
        );
        assert_eq!(mode(&tmp.path().join(PREFS_FILE)), 0o600);
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join(MACHINE_KEY_FILE), "privkey:zz").unwrap();
        assert!(matches!(
            state.machine_key(|| [0; 32]),
            Err(StateError::BadKey { .. })
        ));
        fs::write(tmp.path().join(PREFS_FILE), "{not json").unwrap();
        assert!(matches!(
            state.load_prefs(),
            Err(StateError::BadPrefs { .. })
        ));
    }

    #[test]
    fn private_key_text_form() {
        let key = [0xab; 32];
        assert_eq!(parse_private_key(&encode_private_key(&key)), Some(key));
        assert_eq!(
            parse_private_key(&format!("privkey:{}", "AB".repeat(32))),
            Some(key)
        );
        assert_eq!(
            parse_private_key(&format!("nodekey:{}", "ab".repeat(32))),
            None
        );
        assert_eq!(parse_private_key("privkey:abab"), None);
    }
}
