#!/usr/bin/env bash
# Daemon memory at scale (issue 15): c1's tern daemon with 2, 100 and 1,000 peers.
#
#   sudo bench/memory.sh           # from the repository root; prints the table
#
# For each peer count P, one lab: `tern lab up --synthetic-peers P-1` (the control server gets
# P-1 made-up nodes: random keys, offline, no endpoints, home DERP 900), so c1's netmap has P
# peers, c2 the only real one. Once c1's status lists all P peers and 5 s passed, VmRSS of c1's
# daemon (idle); then iperf3 c1 -> c2 through the TUNs for BENCH_SECONDS with VmRSS sampled every
# 0.5 s (the peak is printed, "under load"); then VmRSS 3 s after. The last lines give the growth
# per peer between the counts (the goal: at most 16 KiB per peer from 100 to 1,000) and the RSS
# with 100 peers (goal: at most 15 MB). RSS counts the executable's pages too (RssFile: file
# pages shared with every other tern process and the page cache, about the size of the binary's
# text once it is hot); RssAnon is the daemon's own memory (heap, stacks), printed beside it.
# Before the load, the idle daemon's CPU over BENCH_IDLE_SECONDS (default 30): its own time and
# that of the programs it ran (iptables, nft), from /proc/PID/stat, in % of one core.
# Env: BENCH_PEERS (default "2 100 1000"), BENCH_SECONDS (iperf3 -t, default 5), BENCH_SKIP_BUILD=1,
#      BENCH_IDLE_SECONDS, BENCH_TERN (binary).
# Everything runs in the lab's namespaces; the EXIT trap runs `tern lab down`.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbm
PEER_COUNTS=${BENCH_PEERS:-2 100 1000}
LOAD_SECONDS=${BENCH_SECONDS:-5}
IDLE_SECONDS=${BENCH_IDLE_SECONDS:-30}
build_tern
install_tools

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
anon_kib() { awk '/^RssAnon:/ { print $2 }' "/proc/$1/status"; }
file_kib() { awk '/^RssFile:/ { print $2 }' "/proc/$1/status"; }
# CPU ticks of PID: own and of its waited-for children (utime stime cutime cstime).
cpu_ticks() { awk '{ print $14 + $15, $16 + $17 }' "/proc/$1/stat"; }

# wait_for_peers COUNT: until c1's status lists COUNT peers (60 s at most).
wait_for_peers() {
    local i n
    for i in $(seq 1 120); do
        n=$(tern_cli c1 status --json 2>/dev/null | jq '.peers | length' 2>/dev/null || echo 0)
        [ "$n" = "$1" ] && return
        sleep 0.5
    done
    die "c1 lists $n peers, not $1"
}

declare -A IDLE PEAK AFTER ANON FILE ANON_AFTER IDLE_CPU
HZ=$(getconf CLK_TCK)
for peers in $PEER_COUNTS; do
    log "tern lab up --synthetic-peers $((peers - 1)) (prefix $LAB)"
    LAB_UP=1
    TERN_LAB_PREFIX="$LAB" "$TERN" lab up --synthetic-peers $((peers - 1)) >"$WORK/lab-up.log" 2>&1 \
        || { cat "$WORK/lab-up.log" >&2; die "tern lab up failed"; }
    TERN_LAB_PREFIX="$LAB" "$TERN" lab status --json >"$WORK/lab.json"
    pid=$(lab_pid tern:c1)
    ip2=$(lab_tailnet_ip c2)
    wait_for_peers "$peers"
    sleep 5
    IDLE[$peers]=$(rss_kib "$pid")
    ANON[$peers]=$(anon_kib "$pid")
    FILE[$peers]=$(file_kib "$pid")
    read -r own0 kids0 < <(cpu_ticks "$pid")
    sleep "$IDLE_SECONDS"
    read -r own1 kids1 < <(cpu_ticks "$pid")
    IDLE_CPU[$peers]=$(awk -v o="$((own1 - own0))" -v k="$((kids1 - kids0))" -v hz="$HZ" -v s="$IDLE_SECONDS" \
        'BEGIN { printf "%.2f %% (own %.2f, programs it ran %.2f)", 100 * (o + k) / hz / s, 100 * o / hz / s, 100 * k / hz / s }')
    start_iperf_server "$LAB-c2" "$ip2"
    ip netns exec "$LAB-c1" iperf3 -c "$ip2" -t "$LOAD_SECONDS" >/dev/null 2>&1 &
    client=$!
    peak=0
    while kill -0 "$client" 2>/dev/null; do
        now=$(rss_kib "$pid")
        [ "$now" -gt "$peak" ] && peak=$now
        sleep 0.5
    done
    wait "$client" || die "iperf3 c1 -> c2 failed with $peers peers"
    kill "$IPERF_PID" 2>/dev/null || true
    PEAK[$peers]=$peak
    sleep 3
    AFTER[$peers]=$(rss_kib "$pid")
    ANON_AFTER[$peers]=$(anon_kib "$pid")
    log "$peers peers: idle ${IDLE[$peers]} KiB, peak under load $peak KiB, after ${AFTER[$peers]} KiB"
    lab_down
done

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
echo
echo "# tern daemon memory (VmRSS of c1's daemon), $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), release build"
echo "# peers = c2 (real) + synthetic nodes from the lab control server; load = iperf3 c1 -> c2 for ${LOAD_SECONDS} s"
echo
echo "| peers | RSS idle | of it RssAnon / RssFile | RSS peak under load | RSS after load | RssAnon after load | idle CPU over ${IDLE_SECONDS} s |"
echo "|---|---|---|---|---|---|---|"
for peers in $PEER_COUNTS; do
    echo "| $peers | $(mib "${IDLE[$peers]}") MiB | $(mib "${ANON[$peers]}") / $(mib "${FILE[$peers]}") MiB | $(mib "${PEAK[$peers]}") MiB | $(mib "${AFTER[$peers]}") MiB | $(mib "${ANON_AFTER[$peers]}") MiB | ${IDLE_CPU[$peers]} |"
done
prev=""
for peers in $PEER_COUNTS; do
    if [ -n "$prev" ]; then
        awk -v a="${IDLE[$prev]}" -v b="${IDLE[$peers]}" -v c="${ANON[$prev]}" -v d="${ANON[$peers]}" -v p="$prev" -v q="$peers" \
            'BEGIN { printf "idle growth %s -> %s peers: RSS %.1f KiB per peer, RssAnon %.1f KiB per peer\n", p, q, (b - a) / (q - p), (d - c) / (q - p) }'
    fi
    prev=$peers
done

# The daemon's code is resident in 64 KiB windows; release builds link the functions it runs
# together (link/hot.ld). A toolchain or dependency update renames them: then few of the list are
# found, the code spreads out again and RSS grows by several MB (rerun bench/hot_code.sh).
listed=$(sed -n 's/^ *\.text\.\([^ *]*\) \.text\.unlikely\..*$/\1/p' "$ROOT/link/hot.ld" | sort -u)
defined=$(nm --defined-only "$TERN" 2>/dev/null | awk '{ print $3 }' | sort -u)
echo "link/hot.ld: $(comm -12 <(echo "$listed") <(echo "$defined") | wc -l) of $(echo "$listed" | wc -l) functions defined by $TERN"
