//! Packaging: the Debian package built by `packaging/build-deb.sh` from the test binary (its file
//! list, its control fields, an install and a purge in a throwaway root whose maintainer scripts
//! must not touch the host), the generated manual pages (they render without a groff warning and
//! the overview page lists them all), the shell completions, and the systemd units
//! (`systemd-analyze verify` clean, sandbox exposure bounded, the relay unit keeping the same
//! sandbox), and the link-order script of release builds (`link/hot.ld`, with a small C program).
//! Needs dpkg, groff, binutils, a C compiler and systemd-analyze (.ci/install-test-deps).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, panicking with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn host_deb_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no Debian architecture for {other}"),
    }
}

/// The generated pages, written by `tern gen-man` into `dir`: their file names.
fn gen_man(dir: &Path) -> BTreeSet<String> {
    run_ok(Command::new(TERN).args(["gen-man", "--out-dir"]).arg(dir));
    fs::read_dir(dir)
        .expect("read the pages")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn deb_has_its_files_and_fields_and_purges_without_a_trace() {
    let work = tempfile::tempdir().expect("tempdir");
    let out_dir = work.path().join("out");
    let built = run_ok(
        Command::new(repo().join("packaging/build-deb.sh"))
            .args(["--binary", TERN, "--out"])
            .arg(&out_dir),
    );
    let deb = PathBuf::from(text(&built.stdout).trim());
    assert_eq!(
        deb,
        out_dir.join(format!("tern_{VERSION}_{}.deb", host_deb_arch()))
    );

    // The file list.
    let listing = text(&run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout);
    let files: BTreeSet<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    for want in [
        "/usr/bin/tern",
        "/lib/systemd/system/tern.service",
        "/lib/systemd/system/tern-relay.service",
        "/usr/lib/tmpfiles.d/tern.conf",
        "/etc/default/tern",
        "/etc/default/tern-relay",
        "/usr/share/man/man1/tern.1.gz",
        "/usr/share/man/man1/tern-up.1.gz",
        "/usr/share/man/man1/tern-lab-up.1.gz",
        "/usr/share/man/man8/tern-daemon.8.gz",
        "/usr/share/bash-completion/completions/tern",
        "/usr/share/zsh/vendor-completions/_tern",
        "/usr/share/fish/vendor_completions.d/tern.fish",
        "/usr/share/doc/tern/copyright",
    ] {
        assert!(
            files.contains(want),
            "{want} not in the package:\n{listing}"
        );
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x root/root") && l.ends_with("./usr/bin/tern")),
        "the binary must be root-owned 0755:\n{listing}"
    );
    assert!(
        !files.contains("/usr/share/man/man1/tern-daemon.1.gz"),
        "tern-daemon belongs in section 8 only"
    );

    // The control fields.
    let field = |name: &str| {
        let out = run_ok(Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg(name));
        text(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "tern");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), host_deb_arch());
    assert_eq!(field("Recommends"), "nftables | iptables");
    let depends = field("Depends");
    assert!(depends.contains("iproute2"), "Depends: {depends}");
    assert!(depends.contains("libc6 (>= 2."), "Depends: {depends}");
    let info = text(&run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb)).stdout);
    for script in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
        assert!(info.contains(script), "{script} missing:\n{info}");
    }
    let control = work.path().join("control");
    run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert_eq!(conffiles, "/etc/default/tern\n/etc/default/tern-relay\n");

    // Install into a throwaway root. --force-script-chrootless runs the maintainer scripts on the
    // host with DPKG_ROOT set: they must confine themselves to it. A fake systemctl first in PATH
    // records any call (there must be none for a root that is not the running system).
    let root = work.path().join("root");
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(dir)).expect("dpkg admin dir");
    }
    fs::write(admin.join("status"), "").expect("status");
    let fake_bin = work.path().join("fake-bin");
    fs::create_dir_all(&fake_bin).expect("fake bin");
    let calls = work.path().join("systemctl-calls");
    for tool in ["systemctl", "systemd-tmpfiles"] {
        let path = fake_bin.join(tool);
        fs::write(
            &path,
            format!("#!/bin/sh\necho \"{tool} $*\" >>{}\n", calls.display()),
        )
        .expect("fake tool");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let log = work.path().join("dpkg.log");
    let dpkg = |args: &[&str]| {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.display()))
            .arg(format!("--log={}", log.display()))
            .args(["--force-not-root", "--force-script-chrootless"])
            .args(args)
            .env("PATH", &path);
        run_ok(&mut cmd)
    };
    let host_state_before = (
        Path::new("/var/lib/tern").exists(),
        Path::new("/run/tern").exists(),
    );
    dpkg(&["--force-depends", "-i", deb.to_str().expect("utf-8 path")]);
    for installed in [
        "usr/bin/tern",
        "lib/systemd/system/tern.service",
        "etc/default/tern",
        "usr/share/man/man8/tern-daemon.8.gz",
    ] {
        assert!(root.join(installed).exists(), "{installed} not installed");
    }
    let installed_tern = root.join("usr/bin/tern");
    let version = run_ok(Command::new(&installed_tern).arg("--version"));
    assert_eq!(text(&version.stdout).trim(), format!("tern {VERSION}"));
    // Shipped stripped: no symbol table, no debug sections (the test builds from a debug binary).
    let sections = run_ok(
        Command::new("readelf")
            .args(["-S", "-W"])
            .arg(&installed_tern),
    );
    let sections = text(&sections.stdout);
    assert!(
        !sections.contains(".symtab")
            && !sections.contains(".debug_info")
            && !sections.contains(".debug_line"),
        "{sections}"
    );

    // What a running node and its admin leave behind, which purge must remove too.
    fs::create_dir_all(root.join("var/lib/tern")).expect("state dir");
    fs::write(root.join("var/lib/tern/machine.key"), "privkey:00").expect("key");
    fs::create_dir_all(root.join("run/tern")).expect("run dir");
    fs::write(root.join("run/tern/tern.sock"), "").expect("socket stand-in");
    fs::write(root.join("etc/default/tern.dpkg-old"), "TERN_FLAGS=\"\"\n").expect("old conf");
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).expect("wants dir");
    std::os::unix::fs::symlink(
        "/lib/systemd/system/tern.service",
        wants.join("tern.service"),
    )
    .expect("enable link");

    dpkg(&["--purge", "tern"]);

    assert!(
        !calls.exists(),
        "maintainer scripts called systemd tools for a DPKG_ROOT install: {}",
        fs::read_to_string(&calls).unwrap_or_default()
    );
    assert_eq!(
        (
            Path::new("/var/lib/tern").exists(),
            Path::new("/run/tern").exists()
        ),
        host_state_before,
        "the host's own tern directories changed"
    );
    // Only dpkg's database and empty directories may remain.
    let mut left = Vec::new();
    walk(&root, &mut |path, is_dir| {
        let rel = path.strip_prefix(&root).expect("under root");
        if rel.starts_with("var/lib/dpkg") {
            return;
        }
        if !is_dir || rel.to_string_lossy().contains("tern") {
            left.push(rel.display().to_string());
        }
    });
    assert!(left.is_empty(), "left after purge: {left:?}");
    let status = fs::read_to_string(admin.join("status")).expect("status");
    assert!(
        !status.contains("Package: tern"),
        "dpkg still knows tern: {status}"
    );
}

