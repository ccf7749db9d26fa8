//! Documentation generated from the clap tree: `tern gen-man` (hidden; the Debian package's
//! build runs it) writes one manual page per subcommand, and `tern completion` prints a shell's
//! completion script. Both read [`super::Cli`], so they cannot drift from the real flags.
//!
//! The overview page `man/tern.1` stays hand-written (it explains more than the flags); the
//! generated pages are the per-verb reference, `tern-up.1`, `tern-lab-up.1`, … and `tern-daemon.8`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory, ValueEnum};

/// The subcommands whose pages go in section 8 (system administration: daemons); every other
/// page is section 1.
const SECTION_8: &[&str] = &["tern-daemon"];

/// The hand-written overview page; never generated.
pub const OVERVIEW_PAGE: &str = "tern.1";

#[derive(Debug, Args)]
pub struct GenManArgs {
    /// Directory to write the pages into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to print the completion script for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// The shells tern ships completion scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl CompletionShell {
    fn clap_shell(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// One generated manual page: its file name (`tern-lab-up.1`) and its roff source.
#[derive(Debug, Clone)]
pub struct ManPage {
    pub file_name: String,
    pub roff: Vec<u8>,
}

/// The clap tree as the generators see it: built (so nested commands have their display names,
/// `tern-lab-up`), without clap's implicit `help` subcommand (not a real verb).
fn built_command() -> clap::Command {
    let mut cmd = super::Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Every visible subcommand's page, nested ones included, in tree order. Hidden subcommands
/// (`gen-man`, lab internals) get none, and neither does the root: that is `man/tern.1`.
pub fn man_pages() -> anyhow::Result<Vec<ManPage>> {
    let root = built_command();
    let mut pages = Vec::new();
    collect_pages(&root, &page_date(), &mut pages)?;
    Ok(pages)
}

fn collect_pages(
    parent: &clap::Command,
    date: &str,
    pages: &mut Vec<ManPage>,
) -> anyhow::Result<()> {
    for sub in parent.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_display_name().unwrap_or(sub.get_name()).to_string();
        let section = if SECTION_8.contains(&name.as_str()) {
            "8"
        } else {
            "1"
        };
        let man = clap_mangen::Man::new(sub.clone())
            .title(name.to_uppercase())
            .section(section)
            .date(date)
            .source(concat!("tern ", env!("CARGO_PKG_VERSION")))
            .manual(if section == "8" {
                "System Administration"
            } else {
                "User Commands"
            });
        let mut rendered = Vec::new();
        man.render(&mut rendered)
            .with_context(|| format!("rendering the page of {name}"))?;
        let mut roff = ascii_roff(&String::from_utf8_lossy(&rendered)).into_bytes();
        // clap_mangen writes no SEE ALSO: point back to the overview and to the parent verb.
        let parent_name = parent.get_display_name().unwrap_or(parent.get_name());
        let mut see_also = vec![".BR tern (1)".to_string()];
        if parent_name != "tern" {
            see_also.push(format!(".BR {} (1)", roff_escape(parent_name)));
        }
        let last = see_also.len() - 1;
        roff.extend_from_slice(b".SH \"SEE ALSO\"\n");
        for (i, line) in see_also.iter().enumerate() {
            roff.extend_from_slice(line.as_bytes());
            roff.extend_from_slice(if i == last { b"\n" } else { b" ,\n" });
        }
        pages.push(ManPage {
            file_name: format!("{name}.{section}"),
            roff,
        });
        collect_pages(sub, date, pages)?;
    }
    Ok(())
}

/// The pages' date: `SOURCE_DATE_EPOCH` when set (reproducible package builds), else today (UTC).
fn page_date() -> String {
    let from_env = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok());
    let when = from_env.unwrap_or_else(time::OffsetDateTime::now_utc);
    when.format(time::macros::format_description!("[year]-[month]-[day]"))
        .unwrap_or_default()
}

/// Hyphens in names are literal minus signs in a page (`\-`), not typographic hyphens.
fn roff_escape(name: &str) -> String {
    name.replace('-', "\\-")
}

/// Non-ASCII characters (the help texts' `…`, `—`, `≤`) as roff's `\[uXXXX]` escapes: groff
/// reads a page as Latin-1 unless a preprocessor converts it, and warns on UTF-8 bytes.
fn ascii_roff(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\[u{:04X}]", u32::from(c));
        }
    }
    out
}

