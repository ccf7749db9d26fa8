//! A long-lived lab made by `tern lab up` for one test (unique prefix), torn down with
//! `tern lab down --force` on Drop, also when the test panics.

use std::path::PathBuf;
use std::process::{Command, Output};

use tern_lab::state::state_dir;
use tern_lab::topology::unique_prefix;
use tern_lab::Netns;

use super::{output_text, require_root};

pub struct LabCli(pub String);

impl LabCli {
    /// `tern lab up ARGS` (e.g. `["--nat1", "hard", "--ipv6"]`).
    pub fn up(args: &[&str]) -> LabCli {
        require_root();
        let lab = LabCli(unique_prefix());
        let mut full = vec!["lab", "up"];
        full.extend_from_slice(args);
        let up = lab.tern(&full);
        assert!(up.status.success(), "lab up: {}", output_text(&up));
        lab
    }

    /// `tern ARGS` with this lab's prefix.
    pub fn tern(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .env("TERN_LAB_PREFIX", &self.0)
            .output()
            .expect("run tern")
    }

    /// The namespace of lab node `node` (`c1`, `server`, …).
    pub fn ns(&self, node: &str) -> Netns {
        Netns::open(&format!("{}-{node}", self.0)).expect("lab namespace")
    }

    /// The LocalAPI socket of the lab's tern node `node`.
    pub fn socket(&self, node: &str) -> PathBuf {
        state_dir(&self.0).join(format!("{node}.sock"))
    }

    /// The lab's reusable pre-auth key.
    pub fn auth_key(&self) -> String {
        std::fs::read_to_string(state_dir(&self.0).join("auth.key"))
            .expect("the lab's auth key")
            .trim()
            .to_string()
    }
}

impl Drop for LabCli {
    fn drop(&mut self) {
        let _ = self.tern(&["lab", "down", "--force"]);
    }
}
