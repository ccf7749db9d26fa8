#!/usr/bin/env bash
# UDP through tern's TUNs over a direct path (issue 15, "one syscall per batch"): iperf3 UDP
# c1 -> c2 on the lab with nat1=easy, nat2=easy, as fast as the sender can (-b 0, 1200-byte
# datagrams), BENCH_RUNS x BENCH_SECONDS, median. Per run: the Gbit/s the receiver got, its loss,
# and how many datagrams c2's daemon wrote to its TUN per write (with USO, Linux 6.2 and later,
# back-to-back datagrams of one flow go in one write as a UDP super-packet).
#
#   sudo bench/udp.sh                                   # from the repository root
#   sudo BENCH_TERNS="/tmp/tern-before target/release/tern" bench/udp.sh   # binaries side by side
#
# Env: BENCH_SECONDS (default 10), BENCH_RUNS (default 3), BENCH_SKIP_BUILD=1, BENCH_TERN,
#      BENCH_TERNS (several binaries, each on a lab of its own, one after the other).
# Everything runs in the lab's namespaces; the EXIT trap stops what the script started and runs
# `tern lab down`.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbu
build_tern
install_tools
TERNS=${BENCH_TERNS:-$TERN}

# tun_writes NODE: "<packets_to_tun> <tun_writes>" of NODE's daemon (0 0 without offloads).
tun_writes() {
    tern_cli "$1" status --json \
        | jq -r '.data_plane.tun_offload | "\(.packets_to_tun // 0) \(.tun_writes // 0)"'
}

# one_binary BINARY: the runs with BINARY's daemons; appends "BINARY gbit loss per_write" to RESULTS.
one_binary() {
    TERN=$1
    lab_up easy easy
    local ip2 srv before after json rate loss
    ip2=$(lab_tailnet_ip c2)
    wait_for_path c1 c2 "$ip2" direct 20 || die "c1's path to c2 is '$(path_of c1 c2)', not direct"
    ip netns exec "$LAB-c2" iperf3 -s -B "$ip2" >/dev/null 2>&1 &
    srv=$!
    STARTED_PIDS+=("$srv")
    sleep 0.5
    for run in $(seq "$RUNS"); do
        before=$(tun_writes c2)
        json=$(ip netns exec "$LAB-c1" iperf3 -u -b 0 -l 1200 -c "$ip2" -t "$SECONDS_PER_RUN" -J)
        after=$(tun_writes c2)
        # What arrived: the sender's rate less what the receiver reported lost.
        rate=$(jq -r '.end.sum.bits_per_second * (1 - .end.sum.lost_percent / 100) / 1e9' <<<"$json")
        loss=$(jq -r '.end.sum.lost_percent' <<<"$json")
        awk -v b="$before" -v a="$after" -v t="$1" -v r="$rate" -v l="$loss" -v n="$run" 'BEGIN {
            split(b, x, " "); split(a, y, " "); w = y[2] - x[2]; per = (w > 0) ? (y[1] - x[1]) / w : 0
            printf "%s\t%d\t%.3f\t%.1f\t%.1f\n", t, n, r, l, per }' >>"$RESULTS"
        log "$1 run $run: $(tail -1 "$RESULTS" | cut -f3) Gbit/s, loss $(tail -1 "$RESULTS" | cut -f4) %"
    done
    kill "$srv" 2>/dev/null || true
    lab_down
}

for binary in $TERNS; do
    one_binary "$binary"
done

echo "# iperf3 UDP c1 -> c2 through tern (direct, easy x easy), -b 0 -l 1200, $RUNS x ${SECONDS_PER_RUN}s, median"
printf '%-40s %10s %8s %22s\n' binary "Gbit/s" "loss %" "datagrams per TUN write"
for binary in $TERNS; do
    awk -F'\t' -v t="$binary" '$1 == t' "$RESULTS" | {
        rows=$(cat)
        printf '%-40s %10s %8s %22s\n' "$binary" \
            "$(cut -f3 <<<"$rows" | median)" "$(cut -f4 <<<"$rows" | median)" "$(cut -f5 <<<"$rows" | median)"
    }
done
