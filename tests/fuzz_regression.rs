//! Replays every fuzz target's body (shared with `fuzz/fuzz_targets/`) over its committed seeds
//! (`fuzz/seeds/<target>/`) and saved crash inputs (`fuzz/regressions/<target>/`) on stable, so a
//! fixed crash stays fixed and the seeds keep decoding as the code changes. No nightly, no
//! libFuzzer; the bodies assert their properties themselves.

#[path = "../fuzz/bodies/mod.rs"]
mod bodies;

use std::fs;
use std::path::{Path, PathBuf};

/// Regular files in `dir` (sorted), except README/.gitkeep; a missing directory is empty.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            !name.starts_with('.') && !name.starts_with("README")
        })
        .collect();
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8]), dir: &Path) -> usize {
    let files = inputs(dir);
    for file in &files {
        let data = fs::read(file).expect("readable fuzz input");
        // Name the input in the panic message: the body's own assertion says what broke.
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{target}: {} fails", file.display());
    }
    files.len()
}

#[test]
fn every_target_passes_its_seeds_and_saved_crashes() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, run) in bodies::TARGETS {
        let seeds = replay(target, *run, &fuzz.join("seeds").join(target));
        assert!(seeds > 0, "{target}: no seeds (run fuzz/seed.sh)");
        replay(target, *run, &fuzz.join("regressions").join(target));
    }
}

#[test]
fn every_target_has_a_seed_and_regression_directory_and_dictionary() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, _) in bodies::TARGETS {
        assert!(fuzz.join("seeds").join(target).is_dir(), "{target}: seeds");
        assert!(
            fuzz.join("regressions").join(target).is_dir(),
            "{target}: regressions"
        );
        assert!(
            fuzz.join("dict").join(format!("{target}.dict")).is_file(),
            "{target}: dictionary"
        );
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "{target}: fuzz target"
        );
    }
}
