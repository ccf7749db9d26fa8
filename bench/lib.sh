# shellcheck shell=bash
# Shared shell functions of the tern benchmarks (bench/*.sh).
# Source it from a bench script after `set -euo pipefail`:
#
#   . "$(dirname "$0")/lib.sh"
#   bench_init tbn       # ROOT TERN ID LAB WORK RESULTS HZ NCPU, EXIT/INT traps, root check
#
# Everything a script starts goes through these variables so the EXIT trap can undo it:
#   STARTED_PIDS  processes to stop (SIGTERM, then SIGKILL), by PID
#   OWN_NETNS     namespaces the script made itself (every process left in them is killed)
#   LAB_UP=1      `tern lab up` ran with prefix $LAB: `tern lab down` it
# Env read here: BENCH_SECONDS (iperf3 -t, default 10), BENCH_RUNS (default 3), BENCH_SKIP_BUILD=1,
# BENCH_TERN (the tern binary; default target/release/tern).

export LC_ALL=C                # "." as the decimal point in awk, printf and $EPOCHREALTIME
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
RUNS=${BENCH_RUNS:-3}
STARTED_PIDS=()
OWN_NETNS=()
LAB_UP=0

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] error: $*" >&2; exit 1; }

# bench_init TAG: common variables, traps and the root check. Lab prefix $LAB = TAG<pid>.
bench_init() {
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    TERN=${BENCH_TERN:-"$ROOT/target/release/tern"}
    ID=$$
    LAB="$1${ID}"
    WORK=$(mktemp -d /tmp/tern-bench.XXXXXX)
    RESULTS="$WORK/results"
    : >"$RESULTS"
    HZ=$(getconf CLK_TCK)
    NCPU=$(nproc)
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, TUN)"
}

bench_cleanup() {
    local rc=$?
    set +e
    local pid ns
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    sleep 0.5
    for pid in "${STARTED_PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null
    done
    if [ "$LAB_UP" = 1 ]; then
        TERN_LAB_PREFIX="$LAB" "$TERN" lab down >/dev/null 2>&1 \
            || TERN_LAB_PREFIX="$LAB" "$TERN" lab down --force >/dev/null 2>&1 \
            || log "tern lab down failed"
    fi
    for ns in "${OWN_NETNS[@]}"; do
        if ip netns list | grep -qw "^$ns"; then
            for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
            ip netns del "$ns"
        fi
    done
    if [ "${BENCH_KEEP_WORK:-0}" = 1 ]; then echo "[bench] kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit "$rc"
}

# build_tern: the release build (unless BENCH_SKIP_BUILD=1) and a check that $TERN exists.
build_tern() {
    if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
        log "cargo build --release --bin tern"
        (cd "$ROOT" && cargo build --release --bin tern) >&2
    fi
    [ -x "$TERN" ] || die "$TERN missing"
}

# install_tools: apt-get install of wireguard-go, wireguard-tools, iperf3, jq where missing.
install_tools() {
    local missing=()
    command -v wireguard-go >/dev/null || missing+=(wireguard-go)
    command -v wg >/dev/null || missing+=(wireguard-tools)
    command -v iperf3 >/dev/null || missing+=(iperf3)
    command -v jq >/dev/null || missing+=(jq)
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
    fi
}

# ---------- lab ----------
# lab_up NAT1 NAT2: `tern lab up` with prefix $LAB; its status JSON goes to $WORK/lab.json.
lab_up() {
    log "tern lab up --nat1 $1 --nat2 $2 (prefix $LAB)"
    LAB_UP=1
    TERN_LAB_PREFIX="$LAB" "$TERN" lab up --nat1 "$1" --nat2 "$2" >"$WORK/lab-up.log" 2>&1 \
        || { cat "$WORK/lab-up.log" >&2; die "tern lab up failed"; }
    TERN_LAB_PREFIX="$LAB" "$TERN" lab status --json >"$WORK/lab.json"
}

lab_down() {
    log "tern lab down"
    TERN_LAB_PREFIX="$LAB" "$TERN" lab down >/dev/null 2>&1 || log "tern lab down failed"
    LAB_UP=0
}