/// Calls `visit(path, is_dir)` for everything under `dir` (symlinks not followed).
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path, bool)) {
    for entry in fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let is_dir = entry.file_type().expect("file type").is_dir();
        visit(&path, is_dir);
        if is_dir {
            walk(&path, visit);
        }
    }
}

#[test]
fn deb_refuses_a_binary_built_for_another_architecture() {
    let other = if host_deb_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    };
    let work = tempfile::tempdir().expect("tempdir");
    let out = Command::new(repo().join("packaging/build-deb.sh"))
        .args(["--binary", TERN, "--arch", other, "--out"])
        .arg(work.path())
        .output()
        .expect("run build-deb.sh");
    assert!(!out.status.success(), "a mislabelled package was built");
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("not {other}")), "stderr: {stderr}");
    assert_eq!(fs::read_dir(work.path()).expect("out").count(), 0);
}

/// `groff -ww` (all warnings) must say nothing about `page`.
fn assert_renders_clean(page: &Path) {
    let out = run_ok(
        Command::new("groff")
            .args(["-ww", "-man", "-Tutf8"])
            .arg(page),
    );
    assert!(
        out.stderr.is_empty(),
        "{}: {}",
        page.display(),
        text(&out.stderr)
    );
    assert!(
        !out.stdout.is_empty(),
        "{} rendered nothing",
        page.display()
    );
}

