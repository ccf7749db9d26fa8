#!/usr/bin/env bash
# Peer relay figures of issue 11, all in one run on one lab (`tern lab up --relay`):
#
#   sudo bench/relay.sh            # from the repository root; prints the tables
#
# 1. iperf3 TCP c1 -> c2 through tern's TUNs (BENCH_RUNS x BENCH_SECONDS, median) on three paths,
#    each checked in c1's `status --json` before and after its runs (the script fails otherwise):
#      direct      both NATs easy
#      peer-relay  both NATs switched to hard (`tern lab nat`); the relay node's relay server
#                  carries it (its forwarded counter must grow by at least the bytes received)
#      derp        the relay server turned off (`tern set --relay-server-port=` on the relay node)
#    Goals: relay >= 90 % of direct, DERP >= 50 % of direct.
# 2. The long-haul WAN profile (`tern lab wan long-haul`: the DERP host's link limited to 4 Mbit/s
#    with 1 % loss each way, plus 120 ms +- 30 ms where the kernel has sch_netem): DERP, then the
#    relay turned on again (no shaping on its link). Goal: relay >= 10 x DERP.
# 3. The relay server's cost: packets it forwarded per second per % of a core of the relay
#    node's daemon during the peer-relay runs; and, when socat is installed, the same for a socat
#    UDP relay (iperf3 UDP c1 -> socat on the server host -> iperf3 on the relay host) in the run.
#
# Env: BENCH_SECONDS (default 10), BENCH_RUNS (default 3), BENCH_SKIP_BUILD=1, BENCH_TERN (binary),
#      BENCH_PATH_TIMEOUT (seconds to wait for a path, default 60: relay rediscovery is every 30 s).
# Everything runs in the lab's namespaces; the EXIT trap stops what the script started and runs
# `tern lab down`.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbr
PATH_TIMEOUT=${BENCH_PATH_TIMEOUT:-60}
RELAY_PORT=40000

relay_forwarded() {
    tern_cli relay status --json | jq -r '.relay_server.forwarded_packets // 0'
}
relay_forwarded_bytes() {
    tern_cli relay status --json | jq -r '.relay_server.forwarded_bytes // 0'
}

# require_path WANT: wait until c1 says `path == WANT` for c2 (pinging it through the TUN).
require_path() {
    wait_for_path c1 c2 "$C2" "$1" "$PATH_TIMEOUT" \
        || die "c1's path to c2 is '$(path_of c1 c2)' after ${PATH_TIMEOUT} s, not '$1'"
    log "c1 -> c2: $1"
}

check_still() {
    local got
    got=$(path_of c1 c2)
    [ "$got" = "$1" ] || die "c1's path to c2 changed to '$got' during the $1 runs"
}

# measure_path LABEL PATH DESCRIPTION: RUNS iperf3 runs on PATH, checked before and after.
measure_path() {
    local label=$1 want=$2 desc=$3
    require_path "$want"
    measure "$label" "$LAB-c1" "$C2" c1="$(lab_pid tern:c1)" c2="$(lab_pid tern:c2)" relay="$(lab_pid tern:relay)"
    check_still "$want"
    summarize "$label" "$desc"
}

build_tern
command -v iperf3 >/dev/null || die "iperf3 missing (apt-get install iperf3)"
command -v jq >/dev/null || die "jq missing (apt-get install jq)"
log "tern lab up --relay (prefix $LAB)"
LAB_UP=1
TERN_LAB_PREFIX="$LAB" "$TERN" lab up --relay >"$WORK/lab-up.log" 2>&1 \
    || { cat "$WORK/lab-up.log" >&2; die "tern lab up failed"; }
TERN_LAB_PREFIX="$LAB" "$TERN" lab status --json >"$WORK/lab.json"
C2=$(lab_tailnet_ip c2)
start_iperf_server "$LAB-c2" "$C2"

measure_path direct direct "direct (easy x easy)"

