//! The services `tern lab up` starts in the lab after building it: the lab coordination server in
//! `server` (on `topology::CONTROL_IP:8080`), `tern derp` on the relay host (TLS, self-signed, on
//! `RELAY_IPS[0]:443`, the control DERP map's region 900) and a `tern daemon` with a kernel TUN
//! (`tern0`) in `c1` and `c2`, registered with it, so `ip netns exec <prefix>-c1 ping <c2's
//! tailnet IP>` works over DERP. Every process is started detached (it outlives the CLI) and recorded in the lab's state, so
//! `tern lab down` stops it; its output goes to a log file in the lab's state directory.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tern_lab::detached::{self, Detached};
use tern_lab::state::{self, LabState, ServiceState, SocketState, TernNodeState};
use tern_lab::topology::{v6_of, CONTROL_IP, RELAY_IPS};
use tern_lab::Netns;

use crate::localapi::{Client, UpRequest};
use crate::status::{BackendState, Status};

/// Port of the lab coordination server.
pub const CONTROL_PORT: u16 = 8080;
/// The clients that get a tern node, by lab node name (also their tailnet hostnames).
pub const TERN_CLIENTS: [&str; 2] = ["c1", "c2"];
/// The lab node that runs the optional relay node (`tern lab up --relay`): public, no NAT.
pub const RELAY_NODE: &str = "server";
/// The relay node's tailnet host name.
pub const RELAY_HOSTNAME: &str = "relay";
/// The UDP port of the relay node's peer relay server.
pub const RELAY_SERVER_PORT: u16 = 40000;
/// How long each start-up step may take before `tern lab up` gives up (and tears the lab down).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The control server's URL.
pub fn control_url() -> String {
    format!("http://{CONTROL_IP}:{CONTROL_PORT}")
}

