#!/usr/bin/env bash
# MagicDNS through the TUN (issue 14): dnsperf in c1 against 100.100.100.100 (release build,
# `tern lab up`): A queries for the lab's tailnet names, answered from the netmap, BENCH_SECONDS
# (default 10) at up to 100 queries in flight; queries/s and latency from dnsperf, the daemon's
# CPU from /proc, and its RSS idle (before) and after.
# Usage (root): bench/magic_dns.sh   (BENCH_SKIP_BUILD=1 to reuse target/release/tern)
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbd

build_tern
command -v jq >/dev/null || die "jq missing (apt-get install jq)"
if ! command -v dnsperf >/dev/null; then
    log "apt-get install dnsperf"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q dnsperf >&2
fi
lab_up easy easy
pid=$(lab_pid tern:c1)
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
rss_idle=$(rss "$pid")
domain=lab.tern.test
printf 'c1.%s A\nc2.%s A\nc2 A\n' "$domain" "$domain" >"$WORK/queries.txt"
t0=$(proc_ticks "$pid"); a=$(date +%s.%N)
ip netns exec "$LAB-c1" dnsperf -s 100.100.100.100 -d "$WORK/queries.txt" -l "$SECONDS_PER_RUN" \
    -q 100 -c 4 >"$WORK/dnsperf.txt" 2>&1 || { cat "$WORK/dnsperf.txt" >&2; die "dnsperf failed"; }
t1=$(proc_ticks "$pid"); b=$(date +%s.%N)
rss_after=$(rss "$pid")
cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v a="$a" -v b="$b" 'BEGIN { printf "%.0f", 100 * d / hz / (b - a) }')

echo
echo "MagicDNS through the TUN, $(machine_line); dnsperf in c1 -> 100.100.100.100, ${SECONDS_PER_RUN} s, 100 in flight"
echo
grep -E "Queries sent|Queries completed|Queries lost|Response codes|Queries per second|Average Latency|Latency StdDev" "$WORK/dnsperf.txt"
echo "tern daemon (c1): ${cpu} % of a core during the run; RSS ${rss_idle} KiB idle, ${rss_after} KiB after"
