#!/usr/bin/env bash
# Exit node throughput and the cost of tern's host routing, in the lab (`tern lab up --exit-node`,
# release build):
# 1. iperf3 TCP c1 -> the lab's internet host through c2 as exit node (kernel forwarding and
#    masquerade on c2) vs c1 -> c2 directly over the tailnet, in turns, BENCH_RUNS x BENCH_SECONDS,
#    median.
# 2. Time to apply and to remove the full rule set: ip rules + table 52 + netfilter, read from the
#    daemon's log ("netfilter applied/removed ... elapsed") and timed around `tern down` / `up`.
# Usage (root): bench/exit_node.sh   (BENCH_SKIP_BUILD=1 to reuse target/release/tern)
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbx

build_tern
command -v iperf3 >/dev/null || die "iperf3 missing (apt-get install iperf3)"
command -v jq >/dev/null || die "jq missing (apt-get install jq)"
log "tern lab up --exit-node (prefix $LAB)"
LAB_UP=1
TERN_LAB_PREFIX="$LAB" "$TERN" lab up --exit-node >"$WORK/lab-up.log" 2>&1 \
    || { cat "$WORK/lab-up.log" >&2; die "tern lab up failed"; }
TERN_LAB_PREFIX="$LAB" "$TERN" lab status --json >"$WORK/lab.json"
C2=$(lab_tailnet_ip c2)
INET=198.18.0.30
start_iperf_server "$LAB-c2" "$C2"
start_iperf_server "$LAB-inet" "$INET"
seen=$(ip netns exec "$LAB-c1" curl -s --max-time 5 "http://$INET/")
log "the internet host sees c1 as $seen"

for run in $(seq 1 "$RUNS"); do
    measure_one "$run" direct "$LAB-c1" "$C2" c1="$(lab_pid tern:c1)" c2="$(lab_pid tern:c2)"
    measure_one "$run" exit "$LAB-c1" "$INET" c1="$(lab_pid tern:c1)" c2="$(lab_pid tern:c2)"
done
summarize direct "c1 -> c2 over the tailnet (direct)"
summarize exit "c1 -> internet host through c2 as exit node"

# Apply and removal of the whole host set on c1 (rules, table 52, netfilter).
rules_count() { ip netns exec "$LAB-c1" ip rule show | awk '$1 ~ /^52[0-9][0-9]:/' | wc -l; }
a=$EPOCHREALTIME
tern_cli c1 down >/dev/null
while [ "$(rules_count)" != 0 ]; do sleep 0.005; done
b=$EPOCHREALTIME
tern_cli c1 up >/dev/null
while ! ip netns exec "$LAB-c1" iptables-save 2>/dev/null | grep -q -- '-A ts-postrouting'; do sleep 0.005; done
c=$EPOCHREALTIME
applied=$(grep -o 'netfilter applied.*elapsed=[0-9.]*[mµ]s' "/run/tern-lab/$LAB/tern-c1.log" | tail -1 | sed 's/.*elapsed=//')
removed=$(grep -o 'netfilter removed.*elapsed=[0-9.]*[mµ]s' "/run/tern-lab/$LAB/tern-c1.log" | tail -1 | sed 's/.*elapsed=//')

echo
echo "Exit node throughput, $(machine_line); iperf3 TCP, $RUNS x ${SECONDS_PER_RUN} s, median"
echo
print_table
echo
awk -v d="$(median_of direct)" -v x="$(median_of exit)" 'BEGIN { printf "exit node / direct = %.0f %%\n", 100 * x / d }'
echo "internet host saw c1 as $seen (c2's NAT) through the exit node"
awk -v a="$a" -v b="$b" -v c="$c" 'BEGIN {
    printf "tern down -> rules gone: %.0f ms; tern up -> full set back (control round trip included): %.0f ms\n", 1000 * (b - a), 1000 * (c - b) }'
echo "netfilter (iptables kind) apply ${applied:-?}, remove ${removed:-?} (daemon log)"