# lab_pid NAME: PID of the lab process NAME (`derp`, `tern:c1`, ...) from $WORK/lab.json.
lab_pid() { jq -r --arg n "$1" '.processes[] | select(.name == $n) | .pid' "$WORK/lab.json"; }
# lab_tailnet_ip HOST: the IPv4 tailnet address of tern node HOST from $WORK/lab.json.
lab_tailnet_ip() {
    jq -r --arg h "$1" '[.tern_nodes[] | select(.hostname == $h) | .tailnet_ips[] | select(contains(":") | not)]
        | first // empty | sub("/.*"; "")' "$WORK/lab.json"
}
# lab_dir: the lab's state directory (sockets, node state, auth.key).
lab_dir() { echo "/run/tern-lab/$LAB"; }

# tern_cli NODE ARGS...: the tern CLI against lab node NODE's daemon (c1, c2, s1, relay).
tern_cli() { local node=$1; shift; "$TERN" --socket "$(lab_dir)/$node.sock" "$@"; }
# path_of NODE PEER: NODE's path to PEER from its `status --json` ("none" if unknown or no answer).
path_of() {
    tern_cli "$1" status --json 2>/dev/null | jq -r --arg h "$2" \
        '([.peers[] | select(.hostname == $h)] | first | .path) // "none"' 2>/dev/null || echo none
}
# wait_for_path NODE PEER PEER_IP WANT TIMEOUT: ping PEER_IP from NODE through the TUN until NODE
# says its path to PEER is WANT; 1 if it still is not after TIMEOUT s (the caller says why).
wait_for_path() {
    local node=$1 peer=$2 ip=$3 want=$4 timeout=$5 deadline ping_pid rc=0
    ip netns exec "$LAB-$node" ping -c $((timeout * 5)) -i 0.2 -W 1 "$ip" >/dev/null 2>&1 &
    ping_pid=$!
    STARTED_PIDS+=("$ping_pid")
    deadline=$(($(date +%s) + timeout))
    until [ "$(path_of "$node" "$peer")" = "$want" ]; do
        if [ "$(date +%s)" -ge "$deadline" ]; then rc=1; break; fi
        sleep 0.05
    done
    kill "$ping_pid" 2>/dev/null || true
    return "$rc"
}

# derp_metric NAME: value of tern_derp_NAME from the lab relay's /debug/metrics ("" if unreachable;
# the relay serves it to loopback only, hence curl from inside the relay namespace).
derp_metric() {
    ip netns exec "$LAB-relay" curl -sk --max-time 3 --interface 127.0.0.1 \
        "https://198.18.0.10:443/debug/metrics" 2>/dev/null | awk -v n="tern_derp_$1" '$1 == n { print $2 }'
}

# ---------- measurement helpers ----------
# utime+stime ticks of a PID (fields after the ")" that ends comm).
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# proc_minflt PID: minor page faults of PID so far (/proc/PID/stat field 10).
proc_minflt() { awk '{ sub(/^.*\) /, ""); print $8 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# "busy total" ticks of the whole machine.
machine_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
median() { sort -g | awk '{ v[NR] = $1 } END { print ((NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
mean() { awk '{ s += $1 } END { printf "%.0f", NR ? s / NR : 0 }'; }
# busy_percent SECONDS: how busy the machine's cores were over the next SECONDS (other load).
busy_percent() {
    local a b
    a=$(machine_ticks); sleep "$1"; b=$(machine_ticks)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]) }'
}
# rtt_ms NS IP: average ping RTT in ms (3 pings), empty if none answered.
rtt_ms() {
    ip netns exec "$1" ping -c 3 -i 0.3 -W 5 "$2" 2>/dev/null | awk -F/ '/^rtt/ { print $5 }'
}

# measure LABEL CLIENT_NS SERVER_IP [name=PID ...]: RUNS iperf3 runs from CLIENT_NS to an iperf3
# server already listening on SERVER_IP (see measure_one), into a fresh $WORK/<label>.runs.
measure() {
    local label=$1 run
    : >"$WORK/$label.runs"
    for run in $(seq 1 "$RUNS"); do
        measure_one "$run" "$@"
    done
}

