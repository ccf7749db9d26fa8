#!/usr/bin/env bash
# Data-plane throughput of tern over DERP against the direct-path baselines of
# spec/lab.md §3, all on this machine in one run (issue 4 figures).
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
#   wg-go      wireguard-go a<->b over that veth (MTU 1420), as in lab.md §3 (b).
# CPU: per process = % of one core (utime+stime from /proc/PID/stat); machine = busy share of
# all cores from /proc/stat (100 % = every core busy). Both sampled over each iperf3 run.
# Everything runs in namespaces this script creates; the EXIT trap removes them and stops every
# process it started (by PID).
set -euo pipefail

SECONDS_PER_RUN=${BENCH_SECONDS:-10}
RUNS=${BENCH_RUNS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TERN=${BENCH_TERN:-"$ROOT/target/release/tern"}
ID=$$
LAB="tbn${ID}"                 # tern lab prefix: namespaces $LAB-c1, $LAB-relay, ...
NS_A="tbn${ID}a"               # direct-path namespaces
NS_B="tbn${ID}b"
WORK=$(mktemp -d /tmp/tern-bench.XXXXXX)
RESULTS="$WORK/results"
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)
PATHS=${BENCH_PATHS:-tern veth wg}
STARTED_PIDS=()
LAB_UP=0

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] error: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    sleep 0.5
    for pid in "${STARTED_PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null
    done
    if [ "$LAB_UP" = 1 ]; then
        TERN_LAB_PREFIX="$LAB" "$TERN" lab down >/dev/null 2>&1 || log "tern lab down failed"
    fi
    for ns in "$NS_A" "$NS_B"; do
        if ip netns list | grep -qw "^$ns"; then
            for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
            ip netns del "$ns"
        fi
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, TUN)"

# ---------- 1. build, 2. packages ----------
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release --bin tern"
    (cd "$ROOT" && cargo build --release --bin tern) >&2
fi
case " $PATHS " in *" tern "*) [ -x "$TERN" ] || die "$TERN missing" ;; esac
missing=()
command -v wireguard-go >/dev/null || missing+=(wireguard-go)
command -v wg >/dev/null || missing+=(wireguard-tools)
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

# ---------- measurement helpers ----------
# utime+stime ticks of a PID (fields after the ")" that ends comm).
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# "busy total" ticks of the whole machine.
machine_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
median() { sort -g | awk '{ v[NR] = $1 } END { print ((NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
mean() { awk '{ s += $1 } END { printf "%.0f", NR ? s / NR : 0 }'; }

# measure LABEL CLIENT_NS SERVER_IP [name=PID ...]: RUNS iperf3 runs from CLIENT_NS to an iperf3
# server already listening on SERVER_IP; per run Gbit/s, retransmits, machine CPU and CPU of each
# named PID. Appends one line per run to $WORK/<label>.runs. An optional hook `before_run`/
# `after_run` (functions named by BENCH_HOOK_PRE/POST) is called around each run.
measure() {
    local label=$1 client_ns=$2 server_ip=$3
    shift 3
    local named=("$@") run
    : >"$WORK/$label.runs"
    for run in $(seq 1 "$RUNS"); do
        local -A t0=() t1=()
        local m0 m1 e spec
        [ -n "${BENCH_HOOK_PRE:-}" ] && "$BENCH_HOOK_PRE" "$label" "$run"
        for spec in "${named[@]}"; do t0[$spec]=$(proc_ticks "${spec#*=}"); done
        m0=$(machine_ticks)
        local s0 s1
        s0=$(date +%s.%N)
        ip netns exec "$client_ns" iperf3 -c "$server_ip" -t "$SECONDS_PER_RUN" -J >"$WORK/$label.$run.json" \
            || die "$label run $run: iperf3 failed: $(jq -r '.error // empty' "$WORK/$label.$run.json" 2>/dev/null)"
        s1=$(date +%s.%N)
        m1=$(machine_ticks)
        for spec in "${named[@]}"; do t1[$spec]=$(proc_ticks "${spec#*=}"); done
        [ -n "${BENCH_HOOK_POST:-}" ] && "$BENCH_HOOK_POST" "$label" "$run"
        e=$(awk -v a="$s0" -v b="$s1" 'BEGIN { print b - a }')
        local gbit retr machine cpus=""
        gbit=$(jq -r '.end.sum_received.bits_per_second / 1e9' "$WORK/$label.$run.json")
        retr=$(jq -r '.end.sum_sent.retransmits // 0' "$WORK/$label.$run.json")
        machine=$(awk -v a="$m0" -v b="$m1" 'BEGIN { split(a, x, " "); split(b, y, " ");
            printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]) }')
        for spec in "${named[@]}"; do
            cpus+=" ${spec%%=*}=$(awk -v d="$((t1[$spec] - t0[$spec]))" -v hz="$HZ" -v e="$e" \
                'BEGIN { printf "%.0f", 100 * d / hz / e }')"
        done
        printf '%s %s %s%s\n' "$gbit" "$retr" "$machine" "$cpus" >>"$WORK/$label.runs"
        log "$label run $run: $(printf '%.3f' "$gbit") Gbit/s, $retr retransmits, machine ${machine}%,$cpus"
    done
}

