#!/bin/sh
# Build and run a fuzz target without cargo-fuzz (same flags cargo-fuzz uses).
# Usage: fuzz/run.sh derp_frame -runs=1000000
# With cargo-fuzz installed, `cd fuzz && cargo +nightly fuzz run derp_frame -- -runs=1000000`
# does the same.
set -eu
target=$1; shift
cd "$(dirname "$0")"
# An explicit --target keeps the sanitizer flags off build scripts and proc macros.
triple=$(rustc +nightly -vV | sed -n "s/^host: //p")
RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
  cargo +nightly build --release --target "$triple" --bin "$target"
mkdir -p "corpus/$target"
exec "target/$triple/release/$target" "corpus/$target" "$@"