/// The completion script for `shell`.
pub fn completion_script(shell: CompletionShell) -> Vec<u8> {
    // clap_complete offers hidden subcommands too; rebuild the root without them (`gen-man` is
    // for packaging, not for tab). The visible verbs are cloned whole, flags and all.
    let root = super::Cli::command();
    let mut cmd = clap::Command::new("tern")
        .version(env!("CARGO_PKG_VERSION"))
        .args(root.get_arguments().cloned())
        .subcommands(root.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .disable_help_subcommand(true);
    let mut out = Vec::new();
    clap_complete::generate(shell.clap_shell(), &mut cmd, "tern", &mut out);
    out
}

/// `tern gen-man --out-dir DIR`.
pub fn gen_man(args: &GenManArgs) -> anyhow::Result<ExitCode> {
    let dir = args.out_dir.as_path();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for page in man_pages()? {
        write_page(dir, &page)?;
        println!("{}", dir.join(&page.file_name).display());
    }
    Ok(ExitCode::SUCCESS)
}

fn write_page(dir: &Path, page: &ManPage) -> anyhow::Result<()> {
    // The root is never generated, so this only guards against a subcommand named like it.
    anyhow::ensure!(
        page.file_name != OVERVIEW_PAGE,
        "refusing to overwrite the hand-written {OVERVIEW_PAGE}"
    );
    let path = dir.join(&page.file_name);
    std::fs::write(&path, &page.roff).with_context(|| format!("writing {}", path.display()))
}

/// `tern completion bash|zsh|fish`: the script on stdout.
pub fn completion(args: &CompletionArgs) -> anyhow::Result<ExitCode> {
    let script = completion_script(args.shell);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|()| stdout.flush())
        .context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_nested_verbs_but_not_the_root_or_hidden_ones() {
        let pages = man_pages().expect("pages");
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        for want in [
            "tern-up.1",
            "tern-status.1",
            "tern-lab.1",
            "tern-lab-up.1",
            "tern-exit-node-list.1",
            "tern-daemon.8",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for never in [
            OVERVIEW_PAGE,
            "tern-gen-man.1",
            "tern-help.1",
            "tern-daemon.1",
        ] {
            assert!(!names.contains(&never), "{never} generated: {names:?}");
        }
    }

    #[test]
    fn non_ascii_becomes_roff_escapes() {
        assert_eq!(ascii_roff("a … b"), "a \\[u2026] b");
        assert_eq!(ascii_roff("plain"), "plain");
    }

    #[test]
    fn a_page_names_its_flags_and_points_back_to_the_overview() {
        let pages = man_pages().expect("pages");
        let up = pages
            .iter()
            .find(|p| p.file_name == "tern-lab-up.1")
            .expect("tern-lab-up.1");
        let text = String::from_utf8_lossy(&up.roff);
        assert!(
            text.contains(&format!(
                ".TH TERN-LAB-UP 1 {} \"tern {}\" \"User Commands\"\n",
                page_date(),
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("nat1"), "{text}");
        assert!(
            text.contains(".SH \"SEE ALSO\"\n.BR tern (1) ,\n.BR tern\\-lab (1)\n"),
            "{text}"
        );
    }

    #[test]
    fn completion_scripts_name_the_verbs_but_not_the_hidden_one() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let script = String::from_utf8(completion_script(shell)).expect("utf-8");
            for verb in [
                "status",
                "netcheck",
                "exit-node",
                "completion",
                "relay-server-port",
            ] {
                assert!(script.contains(verb), "{shell:?} lacks {verb}");
            }
            assert!(!script.contains("gen-man"), "{shell:?} offers gen-man");
        }
    }
}