# summarize LABEL DESCRIPTION [EXTRA]: one table row from $WORK/<label>.runs into $RESULTS.
summarize() {
    local label=$1 desc=$2 extra=${3:-}
    local f="$WORK/$label.runs" runs med machine retr procs=""
    runs=$(awk '{ printf "%s%.3f", (NR > 1 ? ", " : ""), $1 }' "$f")
    med=$(awk '{ print $1 }' "$f" | median)
    machine=$(awk '{ print $3 }' "$f" | mean)
    retr=$(awk '{ print $2 }' "$f" | mean)
    local fields name i
    fields=$(awk 'NR == 1 { print NF }' "$f")
    for ((i = 4; i <= fields; i++)); do
        name=$(awk -v i="$i" 'NR == 1 { split($i, kv, "="); print kv[1] }' "$f")
        procs+=", $name $(awk -v i="$i" '{ split($i, kv, "="); print kv[2] }' "$f" | mean) %"
    done
    printf '%s|%s|%s|%.3f|machine %s %%%s|%s|%s\n' "$label" "$desc" "$runs" "$med" "$machine" "$procs" "$retr" "$extra" >>"$RESULTS"
}

# ---------- 3. tern over DERP ----------
derp_metric() { # NAME -> value of tern_derp_NAME from the relay's /debug/metrics ("" if unreachable)
    ip netns exec "$LAB-relay" curl -sk --max-time 3 --interface 127.0.0.1 \
        "https://198.18.0.10:443/debug/metrics" 2>/dev/null | awk -v n="tern_derp_$1" '$1 == n { print $2 }'
}
derp_snapshot() { # SUFFIX RUN: enqueued packets, their bytes, queue-full drops, packets sent into $WORK/derp.RUN.{p,b,q,s}SUFFIX
    derp_metric packets_forwarded_total >"$WORK/derp.$2.p$1"
    derp_metric bytes_forwarded_total >"$WORK/derp.$2.b$1"
    derp_metric packets_dropped_queue_full_total >"$WORK/derp.$2.q$1"
    derp_metric packets_sent_total >"$WORK/derp.$2.s$1"
}
derp_pre() { derp_snapshot 0 "$2"; }
derp_post() { derp_snapshot 1 "$2"; }