#[test]
fn man_pages_render_without_warnings_and_the_overview_lists_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pages = gen_man(dir.path());
    for want in [
        "tern-up.1",
        "tern-status.1",
        "tern-lab-up.1",
        "tern-daemon.8",
    ] {
        assert!(pages.contains(want), "{want} not generated: {pages:?}");
    }
    assert!(
        !pages.contains("tern.1"),
        "the hand-written overview must not be generated"
    );
    for page in &pages {
        assert_renders_clean(&dir.path().join(page));
    }
    let overview = repo().join("man/tern.1");
    assert_renders_clean(&overview);

    // tern.1's SEE ALSO names exactly the generated pages (plus tailscale(1)): a new subcommand
    // needs a line there.
    let source = fs::read_to_string(&overview).expect("man/tern.1");
    let see_also = source
        .split(".SH SEE ALSO\n")
        .nth(1)
        .expect("a SEE ALSO section");
    let listed: BTreeSet<String> = see_also
        .lines()
        .take_while(|l| !l.starts_with(".SH"))
        .filter_map(|l| l.strip_prefix(".BR "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(' ')?;
            let section = rest.trim_start_matches('(').split(')').next()?;
            Some(format!("{}.{section}", name.replace("\\-", "-")))
        })
        .filter(|p| p != "tailscale.1")
        .collect();
    assert_eq!(listed, pages, "man/tern.1 SEE ALSO vs generated pages");
}

