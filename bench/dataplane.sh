#!/usr/bin/env bash
# Data-plane throughput of tern over DERP against the direct-path baselines of
# the direct baselines, all on this machine in one run (issue 4 figures).
#
#   sudo bench/dataplane.sh            # from the repository root; prints a table
#
# Env: BENCH_SECONDS (iperf3 -t, default 10), BENCH_RUNS (default 3), BENCH_SKIP_BUILD=1,
#      BENCH_PATHS (subset of "tern veth wg"), BENCH_TERN (binary; for trying the script out).
#
# Paths measured (iperf3 TCP, BENCH_RUNS runs of BENCH_SECONDS, median):
#   tern/DERP  `tern lab up --nat1 udpblock --nat2 udpblock`: two tern daemons (TUN tern0) in c1
#              and c2 whose UDP is blocked, so every packet goes c1 -> `tern derp` -> c2 over TLS.
#   veth       raw veth a<->b in two namespaces this script makes.
#   wg-go      wireguard-go a<->b over that veth (MTU 1420).
# CPU: per process = % of one core (utime+stime from /proc/PID/stat); machine = busy share of
# all cores from /proc/stat (100 % = every core busy). Both sampled over each iperf3 run.
# Everything runs in namespaces this script creates; the EXIT trap removes them and stops every
# process it started (by PID).
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbn                 # tern lab prefix $LAB: namespaces $LAB-c1, $LAB-relay, ...
NS_A="tbn${ID}a"               # direct-path namespaces
NS_B="tbn${ID}b"
PATHS=${BENCH_PATHS:-tern veth wg}

# ---------- 1. build, 2. packages ----------
case " $PATHS " in
    *" tern "*) build_tern ;;
esac
install_tools

# ---------- 3. tern over DERP ----------
derp_snapshot() { # SUFFIX RUN: enqueued packets, their bytes, queue-full drops, packets sent into $WORK/derp.RUN.{p,b,q,s}SUFFIX
    derp_metric packets_forwarded_total >"$WORK/derp.$2.p$1"
    derp_metric bytes_forwarded_total >"$WORK/derp.$2.b$1"
    derp_metric packets_dropped_queue_full_total >"$WORK/derp.$2.q$1"
    derp_metric packets_sent_total >"$WORK/derp.$2.s$1"
}
derp_pre() { derp_snapshot 0 "$2"; }
derp_post() { derp_snapshot 1 "$2"; }

bench_tern() {
    lab_up udpblock udpblock
    local ip2 pid_derp pid_c1 pid_c2
    ip2=$(lab_tailnet_ip c2)
    pid_derp=$(lab_pid derp)
    pid_c1=$(lab_pid tern:c1)
    pid_c2=$(lab_pid tern:c2)
    [ -n "$ip2" ] && [ -n "$pid_derp" ] && [ -n "$pid_c1" ] && [ -n "$pid_c2" ] \
        || die "lab status lacks c2's tailnet IP or a PID: $(cat "$WORK/lab.json")"
    log "c2 tailnet IP $ip2; PIDs derp $pid_derp, c1 $pid_c1, c2 $pid_c2"
    local rtt
    rtt=$(rtt_ms "$LAB-c1" "$ip2")
    [ -n "$rtt" ] || die "c1 cannot ping c2 over tern"
    start_iperf_server "$LAB-c2" "$ip2"
    # Page faults during the runs: packet memory freed and faulted in again would show here.
    local spec faults="" s0 s1
    local -A faults0=()
    local daemons=("c1=$pid_c1" "c2=$pid_c2" "derp=$pid_derp")
    for spec in "${daemons[@]}"; do faults0[$spec]=$(proc_minflt "${spec#*=}"); done
    s0=$(date +%s.%N)
    BENCH_HOOK_PRE=derp_pre BENCH_HOOK_POST=derp_post \
        measure tern "$LAB-c1" "$ip2" "derp=$pid_derp" "tern-c1=$pid_c1" "tern-c2=$pid_c2"
    s1=$(date +%s.%N)
    for spec in "${daemons[@]}"; do
        faults+="${faults:+, }${spec%%=*} $(awk -v a="${faults0[$spec]}" -v b="$(proc_minflt "${spec#*=}")" \
            -v t0="$s0" -v t1="$s1" 'BEGIN { printf "%.0f", (b - a) / (t1 - t0) }')"
    done
    # Packets/s through the relay from its own counters (both directions: data and TCP ACKs).
    local run p0 p1 b0 b1 pps="" sent="" avg="" drops="" extra
    for run in $(seq 1 "$RUNS"); do
        p0=$(cat "$WORK/derp.$run.p0"); p1=$(cat "$WORK/derp.$run.p1")
        b0=$(cat "$WORK/derp.$run.b0"); b1=$(cat "$WORK/derp.$run.b1")
        if [ -n "$p0" ] && [ -n "$p1" ]; then
            pps+="$(( (p1 - p0) / SECONDS_PER_RUN ))"$'\n'
            avg+="$(( (b1 - b0) / (p1 - p0 > 0 ? p1 - p0 : 1) ))"$'\n'
            sent+="$(( ($(cat "$WORK/derp.$run.s1") - $(cat "$WORK/derp.$run.s0")) / SECONDS_PER_RUN ))"$'\n'
            drops+="$(( $(cat "$WORK/derp.$run.q1") - $(cat "$WORK/derp.$run.q0") ))"$'\n'
        fi
    done
    if [ -n "$pps" ]; then
        extra="relay (DERP /debug/metrics, both directions, median): $(printf '%s' "$pps" | median | awk '{ printf "%.0f", $1 }') packets/s enqueued, $(printf '%s' "$sent" | median | awk '{ printf "%.0f", $1 }') packets/s sent, avg $(printf '%s' "$avg" | median | awk '{ printf "%.0f", $1 }') B/packet, queue-full drops per run: $(printf '%s' "$drops" | paste -sd, -); page faults/s: $faults; ping ${rtt} ms"
    else
        # Counters unreachable: estimate from the payload rate and a 1280-byte packet.
        local med
        med=$(awk '{ print $1 }' "$WORK/tern.runs" | median)
        extra="~$(awk -v g="$med" 'BEGIN { printf "%.0f", g * 1e9 / 8 / 1280 }') packets/s ESTIMATE (iperf bytes / 1280 B; /debug/metrics unreachable); page faults/s: $faults; ping ${rtt} ms"
    fi
    summarize tern "tern over DERP (c1 -> tern derp -> c2, TLS, TUN tern0, UDP blocked)" "$extra"
    kill "$IPERF_PID" 2>/dev/null || true
    lab_down
}