/// Start the control server and the tern nodes in lab `lab` (just built), recording each in its
/// state file as it starts. On error the caller tears the lab down.
///
/// With `relay`, a third tern node (host name `relay`) runs on the public `server` host with
/// its peer relay server on [`RELAY_SERVER_PORT`]; the lab's control config grants every node
/// `tailscale.com/cap/relay` on every other, so the clients may use it.
pub fn start(lab: &mut LabState, options: &StartOptions) -> anyhow::Result<()> {
    let (relay, exit_node) = (options.relay, options.exit_node);
    let dir = state::state_dir(&lab.prefix);
    let auth_key = format!("tskey-auth-lab-{}", hex::encode(rand::random::<[u8; 16]>()));
    let config = dir.join("control.toml");
    write_private(
        &config,
        &control_config(&dir, &auth_key, lab.ipv6, exit_node, &options.node_attrs),
    )?;
    write_private(&dir.join("auth.key"), &auth_key)?;
    // Refuse a bad config here, with its own error, rather than as a dead server later.
    tern_lab::control::Config::load(&config).context("the generated control config")?;
    if options.synthetic_peers > 0 {
        register_synthetic_nodes(&dir.join("control"), options.synthetic_peers)?;
    }

    let exe = std::env::current_exe().context("finding the tern executable")?;
    let server_ns = Netns::open(&format!("{}-server", lab.prefix))?;
    let config_arg = config.display().to_string();
    let mut control = start_process(
        lab,
        &server_ns,
        "server",
        "control",
        &exe,
        &["lab", "control", "--config", &config_arg],
    )?;
    let listen = SocketAddr::from((CONTROL_IP, CONTROL_PORT));
    lab.sockets.push(SocketState {
        name: "control".into(),
        node: "server".into(),
        proto: "tcp".into(),
        addr: listen,
    });
    lab.services.push(ServiceState {
        kind: "control".into(),
        name: "control".into(),
        node: "server".into(),
        url: control_url(),
    });
    lab.save()?;
    wait_until(&mut control, "the control server to answer /key", || {
        answers_key(&server_ns, listen)
    })?;

    start_derp(lab, &exe)?;

    let mut daemons = Vec::new();
    for client in TERN_CLIENTS {
        daemons.push(start_daemon(lab, &exe, client, client)?);
    }
    if relay {
        daemons.push(start_daemon(lab, &exe, RELAY_NODE, RELAY_HOSTNAME)?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    for node in &lab.tern_nodes {
        let req = UpRequest {
            login_server: Some(control_url()),
            auth_key: Some(auth_key.clone()),
            hostname: Some(node.hostname.clone()),
        };
        runtime
            .block_on(Client::new(&node.socket).up(&req))
            .with_context(|| format!("`tern up` on {}", node.hostname))?;
    }
    let peers = lab.tern_nodes.len().saturating_sub(1);
    for (daemon, node) in daemons.iter_mut().zip(&lab.tern_nodes) {
        let what = format!(
            "{} to be Running with {peers} peer(s) and its data plane up",
            node.hostname
        );
        wait_until(daemon, &what, || {
            let status = runtime.block_on(Client::new(&node.socket).status()).ok()?;
            // Peers' home DERP known: the first packets have somewhere to go.
            (status.backend_state == BackendState::Running
                && status.peers.len() >= peers
                && status.peers.iter().all(|p| p.home_derp.is_some())
                && status.data_plane.active)
                .then_some(())
        })?;
    }
    if relay {
        let expect_off = options.node_attrs.iter().any(|a| {
            a.attr == crate::relay::ATTR_DISABLE_RELAY_SERVER
                && a.host.as_deref().is_none_or(|host| host == "relay")
        });
        start_relay_server(lab, &runtime, daemons.last_mut(), expect_off)?;
    }
    if exit_node {
        start_exit_node(lab, &exe, &runtime)?;
    }
    Ok(())
}

/// The internet host's HTTP server, and c2 as c1's exit node (forwarding on in c2's namespace,
/// as an admin would do; control auto-approves the routes in this lab).
fn start_exit_node(
    lab: &mut LabState,
    exe: &Path,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let inet = Netns::open(&format!("{}-inet", lab.prefix))?;
    let addr = SocketAddr::from((tern_lab::topology::INTERNET_IP, 80));
    let listen = addr.to_string();
    let mut web = start_process(
        lab,
        &inet,
        "inet",
        "whoami",
        exe,
        &["lab", "whoami", &listen],
    )?;
    wait_until(&mut web, "the internet host's HTTP server", || {
        inet.run_in(move || Ok(std::net::TcpStream::connect(addr).is_ok()))
            .ok()
            .filter(|up| *up)
    })?;
    Netns::open(&format!("{}-c2", lab.prefix))?.sysctl("net.ipv4.ip_forward", "1")?;
    let socket = |name: &str| {
        lab.tern_nodes
            .iter()
            .find(|n| n.hostname == name)
            .map(|n| n.socket.clone())
            .with_context(|| format!("no tern node {name}"))
    };
    let (c1, c2) = (Client::new(&socket("c1")?), Client::new(&socket("c2")?));
    let set = |net: crate::localapi::NetPrefsPatch| crate::localapi::SetRequest {
        net,
        ..Default::default()
    };
    runtime.block_on(c2.set(&set(crate::localapi::NetPrefsPatch {
        advertise_exit_node: Some(true),
        ..Default::default()
    })))?;
    wait_until(&mut web, "c1 to see c2 offer an exit node", || {
        let status = runtime.block_on(c1.status()).ok()?;
        status
            .peers
            .iter()
            .any(|p| p.hostname == "c2" && p.exit_node_option)
            .then_some(())
    })?;
    runtime.block_on(c1.set(&set(crate::localapi::NetPrefsPatch {
        exit_node: Some("c2".into()),
        ..Default::default()
    })))?;
    Ok(())
}

/// Turns on the relay node's peer relay server and waits until it has an address to offer, or,
/// with `expect_off` (the lab gave it `disable-relay-server`), says why it is off.
fn start_relay_server(
    lab: &LabState,
    runtime: &tokio::runtime::Runtime,
    daemon: Option<&mut Detached>,
    expect_off: bool,
) -> anyhow::Result<()> {
    let (Some(daemon), Some(node)) = (daemon, lab.tern_nodes.last()) else {
        bail!("the relay node did not start");
    };
    let client = Client::new(&node.socket);
    let set = crate::localapi::SetRequest {
        relay_server_port: Some(RELAY_SERVER_PORT),
        relay_server_port_set: true,
        ..Default::default()
    };
    runtime
        .block_on(client.set(&set))
        .context("`tern set --relay-server-port` on the relay node")?;
    let outcome = wait_until(daemon, "the relay server to find its address", || {
        let status = runtime.block_on(client.status()).ok()?;
        if let Some(why) = status.relay_server_off {
            return Some(Err(why));
        }
        let offers = status.relay_server?.addr_ports;
        (!offers.is_empty()).then_some(Ok(()))
    })?;
    match outcome {
        Err(why) if !expect_off => bail!("the relay node's relay server is off: {why}"),
        // Off as `--node-attr disable-relay-server` asked, and its status says so.
        _ => Ok(()),
    }
}

/// Port of the lab's DERP server (TLS).
pub const DERP_PORT: u16 = 443;

/// Start `tern derp` on the relay host and wait until it accepts connections.
fn start_derp(lab: &mut LabState, exe: &Path) -> anyhow::Result<()> {
    let dir = state::state_dir(&lab.prefix);
    let relay_ns = Netns::open(&format!("{}-relay", lab.prefix))?;
    let relay = RELAY_IPS[0];
    let listen = SocketAddr::from((relay, DERP_PORT));
    let (addr_arg, host_arg, key_arg) = (
        listen.to_string(),
        relay.to_string(),
        dir.join("derp.key").display().to_string(),
    );
    // The second IPv4 address, and in a dual-stack lab both IPv6 twins.
    let stun_also: Vec<String> = std::iter::once(RELAY_IPS[1].into())
        .chain(
            RELAY_IPS
                .iter()
                .filter(|_| lab.ipv6)
                .filter_map(|ip| v6_of(*ip).map(IpAddr::V6)),
        )
        .map(|ip: IpAddr| ip.to_string())
        .collect();
    let mut args = vec![
        "derp",
        "--addr",
        &addr_arg,
        "--self-signed",
        &host_arg,
        "--key-file",
        &key_arg,
    ];
    for ip in &stun_also {
        args.extend(["--stun-also", ip]);
    }
    let mut derp = start_process(lab, &relay_ns, "relay", "derp", exe, &args)?;
    lab.sockets.push(SocketState {
        name: "derp".into(),
        node: "relay".into(),
        proto: "tcp".into(),
        addr: listen,
    });
    lab.services.push(ServiceState {
        kind: "derp".into(),
        name: "derp".into(),
        node: "relay".into(),
        url: format!("https://{listen}"),
    });
    lab.save()?;
    wait_until(&mut derp, "the DERP server to accept connections", || {
        accepts_tcp(&relay_ns, listen)
    })
}

/// Whether a TCP connection to `addr` from inside `ns` succeeds.
fn accepts_tcp(ns: &Netns, addr: SocketAddr) -> Option<()> {
    ns.run_in(move || Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()))
        .unwrap_or(false)
        .then_some(())
}

/// Start `tern daemon` in lab node `client` and wait for its LocalAPI socket.
fn start_daemon(
    lab: &mut LabState,
    exe: &Path,
    node: &str,
    hostname: &str,
) -> anyhow::Result<Detached> {
    let dir = state::state_dir(&lab.prefix);
    let ns = Netns::open(&format!("{}-{node}", lab.prefix))?;
    let socket = dir.join(format!("{hostname}.sock"));
    let state_dir = dir.join(hostname);
    let (socket_arg, state_arg) = (
        socket.display().to_string(),
        state_dir.display().to_string(),
    );
    let exe_arg = exe.display().to_string();
    let daemon_args = [
        exe_arg.as_str(),
        "--socket",
        &socket_arg,
        "daemon",
        "--state-dir",
        &state_arg,
        "--tun",
        "tern0",
    ];
    let wrapper = std::env::var(DAEMON_WRAPPER_ENV).unwrap_or_default();
    let command = wrapped(&wrapper, &daemon_args);
    let mut daemon = start_process(
        lab,
        &ns,
        node,
        &format!("tern:{hostname}"),
        Path::new(command[0]),
        &command[1..],
    )?;
    lab.tern_nodes.push(TernNodeState {
        hostname: hostname.to_string(),
        node: node.to_string(),
        netns: ns.name().to_string(),
        status_command: format!("tern --socket {socket_arg} status"),
        socket: socket.clone(),
        state_dir,
        backend_state: None,
        tailnet_ips: Vec::new(),
        peers: Vec::new(),
    });
    lab.save()?;
    wait_until(
        &mut daemon,
        &format!("the LocalAPI socket {socket:?}"),
        || {
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ())
        },
    )?;
    Ok(daemon)
}