#[test]
fn completions_load_in_bash_and_name_the_verbs() {
    let out = run_ok(Command::new("bash").args([
        "-c",
        &format!("source <('{TERN}' completion bash) && complete -p tern"),
    ]));
    let spec = text(&out.stdout);
    assert!(spec.contains("-F _tern tern"), "complete -p: {spec}");
    for shell in ["zsh", "fish"] {
        let script = text(&run_ok(Command::new(TERN).args(["completion", shell])).stdout);
        for verb in ["status", "netcheck", "exit-node", "lab"] {
            assert!(script.contains(verb), "{shell} script lacks {verb}");
        }
    }
    let zsh = text(&run_ok(Command::new(TERN).args(["completion", "zsh"])).stdout);
    assert!(
        zsh.starts_with("#compdef tern"),
        "zsh: {}",
        &zsh[..40.min(zsh.len())]
    );
    let refused = Command::new(TERN)
        .args(["completion", "tcsh"])
        .output()
        .expect("run tern");
    assert_eq!(
        refused.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// The units with `/usr/bin/tern` pointing at the test binary (verify checks ExecStart exists),
/// and a MANPATH holding tern(1) and tern-daemon(8) (verify checks Documentation=man: links).
fn units_for_verify(work: &Path) -> (PathBuf, PathBuf) {
    let units = work.join("units");
    fs::create_dir_all(&units).expect("units dir");
    for unit in ["tern.service", "tern-relay.service"] {
        let text = fs::read_to_string(repo().join("packaging").join(unit)).expect("unit");
        fs::write(units.join(unit), text.replace("/usr/bin/tern", TERN)).expect("write unit");
    }
    let manpath = work.join("man");
    let generated = work.join("generated");
    gen_man(&generated);
    fs::create_dir_all(manpath.join("man1")).expect("man1");
    fs::create_dir_all(manpath.join("man8")).expect("man8");
    fs::copy(repo().join("man/tern.1"), manpath.join("man1/tern.1")).expect("tern.1");
    fs::copy(
        generated.join("tern-daemon.8"),
        manpath.join("man8/tern-daemon.8"),
    )
    .expect("tern-daemon.8");
    (units, manpath)
}

#[test]
fn systemd_units_verify_clean_and_keep_exposure_low() {
    let work = tempfile::tempdir().expect("tempdir");
    let (units, manpath) = units_for_verify(work.path());
    let out = run_ok(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(units.join("tern.service"))
            .arg(units.join("tern-relay.service"))
            .env("MANPATH", &manpath),
    );
    // Unknown keys and bad values are only printed (status 0): any output is a finding.
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    for unit in ["tern.service", "tern-relay.service"] {
        let out = run_ok(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(units.join(unit)),
        );
        let report = text(&out.stdout);
        let score: f64 = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure score in:\n{report}"));
        // 2.7 when written; root with CAP_NET_ADMIN and the host's network cannot go much lower.
        assert!(score <= 3.0, "{unit} exposure {score}:\n{report}");
    }
}

#[test]
fn relay_unit_keeps_the_main_units_sandbox_and_sets_the_relay_port() {
    let main = fs::read_to_string(repo().join("packaging/tern.service")).expect("tern.service");
    let relay =
        fs::read_to_string(repo().join("packaging/tern-relay.service")).expect("relay unit");
    let sandbox = main
        .split("# --- Sandbox.")
        .nth(1)
        .expect("a sandbox part in tern.service");
    let relay_lines: BTreeSet<&str> = relay.lines().collect();
    for line in sandbox
        .lines()
        .filter(|l| l.contains('=') && !l.starts_with('#'))
    {
        assert!(
            relay_lines.contains(line),
            "tern-relay.service lacks {line}"
        );
    }
    for line in [
        "Type=notify",
        "ExecStopPost=/usr/bin/tern daemon --cleanup",
        "Restart=on-failure",
    ] {
        assert!(main.lines().any(|l| l == line), "tern.service lacks {line}");
        assert!(
            relay_lines.contains(line),
            "tern-relay.service lacks {line}"
        );
    }
    assert!(relay_lines.contains("Conflicts=tern.service"));
    assert!(main.lines().any(|l| l == "Conflicts=tern-relay.service"));
    assert!(relay_lines.contains(
        "ExecStartPost=/usr/bin/tern set --relay-server-port=${TERN_RELAY_PORT} --accept-dns=false"
    ));
    // The flags the unit passes must exist (clap refuses unknown ones with status 2).
    let help = text(&run_ok(Command::new(TERN).args(["set", "--help"])).stdout);
    for flag in ["--relay-server-port", "--accept-dns"] {
        assert!(help.contains(flag), "tern set has no {flag}");
    }
    let defaults = fs::read_to_string(repo().join("packaging/default.tern-relay"))
        .expect("default.tern-relay");
    assert!(defaults.lines().any(|l| l == "TERN_RELAY_PORT=40000"));
}

/// Release builds link with `link/hot.ld` (build.rs); the test builds do not. Link a small C
/// program with it, one function named like an entry of the list and one not: the system
/// linker must accept the script, put the listed function in `.text.hot` ahead of `.text` and
/// the other one after it, and the program must run.
#[test]
fn release_link_order_script_places_listed_functions_first() {
    let script = repo().join("link/hot.ld");
    let listed = fs::read_to_string(&script)
        .expect("link/hot.ld")
        .lines()
        .filter_map(|line| {
            // An entry: ".text.NAME .text.unlikely.NAME".
            let (plain, unlikely) = line.trim().split_once(' ')?;
            let name = plain.strip_prefix(".text.")?;
            (unlikely.strip_prefix(".text.unlikely.") == Some(name)).then_some(name)
        })
        .find(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .expect("a listed function with a C name")
        .to_string();
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hot-ld");
    fs::create_dir_all(&work).unwrap();
    let source = work.join("prog.c");
    fs::write(
        &source,
        format!(
            "void not_listed_fn(void) {{}}\nvoid {listed}(void) {{}}\n\
             int main(void) {{ not_listed_fn(); {listed}(); return 0; }}\n"
        ),
    )
    .unwrap();
    let program = work.join("prog");
    run_ok(
        Command::new("cc")
            .args(["-O0", "-ffunction-sections", "-o"])
            .arg(&program)
            .arg(&source)
            .arg(format!("-Wl,-T,{}", script.display())),
    );
    run_ok(&mut Command::new(&program));

    let sections = text(&run_ok(Command::new("readelf").arg("-SW").arg(&program)).stdout);
    let hex = |field: &str| u64::from_str_radix(field, 16).unwrap();
    // readelf -SW: "[Nr] Name Type Address Off Size …"
    let range = |name: &str| {
        sections
            .lines()
            .filter_map(|line| line.split_once(']'))
            .map(|(_, fields)| fields.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.first() == Some(&name))
            .map(|fields| hex(fields[2])..hex(fields[2]) + hex(fields[4]))
            .unwrap_or_else(|| panic!("no section {name} in:\n{sections}"))
    };
    let (hot, rest) = (range(".text.hot"), range(".text"));
    assert!(
        hot.end <= rest.start,
        ".text.hot {hot:x?} not before .text {rest:x?}"
    );
    let symbols = text(&run_ok(Command::new("nm").arg(&program)).stdout);
    let address = |name: &str| {
        symbols
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
            .unwrap_or_else(|| panic!("no symbol {name} in:\n{symbols}"))
    };
    assert!(hot.contains(&address(&listed)), "{listed} not in .text.hot");
    assert!(
        rest.contains(&address("not_listed_fn")),
        "not_listed_fn not in .text"
    );
}
