//! Network namespaces: create, enter (per thread), run commands inside, delete with everything in them.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{LabError, Result};

/// How long deleting a namespace waits for its SIGKILLed processes to exit.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Tools the lab shells out to, with the Debian package that has them.
const TOOLS: [(&str, &str); 3] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
];

/// Check that we are root and that `ip`, `nft` and `conntrack` exist: a clear error otherwise.
pub fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::NotRoot);
    }
    for (tool, package) in TOOLS {
        if find_in_path(tool).is_none() {
            return Err(LabError::MissingTool { tool, package });
        }
    }
    Ok(())
}

/// Search PATH for `name` (the lab runs tools by name, so PATH is what counts).
pub fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file());
    found
}

/// A named network namespace (`ip netns`). If `owned`, it is deleted on Drop, after every process
/// inside it is killed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Create the namespace `name` (fails if it exists) with its loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        if Netns::exists(name) {
            return Err(LabError::Invalid(format!(
                "network namespace `{name}` already exists"
            )));
        }
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
            owned: true,
        };
        ns.ip_batch("link set lo up\n")?;
        ns.write_resolv_conf()?;
        Ok(ns)
    }

    /// Point the namespace's resolver at its own loopback, where nothing answers. `ip netns exec`
    /// bind-mounts `/etc/netns/<name>/resolv.conf` over `/etc/resolv.conf`; without it a process in
    /// the lab (tsnet's captive-portal and bootstrap lookups) would query the host's resolver
    /// address, which is outside the lab.
    pub(crate) fn write_resolv_conf(&self) -> Result<()> {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n"))
            .map_err(|err| LabError::io(format!("writing {}/resolv.conf", dir.display()), err))
    }

    /// A handle on an existing namespace that is not deleted on Drop.
    pub fn open(name: &str) -> Result<Netns> {
        if !Netns::exists(name) {
            return Err(LabError::Invalid(format!(
                "network namespace `{name}` does not exist"
            )));
        }
        Ok(Netns {
            name: name.to_string(),
            owned: false,
        })
    }

    /// Take over a namespace made elsewhere (e.g. by `Netns::create` in a batch): deleted on Drop.
    pub(crate) fn adopt(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            owned: true,
        }
    }

    /// Whether a named namespace exists.
    pub fn exists(name: &str) -> bool {
        Path::new(NETNS_DIR).join(name).exists()
    }

    /// The names of all named namespaces.
    pub fn list() -> Result<Vec<String>> {
        let dir = match std::fs::read_dir(NETNS_DIR) {
            Ok(dir) => dir,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(LabError::io(format!("reading {NETNS_DIR}"), err)),
        };
        let mut names: Vec<String> = dir
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The namespace's name (as `ip netns exec` takes it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stop deleting this namespace on Drop (for a long-lived lab).
    pub fn persist(&mut self) {
        self.owned = false;
    }

    /// A `Command` that runs `program` inside the namespace (via `ip netns exec`, which also gives
    /// it a private mount namespace with `/etc/netns/<name>/*` bind-mounted over `/etc`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Run `args[0] args[1..]` inside the namespace; its output, or an error if it failed.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| LabError::Invalid("empty command".into()))?;
        run(self.command(program).args(rest))
    }

    /// Like `exec` but returns the output whatever the exit status.
    pub fn exec_unchecked(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| LabError::Invalid("empty command".into()))?;
        let mut cmd = self.command(program);
        cmd.args(rest);
        cmd.output()
            .map_err(|err| LabError::io(format!("running {}", describe(&cmd)), err))
    }

    /// Feed `commands` (one `ip` command per line, without the leading `ip`) to `ip -n NS -batch -`.
    pub fn ip_batch(&self, commands: &str) -> Result<()> {
        run_with_stdin(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            commands,
        )
        .map(|_| ())
    }

    /// Load an nftables ruleset into the namespace (`nft -f -`, atomic).
    pub fn nft_apply(&self, ruleset: &str) -> Result<()> {
        run_with_stdin(self.command("nft").args(["-f", "-"]), ruleset).map(|_| ())
    }

    /// Set a sysctl under /proc/sys/net (which is per namespace) from a thread inside it.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.run_in(move || {
            std::fs::write(&path, value).map_err(|err| LabError::io(format!("writing {path}"), err))
        })
    }

    /// Move the calling thread into this namespace. Sockets it opens from now on live there. The
    /// network namespace is per thread, so the rest of the process is untouched; don't call this
    /// on a thread you will hand back to a pool (use `spawn_thread`).
    pub fn enter_for_thread(&self) -> Result<()> {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let file =
            File::open(&path).map_err(|err| LabError::io(format!("opening {path:?}"), err))?;
        setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|errno| LabError::io(format!("setns into {}", self.name), errno.into()))
    }

    /// Run `f` on a new thread that lives in this namespace. The thread's result is `f`'s, or the
    /// error from entering the namespace.
    pub fn spawn_thread<T, F>(&self, f: F) -> JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let ns = Netns {
            name: self.name.clone(),
            owned: false,
        };
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                ns.enter_for_thread()?;
                f()
            })
            .unwrap_or_else(|err| {
                // Spawning only fails when the system is out of threads; report it through the handle.
                let msg = format!("spawning a thread: {err}");
                std::thread::spawn(move || Err(LabError::Invalid(msg)))
            })
    }

    /// Run `f` on a thread inside this namespace and wait for it. Sockets made by `f` stay in this
    /// namespace wherever they are used later, so this is the way to get e.g. a `UdpSocket` of the
    /// namespace into a test's own threads (or into tokio with `from_std`).
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        self.spawn_thread(f)
            .join()
            .map_err(|_| LabError::Invalid(format!("thread in namespace {} panicked", self.name)))?
    }

    /// Bind a UDP socket inside this namespace.
    pub fn bind_udp(&self, addr: std::net::SocketAddr) -> Result<std::net::UdpSocket> {
        self.run_in(move || {
            std::net::UdpSocket::bind(addr)
                .map_err(|err| LabError::io(format!("binding UDP {addr}"), err))
        })
    }

    /// Bind a TCP listener inside this namespace.
    pub fn bind_tcp(&self, addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
        self.run_in(move || {
            std::net::TcpListener::bind(addr)
                .map_err(|err| LabError::io(format!("binding TCP {addr}"), err))
        })
    }

    /// PIDs of processes whose network namespace is this one (other than our own process).
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map_err(|err| LabError::io("running ip netns pids", err))?;
        let me = std::process::id() as i32;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse::<i32>().ok())
            .filter(|pid| *pid != me)
            .collect())
    }

    /// SIGKILL every process in the namespace and wait until none is left (at most
    /// `KILL_WAIT`): a killed process with many threads takes a while to exit on a busy machine,
    /// and callers go on to check that it is gone. Each round kills again, which catches a child
    /// forked meanwhile. Returns the pids still there at the deadline (empty when all exited).
    pub fn kill_all(&self) -> Result<Vec<i32>> {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() || Instant::now() >= deadline {
                return Ok(pids);
            }
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill everything inside and delete the namespace (and `/etc/netns/<name>` if we made one).
    pub fn delete(mut self) -> Result<()> {
        self.owned = false;
        delete_named(&self.name)
    }
}

/// Kill every process in namespace `name` and delete it; a missing namespace is not an error.
pub fn delete_named(name: &str) -> Result<()> {
    if !Netns::exists(name) {
        return Ok(());
    }
    let ns = Netns {
        name: name.to_string(),
        owned: false,
    };
    let left = ns.kill_all()?;
    if !left.is_empty() {
        tracing::warn!(netns = %name, ?left, "processes still exiting when the namespace goes");
    }
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
    run(Command::new("ip").args(["netns", "del", name])).map(|_| ())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            if let Err(err) = delete_named(&self.name) {
                tracing::warn!(netns = %self.name, %err, "could not delete namespace");
            }
        }
    }
}

/// The command line of `cmd`, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `cmd` to completion; its output, or `LabError::Command` with its stderr if it failed.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|err| LabError::io(format!("running {}", describe(cmd)), err))?;
    check(cmd, out)
}

/// Like `run`, feeding `input` on stdin.
pub(crate) fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| LabError::io(format!("running {}", describe(cmd)), err))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|err| LabError::io(format!("writing to {}", describe(cmd)), err))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|err| LabError::io(format!("waiting for {}", describe(cmd)), err))?;
    check(cmd, out)
}

fn check(cmd: &Command, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