bench_tern() {
    log "tern lab up --nat1 udpblock --nat2 udpblock (prefix $LAB)"
    LAB_UP=1
    TERN_LAB_PREFIX="$LAB" "$TERN" lab up --nat1 udpblock --nat2 udpblock >"$WORK/lab-up.log" 2>&1 \
        || { cat "$WORK/lab-up.log" >&2; die "tern lab up failed"; }
    TERN_LAB_PREFIX="$LAB" "$TERN" lab status --json >"$WORK/lab.json"
    local ip2 pid_derp pid_c1 pid_c2
    ip2=$(jq -r '.tern_nodes[] | select(.hostname == "c2") | .tailnet_ips[]' "$WORK/lab.json" | grep -v : | head -1)
    ip2=${ip2%/*}
    pid_derp=$(jq -r '.processes[] | select(.name == "derp") | .pid' "$WORK/lab.json")
    pid_c1=$(jq -r '.processes[] | select(.name == "tern:c1") | .pid' "$WORK/lab.json")
    pid_c2=$(jq -r '.processes[] | select(.name == "tern:c2") | .pid' "$WORK/lab.json")
    [ -n "$ip2" ] && [ -n "$pid_derp" ] && [ -n "$pid_c1" ] && [ -n "$pid_c2" ] \
        || die "lab status lacks c2's tailnet IP or a PID: $(cat "$WORK/lab.json")"
    log "c2 tailnet IP $ip2; PIDs derp $pid_derp, c1 $pid_c1, c2 $pid_c2"
    ip netns exec "$LAB-c1" ping -c 3 -i 0.3 -W 5 "$ip2" >"$WORK/tern-ping.txt" \
        || { cat "$WORK/tern-ping.txt" >&2; die "c1 cannot ping c2 over tern"; }
    local rtt
    rtt=$(awk -F/ '/^rtt/ { print $5 }' "$WORK/tern-ping.txt")
    ip netns exec "$LAB-c2" iperf3 -s -B "$ip2" >"$WORK/iperf-tern-server.log" 2>&1 &
    STARTED_PIDS+=($!)
    sleep 1
    BENCH_HOOK_PRE=derp_pre BENCH_HOOK_POST=derp_post \
        measure tern "$LAB-c1" "$ip2" "derp=$pid_derp" "tern-c1=$pid_c1" "tern-c2=$pid_c2"
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
        extra="relay (DERP /debug/metrics, both directions, median): $(printf '%s' "$pps" | median | awk '{ printf "%.0f", $1 }') packets/s enqueued, $(printf '%s' "$sent" | median | awk '{ printf "%.0f", $1 }') packets/s sent, avg $(printf '%s' "$avg" | median | awk '{ printf "%.0f", $1 }') B/packet, queue-full drops per run: $(printf '%s' "$drops" | paste -sd, -); ping ${rtt} ms"
    else
        # Counters unreachable: estimate from the payload rate and a 1280-byte packet.
        local med
        med=$(awk '{ print $1 }' "$WORK/tern.runs" | median)
        extra="~$(awk -v g="$med" 'BEGIN { printf "%.0f", g * 1e9 / 8 / 1280 }') packets/s ESTIMATE (iperf bytes / 1280 B; /debug/metrics unreachable); ping ${rtt} ms"
    fi
    summarize tern "tern over DERP (c1 -> tern derp -> c2, TLS, TUN tern0, UDP blocked)" "$extra"
    kill "${STARTED_PIDS[-1]}" 2>/dev/null || true
    log "tern lab down"
    TERN_LAB_PREFIX="$LAB" "$TERN" lab down >/dev/null 2>&1 || log "tern lab down failed"
    LAB_UP=0
}

# ---------- 4. direct baselines ----------
setup_direct() {
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
    ip netns exec "$NS_B" iperf3 -s -B 198.19.0.2 >"$WORK/iperf-veth-server.log" 2>&1 &
    local srv=$!
    STARTED_PIDS+=("$srv")
    sleep 1
    local rtt
    rtt=$(ip netns exec "$NS_A" ping -c 3 -i 0.3 198.19.0.2 | awk -F/ '/^rtt/ { print $5 }')
    measure veth "$NS_A" 198.19.0.2 "iperf3-server=$srv"
    summarize veth "raw veth a<->b" "ping ${rtt} ms"
    kill "$srv" 2>/dev/null || true
}

# start_wg NS: wireguard-go in NS with a private /run/wireguard (lab.md pitfall 4); prints its PID.
start_wg() {
    local ns=$1
    ip netns exec "$ns" sh -c 'mkdir -p /run/wireguard && mount -t tmpfs wgrun /run/wireguard && exec wireguard-go -f wg0' \
        >"$WORK/wg-$ns.log" 2>&1 &
    local pid=$!
    STARTED_PIDS+=("$pid")
    local i
    for i in $(seq 1 50); do
        nsenter -t "$pid" -m -n test -S /run/wireguard/wg0.sock && { WG_PID=$pid; return; }
        sleep 0.1
    done
    die "wireguard-go in $ns did not open its UAPI socket: $(cat "$WORK/wg-$ns.log")"
}

bench_wg() {
    (umask 077 && wg genkey >"$WORK/a.key" && wg genkey >"$WORK/b.key")
    local apub bpub pid_a pid_b
    apub=$(wg pubkey <"$WORK/a.key"); bpub=$(wg pubkey <"$WORK/b.key")
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
    ip netns exec "$NS_B" iperf3 -s -B 100.64.0.2 >"$WORK/iperf-wg-server.log" 2>&1 &
    local srv=$!
    STARTED_PIDS+=("$srv")
    sleep 1
    local rtt
    rtt=$(ip netns exec "$NS_A" ping -c 3 -i 0.3 -W 5 100.64.0.2 | awk -F/ '/^rtt/ { print $5 }')
    [ -n "$rtt" ] || die "wireguard-go a cannot ping b"
    measure wg "$NS_A" 100.64.0.2 "wg-a=$pid_a" "wg-b=$pid_b"
    summarize wg "wireguard-go a<->b over veth (MTU 1420)" "ping ${rtt} ms"
}

# ---------- run ----------
: >"$RESULTS"
# Background load: others share this machine, so record how busy it was just before.
bg0=$(machine_ticks); sleep 3; bg1=$(machine_ticks)
BACKGROUND=$(awk -v a="$bg0" -v b="$bg1" 'BEGIN { split(a, x, " "); split(b, y, " ");
    printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]) }')
log "machine busy before the runs: ${BACKGROUND}%"
case " $PATHS " in *" tern "*) bench_tern ;; esac
setup_direct
case " $PATHS " in *" veth "*) bench_veth ;; esac
case " $PATHS " in *" wg "*) bench_wg ;; esac

# ---------- 5. table ----------
echo
echo "# tern data plane, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $NCPU cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))"
echo "# iperf3 TCP, $RUNS x ${SECONDS_PER_RUN}s; CPU = mean over runs; process % of one core, machine % of all $NCPU cores"
echo "# machine busy ${BACKGROUND}% in the 3 s before the runs (other load)"
echo
echo "| path | runs (Gbit/s) | **median** | CPU | retransmits/run | notes |"
echo "|---|---|---|---|---|---|"
while IFS='|' read -r _label desc runs med cpu retr extra; do
    printf '| %s | %s | **%s** | %s | %s | %s |\n' "$desc" "$runs" "$med" "$cpu" "$retr" "$extra"
done <"$RESULTS"
tern_med=$(awk -F'|' '$1 == "tern" { print $4 }' "$RESULTS")
wg_med=$(awk -F'|' '$1 == "wg" { print $4 }' "$RESULTS")
echo
if [ -n "$tern_med" ] && [ -n "$wg_med" ]; then awk -v t="$tern_med" -v w="$wg_med" 'BEGIN {
    r = t / w
    printf "ratio tern-over-DERP / wireguard-go-direct = %.3f / %.3f = **%.2f** (goal >= 0.5: %s)\n", t, w, r, (r >= 0.5 ? "met" : "NOT met") }'; fi
