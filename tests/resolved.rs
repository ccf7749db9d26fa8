//! systemd-resolved for real (issue 14): the Debian package's resolved (extracted by
//! `.ci/install-test-deps`, never installed) runs on a private D-Bus inside c1's namespace, c1's
//! resolv.conf says resolved owns it, and tern configures the TUN link over D-Bus:
//! `resolvectl query <tsnet name>` answers through MagicDNS; `--accept-dns=false` reverts the
//! link (RevertLink) at once.

#[path = "support/lab_nodes.rs"]
mod lab_nodes;
#[path = "support/lab_server.rs"]
mod lab_server;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lab_nodes::{control_config, start_control_with, start_derp, tail, wait, Node};
use support::require_root;
use tern_lab::topology::CONTROL_IP;
use tern_lab::{CaddyConfig, CaddyNode, NatMode, Netns, Process, Topology};

const STUB_RESOLV_CONF: &str = "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\n# Do not edit.\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";

fn resolved_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/systemd-resolved/root");
    assert!(
        root.join("lib/systemd/systemd-resolved").exists(),
        "systemd-resolved is not extracted under {}: run .ci/install-test-deps",
        root.display()
    );
    root
}

/// /etc/netns/<ns>/: resolv.conf owned by resolved, passwd/group with its user, its config.
fn prepare_etc(ns: &Netns) {
    let etc = Path::new("/etc/netns").join(ns.name());
    std::fs::write(etc.join("resolv.conf"), STUB_RESOLV_CONF).expect("resolv.conf");
    let with = |file: &str, line: &str| {
        let mut text = std::fs::read_to_string(Path::new("/etc").join(file)).expect(file);
        if !text.contains("systemd-resolve:") {
            text.push_str(line);
        }
        std::fs::write(etc.join(file), text).expect(file);
    };
    with(
        "passwd",
        "systemd-resolve:x:990:990:resolved:/:/usr/sbin/nologin\n",
    );
    with("group", "systemd-resolve:x:990:\n");
    std::fs::create_dir_all(etc.join("systemd")).expect("systemd dir");
    std::fs::write(
        etc.join("systemd/resolved.conf"),
        "[Resolve]\nFallbackDNS=\nLLMNR=no\nMulticastDNS=no\nDNSSEC=no\nDNSOverTLS=no\n",
    )
    .expect("resolved.conf");
}

fn bus_config(dir: &Path, socket: &Path) -> PathBuf {
    let path = dir.join("bus.conf");
    std::fs::write(
        &path,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\n\
             <type>system</type>\n<listen>unix:path={}</listen>\n<auth>EXTERNAL</auth>\n\
             <policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>\
             <allow eavesdrop=\"true\"/><allow own=\"*\"/><allow user=\"*\"/></policy>\n\
             </busconfig>\n",
            socket.display()
        ),
    )
    .expect("bus.conf");
    path
}

fn resolvectl(ns: &Netns, bus: &str, args: &[&str]) -> String {
    let root = resolved_root();
    let out = ns
        .command(&root.join("usr/bin/resolvectl").display().to_string())
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .output()
        .expect("resolvectl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn tern_configures_systemd_resolved_over_d_bus() {
    require_root();
    let root = resolved_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Easy).expect("lab");
    let _derp = start_derp(&topo);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = control_config(dir.path());
    let domain = config.domain.clone();
    let _control = start_control_with(&topo, config);
    let c1 = topo.ns("c1").expect("c1");
    prepare_etc(c1);
    let socket = dir.path().join("bus.sock");
    let bus = format!("unix:path={}", socket.display());
    let bus_conf = bus_config(dir.path(), &socket);
    let _dbus = Process::spawn(
        c1,
        "dbus-daemon",
        "dbus-daemon",
        &["--config-file", &bus_conf.display().to_string(), "--nofork"],
    )
    .expect("dbus-daemon");
    wait("the private bus", 10, String::new, || {
        socket.exists().then_some(())
    });
    // resolved writes under /run/systemd: a tmpfs in its own mount namespace.
    let resolved_bin = root.join("lib/systemd/systemd-resolved");
    let mut resolved_cmd = c1.command("sh");
    resolved_cmd
        .args([
            "-c",
            &format!(
                "mount -t tmpfs tern-test /run/systemd && exec {}",
                resolved_bin.display()
            ),
        ])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
        .env("SYSTEMD_LOG_TARGET", "console");
    let resolved = Process::spawn_command(c1, "systemd-resolved", resolved_cmd).expect("resolved");
    wait(
        "resolved on the bus",
        10,
        || resolved.output(),
        || {
            resolvectl(c1, &bus, &["status"])
                .contains("Global")
                .then_some(())
        },
    );

    let env = [("DBUS_SYSTEM_BUS_ADDRESS", Path::new(bus.as_str()))];
    let ta = Node::start_with_env(c1, dir.path(), "ta", &env);
    ta.wait_for_api(20);
    ta.up("ta");
    let tsd = CaddyNode::start(
        topo.ns("c2").expect("c2"),
        CaddyConfig::new(
            "tsd",
            &format!("http://{CONTROL_IP}:8080"),
            lab_nodes::AUTH_KEY,
        ),
    )
    .expect("start tsd");
    let logs = || {
        format!(
            "{}\n== resolved\n{}\n== tsd\n{}",
            ta.logs(),
            tail(&resolved.output(), 40),
            tail(&tsd.logs(), 20)
        )
    };
    let tsd_ip = wait("ta sees tsd", 90, logs, || {
        ta.peer_entry("tsd")?["tailnet_ips"][0]
            .as_str()
            .map(str::to_string)
    });
    // tern set the link: quad-100 as its server, the tailnet's domain routed to it.
    let link = wait("resolved's tern0 link configured", 20, logs, || {
        let s = resolvectl(c1, &bus, &["status", "tern0"]);
        s.contains("100.100.100.100").then_some(s)
    });
    assert!(
        link.contains(&format!("~{domain}")) || link.contains(&domain),
        "{link}"
    );
    let dns = ta.status()["dns"].clone();
    assert_eq!(dns["manager"], "systemd-resolved", "{dns}");
    assert!(dns["error"].is_null(), "{dns}");
    // A name resolved by resolved, through MagicDNS.
    let answer = wait("resolvectl query through MagicDNS", 20, logs, || {
        let q = resolvectl(c1, &bus, &["query", &format!("tsd.{domain}")]);
        q.contains(&tsd_ip).then_some(q)
    });
    assert!(
        answer.contains("tern0"),
        "answered on tern's link: {answer}"
    );
    eprintln!("resolvectl status tern0:\n{link}\nresolvectl query:\n{answer}");
    // --accept-dns=false: RevertLink at once.
    let off = ta.cli(&["set", "--accept-dns=false"]);
    assert!(off.status.success(), "{off:?}");
    wait("the link reverted", 10, logs, || {
        (!resolvectl(c1, &bus, &["status", "tern0"]).contains("100.100.100.100")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        std::fs::read_to_string(Path::new("/etc/netns").join(c1.name()).join("resolv.conf"))
            .unwrap_or_default(),
        STUB_RESOLV_CONF,
        "resolved's file is never rewritten"
    );
}