TERN_LAB_PREFIX="$LAB" "$TERN" lab nat nat1 hard >&2
TERN_LAB_PREFIX="$LAB" "$TERN" lab nat nat2 hard >&2
require_path peer-relay
relay_pid=$(lab_pid tern:relay)
p0=$(relay_forwarded); b0=$(relay_forwarded_bytes); r0=$(proc_ticks "$relay_pid"); s0=$(date +%s.%N)
measure_path relay peer-relay "tern peer relay (hard x hard)"
p1=$(relay_forwarded); r1=$(proc_ticks "$relay_pid"); s1=$(date +%s.%N)
# The status snapshot is refreshed once a second: the last bytes show up to a second late.
sleep 1.5
b1=$(relay_forwarded_bytes)
received=$(for f in "$WORK"/relay.*.json; do jq -r '.end.sum_received.bytes' "$f"; done | awk '{ s += $1 } END { printf "%.0f", s }')
[ "$((b1 - b0))" -ge "$received" ] || die "the relay forwarded $((b1 - b0)) bytes, less than the $received received"
relay_eff=$(awk -v p=$((p1 - p0)) -v d=$((r1 - r0)) -v hz="$HZ" -v a="$s0" -v b="$s1" 'BEGIN {
    e = b - a; cpu = 100 * d / hz / e; printf "%.0f packets/s at %.0f %% of a core: %.0f packets/s per %%", p / e, cpu, (p / e) / (cpu > 0 ? cpu : 1) }')
log "relay server: $relay_eff"

tern_cli relay set --relay-server-port=
measure_path derp derp "DERP (relay off)"

TERN_LAB_PREFIX="$LAB" "$TERN" lab wan long-haul >&2
measure_path derp_wan derp "DERP, long-haul WAN profile on the DERP host"
tern_cli relay set --relay-server-port=$RELAY_PORT
measure_path relay_wan peer-relay "tern peer relay, same WAN profile (relay host unshaped)"

socat_line="socat not installed: no comparison in this run"
if command -v socat >/dev/null; then
    # A plain UDP relay on the server host between c1 and an iperf3 UDP server on the relay host
    # (both public; c1 is behind its NAT like for the tern relay).
    ip netns exec "$LAB-relay" iperf3 -s -B 198.18.0.10 -p 5301 >"$WORK/socat-iperf.log" 2>&1 &
    STARTED_PIDS+=("$!")
    ip netns exec "$LAB-server" socat UDP4-LISTEN:5301,fork,reuseaddr UDP4:198.18.0.10:5301 &
    socat_pid=$!
    STARTED_PIDS+=("$socat_pid")
    sleep 1
    t0=$(proc_ticks "$socat_pid"); a=$(date +%s.%N)
    ip netns exec "$LAB-c1" iperf3 -u -b 0 -c 198.18.0.20 -p 5301 -t "$SECONDS_PER_RUN" -J >"$WORK/socat.json" || true
    t1=$(proc_ticks "$socat_pid"); b=$(date +%s.%N)
    pkts=$(jq -r '.end.sum.packets // 0' "$WORK/socat.json")
    socat_line=$(awk -v p="$pkts" -v d=$((t1 - t0)) -v hz="$HZ" -v a="$a" -v b="$b" 'BEGIN {
        e = b - a; cpu = 100 * d / hz / e; printf "socat UDP relay: %.0f packets/s at %.0f %% of a core: %.0f packets/s per %%", p / e, cpu, (p / e) / (cpu > 0 ? cpu : 1) }')
fi

echo
echo "Peer relay throughput, $(machine_line); iperf3 TCP c1 -> c2, $RUNS x ${SECONDS_PER_RUN} s, median"
echo
print_table
echo
d=$(median_of direct); r=$(median_of relay); g=$(median_of derp); gw=$(median_of derp_wan); rw=$(median_of relay_wan)
awk -v d="$d" -v r="$r" -v g="$g" -v gw="$gw" -v rw="$rw" 'BEGIN {
    printf "relay / direct = %.0f %% (goal >= 90 %%)\n", 100 * r / d
    printf "DERP / direct = %.0f %% (goal >= 50 %%)\n", 100 * g / d
    printf "long-haul: relay / DERP = %.0f x (goal >= 10 x)\n", rw / gw }'
echo "relay server: $relay_eff"
echo "$socat_line"
