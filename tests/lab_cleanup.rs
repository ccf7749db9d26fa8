//! Teardown: a topology leaves no namespace, nft table or process behind, also when the code using
//! it panics; a leftover lab with the same prefix is a clear error.

mod support;

use std::path::Path;
use std::time::Duration;

use support::require_root;
use tern_lab::topology::{namespaces_with_prefix, unique_prefix};
use tern_lab::{LabError, NatMode, Netns, Process, Topology};

fn pid_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes (the Process reaped it or will).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn dropping_a_topology_removes_namespaces_and_processes() {
    require_root();
    let topo = Topology::standard_unique(NatMode::Easy, NatMode::Hard).expect("build lab");
    let prefix = topo.prefix().to_string();
    let nat1 = topo.ns("nat1").unwrap();
    let tables = nat1.exec(&["nft", "list", "tables"]).unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout).to_string();
    assert!(
        tables.contains("table inet lab") && tables.contains("table ip labnat"),
        "{tables}"
    );
    // A stray process the lab did not start itself: killed with the namespace.
    let stray = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            topo.ns("relay").unwrap().name(),
            "sleep",
            "600",
        ])
        .spawn()
        .unwrap();
    let stray_pid = stray.id();
    std::thread::sleep(Duration::from_millis(100));
    assert!(pid_alive(stray_pid));
    assert_eq!(namespaces_with_prefix(&prefix).unwrap().len(), 7);
    drop(topo);
    assert!(namespaces_with_prefix(&prefix).unwrap().is_empty());
    let mut stray = stray;
    let _ = stray.wait();
    assert!(
        !pid_alive(stray_pid),
        "process in a lab namespace survived teardown"
    );
}

#[test]
fn a_panic_while_the_lab_runs_still_tears_it_down() {
    require_root();
    let prefix = unique_prefix();
    let pid = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = pid.clone();
    let inner_prefix = prefix.clone();
    let outcome = std::panic::catch_unwind(move || {
        let topo = Topology::standard(&inner_prefix, NatMode::Fw, NatMode::Easy).unwrap();
        let sleeper = Process::spawn(topo.ns("c1").unwrap(), "sleeper", "sleep", &["600"]).unwrap();
        *seen.lock().unwrap() = Some(sleeper.pid());
        assert_eq!(namespaces_with_prefix(&inner_prefix).unwrap().len(), 7);
        panic!("deliberate panic inside the lab");
    });
    assert!(outcome.is_err(), "the closure must have panicked");
    assert!(
        namespaces_with_prefix(&prefix).unwrap().is_empty(),
        "namespaces left after panic"
    );
    let pid = pid.lock().unwrap().expect("sleeper started");
    assert!(!pid_alive(pid), "process left after panic");
}

#[test]
fn a_leftover_lab_with_the_same_prefix_is_a_clear_error() {
    require_root();
    let prefix = unique_prefix();
    let leftover = Netns::create(&format!("{prefix}-c2")).unwrap();
    let err = Topology::standard(&prefix, NatMode::Easy, NatMode::Easy).unwrap_err();
    assert!(matches!(err, LabError::NameClash { .. }), "{err:?}");
    assert!(err.to_string().contains("tern lab down --force"), "{err}");
    // Nothing else was created.
    assert_eq!(
        namespaces_with_prefix(&prefix).unwrap(),
        vec![format!("{prefix}-c2")]
    );
    drop(leftover);
    assert!(namespaces_with_prefix(&prefix).unwrap().is_empty());
    assert!(!Path::new(&format!("/run/netns/{prefix}-c2")).exists());
}

#[test]
fn bad_prefixes_and_modes_are_rejected() {
    require_root();
    assert!(Topology::standard("Bad-Prefix", NatMode::Easy, NatMode::Easy).is_err());
    let err = "symmetric".parse::<NatMode>().unwrap_err();
    assert!(
        err.to_string()
            .contains("easy, hard, fw, udpblock, portfwd, none"),
        "{err}"
    );
}

/// Resident memory of `pid` in KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn deleting_a_namespace_waits_until_its_processes_have_exited() {
    require_root();
    let ns = Netns::create(&format!("{}-slow", unique_prefix())).unwrap();
    // `dd` with a 256 MiB buffer: once killed it spends a while giving the memory back, which is
    // when a delete that only sent SIGKILL returned while the process was still there.
    let mut dd = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "dd"])
        .args(["if=/dev/zero", "of=/dev/null", "bs=256M"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = dd.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rss_kib(pid) < 200 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "dd never filled its buffer"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ns.pids().unwrap().contains(&(pid as i32)));
    ns.delete().unwrap();
    assert!(!pid_alive(pid), "the namespace's process was still exiting");
    let _ = dd.wait();
}