/// Names a command that lab daemons run under, split at spaces (`valgrind --tool=callgrind`,
/// `strace -f -o /tmp/trace`): for profiling and debugging a node (bench/hot_code.sh).
const DAEMON_WRAPPER_ENV: &str = "TERN_LAB_DAEMON_WRAPPER";

/// `command` run under `wrapper` (words split at whitespace; an empty wrapper adds nothing).
fn wrapped<'a>(wrapper: &'a str, command: &[&'a str]) -> Vec<&'a str> {
    wrapper
        .split_whitespace()
        .chain(command.iter().copied())
        .collect()
}

/// Start `exe args…` detached in `ns`, log to `<state dir>/<label>.log`, record it and save.
fn start_process(
    lab: &mut LabState,
    ns: &Netns,
    node: &str,
    name: &str,
    exe: &Path,
    args: &[&str],
) -> anyhow::Result<Detached> {
    let log = state::state_dir(&lab.prefix).join(format!("{}.log", name.replace(':', "-")));
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let process = detached::spawn(ns, node, name, exe, &args, &log)?;
    lab.processes.push(process.state.clone());
    lab.save()?;
    Ok(process)
}

/// Poll `probe` every 100 ms until it yields; fail after `STEP_TIMEOUT` or if `process` exits,
/// quoting the end of its log.
fn wait_until<T>(
    process: &mut Detached,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        let log = process.state.log.clone().unwrap_or_default();
        if let Some(status) = process.exited() {
            bail!(
                "{} exited ({status}) while waiting for {what}; end of {}:\n{}",
                process.state.name,
                log.display(),
                detached::log_tail(&log, 20)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {} s waiting for {what}; end of {}:\n{}",
                STEP_TIMEOUT.as_secs(),
                log.display(),
                detached::log_tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `GET /key` on `addr`, from inside `ns`, answers 200.
fn answers_key(ns: &Netns, addr: SocketAddr) -> Option<()> {
    let ok = ns
        .run_in(move || {
            let answer = (|| -> std::io::Result<String> {
                let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                write!(conn, "GET /key?v=1 HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
                let mut head = [0u8; 16];
                let n = conn.read(&mut head)?;
                Ok(String::from_utf8_lossy(head.get(..n).unwrap_or_default()).into_owned())
            })();
            Ok(answer.is_ok_and(|head| head.contains(" 200")))
        })
        .unwrap_or(false);
    ok.then_some(())
}

/// The lab control server's config: one reusable key, a DERP region at the relay host (served by
/// `tern derp`, self-signed, hence `insecure_for_tests`), state in `<dir>/control`.
fn control_config(
    dir: &Path,
    auth_key: &str,
    ipv6: bool,
    approve_routes: bool,
    node_attrs: &[NodeAttr],
) -> String {
    let (relay, stun2) = (RELAY_IPS[0], RELAY_IPS[1]);
    // In a dual-stack lab both nodes get their IPv6 twins: clients STUN there for IPv6 (DERP
    // itself is served on IPv4 only; Go clients fall back to it at once).
    let v6 = |ip| match v6_of(ip).filter(|_| ipv6) {
        Some(v6) => v6.to_string(),
        None => "none".to_string(),
    };
    let (relay6, stun26) = (v6(relay), v6(stun2));
    // `--node-attr` values are checked to be plain names, so quoting them is enough.
    let for_all = node_attrs
        .iter()
        .filter(|a| a.host.is_none())
        .map(|a| a.attr.as_str());
    let attrs = std::iter::once("disable-captive-portal-detection")
        .chain(for_all)
        .map(|attr| format!("\"{attr}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let for_hosts: String = node_attrs
        .iter()
        .filter_map(|a| Some((a.host.as_deref()?, a.attr.as_str())))
        .map(|(host, attr)| {
            format!("\n[[node_attribute]]\nnodes = [\"{host}\"]\nattrs = [\"{attr}\"]\n")
        })
        .collect();
    format!(
        r#"# Written by `tern lab up`; see lab/control.example.toml for every field.
listen = "{CONTROL_IP}:{CONTROL_PORT}"
state_dir = "{state}"
auto_approve_routes = {approve_routes}
node_attributes = [{attrs}]

[[auth_key]]
key = "{auth_key}"
reusable = true

[[derp_region]]
id = 900
code = "lab"
name = "Lab DERP"

[[derp_region.node]]
name = "900a"
host_name = "{relay}"
ipv4 = "{relay}"
ipv6 = "{relay6}"
stun_port = 3478
derp_port = 443
insecure_for_tests = true

# A second STUN address on the relay host, so nodes can see whether their NAT maps per
# destination (hard NAT); `tern derp --stun-also` answers there.
[[derp_region.node]]
name = "900b"
host_name = "{stun2}"
ipv4 = "{stun2}"
ipv6 = "{stun26}"
stun_port = 3478
stun_only = true

[[grant]]
src = ["*"]
dst = ["*"]
caps = ["tailscale.com/cap/relay"]
{for_hosts}"#,
        state = dir.join("control").display()
    )
}

/// What `tern lab up` starts besides the control server and the c1/c2 nodes.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// A third node `relay` with its peer relay server on the public host.
    pub relay: bool,
    /// c2 as an exit node for c1, and the "internet" host.
    pub exit_node: bool,
    /// Made-up nodes in the control server's database (see [`register_synthetic_nodes`]).
    pub synthetic_peers: u32,
    /// Node attributes besides the default ones (`--node-attr`).
    pub node_attrs: Vec<NodeAttr>,
}

/// A node attribute for every node, or for the node with hostname `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttr {
    pub host: Option<String>,
    pub attr: String,
}

/// First address of the synthetic nodes: far above the real nodes' 100.64.0.x.
const SYNTHETIC_BASE: Ipv4Addr = Ipv4Addr::new(100, 70, 0, 1);

/// Writes `count` made-up nodes into the control server's node database (a fresh lab has none
/// yet): random keys, offline, no endpoints, home DERP 900. Nothing answers for them; they are
/// peers in every real node's netmap, for measuring what peers cost.
pub fn register_synthetic_nodes(control_state: &Path, count: u32) -> anyhow::Result<()> {
    use tern_lab::control::{addr, db, NodeDb, NodeRecord};
    db::ensure_state_dir(control_state)?;
    let key = |prefix: &str| format!("{prefix}:{}", hex::encode(rand::random::<[u8; 32]>()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let nodes = (0..count)
        .map(|i| {
            let ipv4 = Ipv4Addr::from(u32::from(SYNTHETIC_BASE) + i);
            let name = format!("synthetic-{i}");
            NodeRecord {
                id: u64::from(i) + 1,
                stable_id: format!("nSynthetic{i}"),
                machine_key: key("mkey"),
                node_key: key("nodekey"),
                disco_key: key("discokey"),
                hostinfo: serde_json::json!({ "Hostname": name }),
                name,
                ipv4,
                ipv6: addr::v6_for(ipv4),
                endpoints: Vec::new(),
                home_derp: 900,
                cap_version: 130,
                ephemeral: false,
                logged_out: false,
                created_unix: now,
                key_expiry_unix: None,
                online: false,
                last_seen_unix: None,
            }
        })
        .collect();
    let db = NodeDb {
        next_id: u64::from(count) + 1,
        nodes,
        used_auth_keys: Default::default(),
    };
    db.save(control_state)?;
    Ok(())
}

/// Write a file readable by root only (it holds the auth key).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Fill in each tern node's live state (backend state, tailnet IPs) by asking its daemon; a
/// daemon that does not answer within a second is left blank.
pub fn fill_live(lab: &mut LabState) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    for node in &mut lab.tern_nodes {
        let client = Client::new(&node.socket);
        let asked = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), client.status()).await
        });
        if let Ok(Ok(status)) = asked {
            apply_live(node, &status);
        }
    }
}

fn apply_live(node: &mut TernNodeState, status: &Status) {
    node.backend_state = serde_json::to_value(status.backend_state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string));
    node.tailnet_ips = status
        .self_node
        .as_ref()
        .map(|me| me.tailnet_ips.clone())
        .unwrap_or_default();
    node.peers = status
        .peers
        .iter()
        .map(|p| tern_lab::state::PeerPathState {
            hostname: p.hostname.clone(),
            path: p.path.clone(),
            endpoint: p.endpoint.clone(),
            derp_region: p.derp_region,
            path_reason: p.path_reason.clone(),
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use super::{control_config, wrapped, NodeAttr};

    #[test]
    fn node_attributes_asked_for_join_the_default_one_in_the_control_config() {
        let dir = std::path::Path::new("/run/tern-lab/x");
        let attr = |host: Option<&str>, attr: &str| NodeAttr {
            host: host.map(str::to_string),
            attr: attr.to_string(),
        };
        let attrs = [
            attr(None, "disable-relay-client"),
            attr(Some("relay"), "disable-relay-server"),
        ];
        let text = control_config(dir, "tskey-auth-lab-0", false, false, &attrs);
        let config = tern_lab::control::Config::parse(&text).expect("the config parses");
        assert_eq!(
            config.node_attributes,
            ["disable-captive-portal-detection", "disable-relay-client"]
        );
        assert_eq!(
            config.node_attributes_of("relay"),
            [
                "disable-captive-portal-detection",
                "disable-relay-client",
                "disable-relay-server"
            ]
        );
        assert_eq!(config.node_attributes_of("c1").len(), 2);
        let plain = control_config(dir, "tskey-auth-lab-0", false, false, &[]);
        let config = tern_lab::control::Config::parse(&plain).expect("the config parses");
        assert_eq!(config.node_attributes, ["disable-captive-portal-detection"]);
    }

    #[test]
    fn a_daemon_runs_under_the_wrappers_words_or_alone() {
        let daemon = ["/bin/tern", "daemon", "--tun", "tern0"];
        assert_eq!(wrapped("", &daemon), daemon);
        assert_eq!(wrapped("  ", &daemon), daemon);
        assert_eq!(
            wrapped(" valgrind  --tool=callgrind\t", &daemon[..2]),
            ["valgrind", "--tool=callgrind", "/bin/tern", "daemon"]
        );
    }
}