# measure_one RUN LABEL CLIENT_NS SERVER_IP [name=PID ...]: one iperf3 run of SECONDS_PER_RUN; its
# Gbit/s, retransmits, machine CPU and the CPU of each named PID are appended as one line to
# $WORK/<label>.runs (iperf3's JSON stays in $WORK/<label>.<run>.json). Optional hooks, functions
# named by BENCH_HOOK_PRE/BENCH_HOOK_POST, are called as HOOK LABEL RUN around the run.
# Scripts comparing paths call this in turns (path A run 1, path B run 1, A run 2, ...) so that
# other load on the machine hits every path alike.
measure_one() {
    local run=$1 label=$2 client_ns=$3 server_ip=$4
    shift 4
    local named=("$@")
    local -A t0=() t1=()
    local m0 m1 e spec s0 s1
    [ -n "${BENCH_HOOK_PRE:-}" ] && "$BENCH_HOOK_PRE" "$label" "$run"
    for spec in "${named[@]}"; do t0[$spec]=$(proc_ticks "${spec#*=}"); done
    m0=$(machine_ticks)
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

# cores_per_gbit LABEL: median over LABEL's runs of (CPU of its named processes, in cores) / (Gbit/s):
# what the tunnel itself costs per Gbit/s, less sensitive to other load than the throughput.
cores_per_gbit() {
    awk '{ c = 0; for (i = 4; i <= NF; i++) { split($i, kv, "="); c += kv[2] } print (c / 100) / $1 }' \
        "$WORK/$1.runs" | median
}

# print_table: the markdown table of every row summarize wrote.
print_table() {
    echo "| path | runs (Gbit/s) | **median** | CPU | retransmits/run | notes |"
    echo "|---|---|---|---|---|---|"
    local _label desc runs med cpu retr extra
    while IFS='|' read -r _label desc runs med cpu retr extra; do
        printf '| %s | %s | **%s** | %s | %s | %s |\n' "$desc" "$runs" "$med" "$cpu" "$retr" "$extra"
    done <"$RESULTS"
}

# median_of LABEL: the median Gbit/s of LABEL's row in $RESULTS (empty if not measured).
median_of() { awk -F'|' -v l="$1" '$1 == l { print $4 }' "$RESULTS"; }

# machine_line: "<date>, <kernel>, <cores> (<cpu model>)" for table headers.
machine_line() {
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $NCPU cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))"
}

# ---------- wireguard-go ----------
# start_wg NS [IFACE]: wireguard-go -f in NS with a private tmpfs /run/wireguard (its UAPI
# socket directory, so instances in different namespaces do not find each other's sockets);
# sets WG_PID. Configure it with `nsenter -t $WG_PID -m -n wg set IFACE ...`.
start_wg() {
    local ns=$1 iface=${2:-wg0}
    ip netns exec "$ns" sh -c "mkdir -p /run/wireguard && mount -t tmpfs wgrun /run/wireguard && exec wireguard-go -f $iface" \
        >"$WORK/wg-$ns.log" 2>&1 &
    local pid=$!
    STARTED_PIDS+=("$pid")
    local i
    # shellcheck disable=SC2034 # WG_PID is read by the caller
    for i in $(seq 1 50); do
        nsenter -t "$pid" -m -n test -S "/run/wireguard/$iface.sock" && { WG_PID=$pid; return; }
        sleep 0.1
    done
    die "wireguard-go in $ns did not open its UAPI socket: $(cat "$WORK/wg-$ns.log")"
}

# wg_keys NAME...: a private key file $WORK/NAME.key per name and its public key in WG_PUB[NAME].
# shellcheck disable=SC2034 # WG_PUB and WG_PID are read by the scripts sourcing this file
declare -A WG_PUB=()
wg_keys() {
    local name
    for name in "$@"; do
        (umask 077 && wg genkey >"$WORK/$name.key")
        # shellcheck disable=SC2034
        WG_PUB[$name]=$(wg pubkey <"$WORK/$name.key")
    done
}

# start_iperf_server NS IP: iperf3 -s bound to IP in NS; sets IPERF_PID (stopped by the trap).
start_iperf_server() {
    ip netns exec "$1" iperf3 -s -B "$2" >"$WORK/iperf-server-$1-$2.log" 2>&1 &
    IPERF_PID=$!
    STARTED_PIDS+=("$IPERF_PID")
    sleep 1
}
