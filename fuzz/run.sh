#!/bin/sh
# Runs fuzz targets one at a time (one job, one core) with their committed seeds and dictionary,
# then prints a table: executions, exec/s, coverage (libFuzzer `cov:`) after loading the corpus
# and at the end, corpus size, seconds taken (less than SECONDS if a flag such as -runs=N stops
# it first). The table is also written to fuzz/last_run.md.
#
# Usage: fuzz/run.sh all SECONDS          every target, SECONDS each
#        fuzz/run.sh TARGET SECONDS [libFuzzer flags…]
# Needs `cargo install cargo-fuzz` and a nightly toolchain (or RUSTC_BOOTSTRAP=1, which this uses
# with the stable one). corpus/ (the growing corpus) and artifacts/ (crashes) are not committed;
# copy a crash input to regressions/TARGET/ so `cargo test --test fuzz_regression` keeps it fixed.
set -eu
[ $# -ge 2 ] || { sed -n 7,8p "$0"; exit 2; }
cd "$(dirname "$0")"
which=$1; secs=$2; shift 2
all="derp_frame disco_parse dns_request localapi_request map_decode noise_records peerapi_doh proxy_request relay_client relay_packet stun_parse tun_offload"
[ "$which" = all ] && targets=$all || targets=$which

max_len() {
  case $1 in
    map_decode) echo 65536 ;;
    noise_records) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

# One build of every target, then the binaries directly (FUZZ_NO_BUILD=1 reuses the last build).
export RUSTC_BOOTSTRAP=1
[ "${FUZZ_NO_BUILD:-}" = 1 ] || cargo fuzz build -s none >&2
bin="target/$(rustc -vV | sed -n 's/^host: //p')/release"
mkdir -p logs
rows=""
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="logs/$t.log"
  echo "== $t: ${secs}s" >&2
  # Seeds are read alongside the corpus; new units go to corpus/ only.
  status=ok
  t_start=$(date +%s)
  "$bin/$t" "corpus/$t" "seeds/$t" \
    -max_total_time="$secs" -dict="dict/$t.dict" -max_len="$(max_len "$t")" \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" "$@" \
    >"$log" 2>&1 || status=CRASH
  elapsed=$(( $(date +%s) - t_start ))
  start=$(grep -m1 'INITED' "$log" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  end=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  corp=$(echo "$last" | sed -n 's/.*corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p')
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  rows="$rows| \`$t\` | ${runs:-?} | ${rate:-?} | ${start:-?} | ${end:-?} | ${corp:-?} | $elapsed | $status |
"
done
table="| target | executions | exec/s | cov start | cov end | corpus (units/size) | seconds | result |
|---|---:|---:|---:|---:|---:|---:|---|
$rows"
printf '%s' "$table" | tee last_run.md