# ---------- 4. direct baselines ----------
setup_direct() {
    OWN_NETNS+=("$NS_A" "$NS_B")
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip -n "$NS_A" link add veth0 type veth peer name veth0 netns "$NS_B"
    ip -n "$NS_A" addr add 198.19.0.1/24 dev veth0
    ip -n "$NS_B" addr add 198.19.0.2/24 dev veth0
    for ns in "$NS_A" "$NS_B"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set veth0 up
    done
}

bench_veth() {
    start_iperf_server "$NS_B" 198.19.0.2
    local srv=$IPERF_PID rtt
    rtt=$(rtt_ms "$NS_A" 198.19.0.2)
    measure veth "$NS_A" 198.19.0.2 "iperf3-server=$srv"
    summarize veth "raw veth a<->b" "ping ${rtt} ms"
    kill "$srv" 2>/dev/null || true
}

bench_wg() {
    wg_keys a b
    local apub=${WG_PUB[a]} bpub=${WG_PUB[b]} pid_a pid_b
    start_wg "$NS_A"; pid_a=$WG_PID
    start_wg "$NS_B"; pid_b=$WG_PID
    nsenter -t "$pid_a" -m -n wg set wg0 private-key "$WORK/a.key" listen-port 51820 \
        peer "$bpub" allowed-ips 100.64.0.2/32 endpoint 198.19.0.2:51820
    nsenter -t "$pid_b" -m -n wg set wg0 private-key "$WORK/b.key" listen-port 51820 \
        peer "$apub" allowed-ips 100.64.0.1/32 endpoint 198.19.0.1:51820
    ip -n "$NS_A" addr add 100.64.0.1/24 dev wg0
    ip -n "$NS_B" addr add 100.64.0.2/24 dev wg0
    ip -n "$NS_A" link set wg0 mtu 1420 up
    ip -n "$NS_B" link set wg0 mtu 1420 up
    start_iperf_server "$NS_B" 100.64.0.2
    local rtt
    rtt=$(rtt_ms "$NS_A" 100.64.0.2)
    [ -n "$rtt" ] || die "wireguard-go a cannot ping b"
    measure wg "$NS_A" 100.64.0.2 "wg-a=$pid_a" "wg-b=$pid_b"
    summarize wg "wireguard-go a<->b over veth (MTU 1420)" "ping ${rtt} ms"
}

# ---------- run ----------
# Background load: others share this machine, so record how busy it was just before.
BACKGROUND=$(busy_percent 3)
log "machine busy before the runs: ${BACKGROUND}%"
case " $PATHS " in *" tern "*) bench_tern ;; esac
setup_direct
case " $PATHS " in *" veth "*) bench_veth ;; esac
case " $PATHS " in *" wg "*) bench_wg ;; esac

# ---------- 5. table ----------
echo
echo "# tern data plane, $(machine_line)"
echo "# iperf3 TCP, $RUNS x ${SECONDS_PER_RUN}s; CPU = mean over runs; process % of one core, machine % of all $NCPU cores"
echo "# machine busy ${BACKGROUND}% in the 3 s before the runs (other load)"
echo
print_table
tern_med=$(median_of tern)
wg_med=$(median_of wg)
echo
if [ -n "$tern_med" ] && [ -n "$wg_med" ]; then awk -v t="$tern_med" -v w="$wg_med" 'BEGIN {
    r = t / w
    printf "ratio tern-over-DERP / wireguard-go-direct = %.3f / %.3f = **%.2f** (goal >= 0.5: %s)\n", t, w, r, (r >= 0.5 ? "met" : "NOT met") }'; fi
