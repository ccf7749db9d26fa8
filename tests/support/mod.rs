//! Helpers shared by the lab integration tests: root check, an in-process STUN server, a STUN
//! client and a disco-like hole punch.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern::stun;
use tern_lab::Netns;

pub mod lab_cli;

/// Fail (never skip) when not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "lab tests need root (network namespaces, nftables): run `cargo test` as root"
    );
}

/// Whether the running kernel is 6.2 or later, which has UDP segmentation offload (USO) on TUN
/// devices: tests check that tern uses it there, and does without it before.
pub fn kernel_has_uso() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 2)
}

/// Makes every send on `sock` a UDP GSO batch of `size`-byte datagrams (`UDP_SEGMENT`).
pub fn set_udp_segment(sock: &UdpSocket, size: u16) -> std::io::Result<()> {
    let segment = libc::c_int::from(size);
    // SAFETY: a live socket, and an int option whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::IPPROTO_UDP,
            libc::UDP_SEGMENT,
            std::ptr::addr_of!(segment).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A STUN server on some addresses of a namespace, answering Tailscale binding requests from a
/// thread; stopped on Drop.
pub struct StunServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl StunServer {
    pub fn start(ns: &Netns, addrs: &[SocketAddr]) -> StunServer {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = addrs
            .iter()
            .map(|addr| {
                let sock = ns.bind_udp(*addr).expect("bind STUN server socket");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || serve_stun(sock, &stop))
            })
            .collect();
        StunServer { stop, threads }
    }
}

fn serve_stun(sock: UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Ok(tx) = stun::parse_binding_request(&buf[..n]) {
            let _ = sock.send_to(&stun::response(tx, from), from);
        }
    }
}

impl Drop for StunServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Ask `server` which address `sock` is seen as: 4 tries of 400 ms, `None` if no answer. Other
/// packets arriving meanwhile are returned in `others` (payload, source).
pub fn stun_query(
    sock: &UdpSocket,
    server: SocketAddr,
    others: &mut Vec<(Vec<u8>, SocketAddr)>,
) -> Option<SocketAddr> {
    let tx = stun::TxId::random();
    let request = stun::request(tx);
    let mut buf = [0u8; 1500];
    for _ in 0..4 {
        sock.send_to(&request, server).expect("send STUN request");
        let deadline = Instant::now() + Duration::from_millis(400);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            match stun::parse_response(&buf[..n]) {
                Ok((got, mapped)) if got == tx => return Some(mapped),
                _ => others.push((buf[..n].to_vec(), from)),
            }
        }
    }
    None
}

/// Everything waiting on `sock` right now (it must be fine to wait `wait` for stragglers).
pub fn drain(sock: &UdpSocket, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    sock.set_read_timeout(Some(wait)).unwrap();
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        out.push((buf[..n].to_vec(), from));
    }
    out
}

/// A TCP listener that accepts connections from a thread until dropped.
pub struct TcpSink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpSink {
    pub fn start(listener: TcpListener) -> TcpSink {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        TcpSink {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What one side of a punch saw.
#[derive(Debug)]
pub struct PunchResult {
    /// The source the peer's packets came from, if any arrived.
    pub heard_from: Option<SocketAddr>,
    /// How many of the peer's packets arrived.
    pub received: usize,
}

/// Disco-style punching: send `me` to `target` every 100 ms for `rounds` rounds; when a packet from
/// the peer arrives, switch the target to the source actually seen.
pub fn punch(
    sock: UdpSocket,
    me: &'static str,
    mut target: SocketAddr,
    rounds: u32,
) -> PunchResult {
    let mut result = PunchResult {
        heard_from: None,
        received: 0,
    };
    let mut buf = [0u8; 1500];
    for _ in 0..rounds {
        let _ = sock.send_to(me.as_bytes(), target);
        let deadline = Instant::now() + Duration::from_millis(100);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            if buf[..n].starts_with(b"punch") && &buf[..n] != me.as_bytes() {
                result.received += 1;
                result.heard_from = Some(from);
                target = from;
            }
        }
    }
    result
}

/// A finished command's status and output, for assertion messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Poll `probe` every 100 ms until it yields a value; after `secs` seconds fail the test with
/// `what` and `logs()`.
pub fn wait<T>(
    what: &str,
    secs: u64,
    logs: impl Fn() -> String,
    probe: impl FnMut() -> Option<T>,
) -> T {
    wait_for(what, Duration::from_secs(secs), logs, probe)
}

/// [`wait`] with any timeout.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    logs: impl Fn() -> String,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:.1} s waiting for {what}\n{}",
            timeout.as_secs_f64(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `lines` lines of `text` (logs in failure messages stay readable).
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = String::new();
    if skip > 0 {
        out += &format!("[… {skip} earlier lines]\n");
    }
    out += &all[skip..].join("\n");
    out
}

/// Runs `body` on a current-thread runtime inside a fresh namespace (named `<unique>-<suffix>`)
/// whose only address is `ip`/24 on a veth pair, then removes the namespace.
pub fn in_namespace_with_address<F>(
    suffix: &str,
    ip: &str,
    body: impl FnOnce() -> F + Send + 'static,
) where
    F: std::future::Future<Output = ()>,
{
    require_root();
    let ns = Netns::create(&format!("{}-{suffix}", tern_lab::topology::unique_prefix()))
        .expect("namespace");
    ns.ip_batch(&format!(
        "link add r0 type veth peer name r1\naddr add {ip}/24 dev r0\nlink set r0 up\nlink set r1 up\n"
    ))
    .expect("a veth pair with the address");
    ns.run_in(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| tern_lab::LabError::io("tokio runtime", e))?;
        runtime.block_on(body());
        Ok(())
    })
    .expect("test body in the namespace");
}

/// promtool, extracted by .ci/install-test-deps.
pub fn promtool() -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/prometheus/root/usr/bin/promtool");
    assert!(
        path.exists(),
        "{} missing: run .ci/install-test-deps",
        path.display()
    );
    path
}

/// `promtool check metrics` on `text` (Prometheus's own linter): Err with its complaints.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().ok_or("promtool's stdin")?;
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool ({}): {said}", out.status))
    }
}
