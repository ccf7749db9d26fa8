#!/usr/bin/env bash
# Direct-path figures of issue 5, all in one run on the lab topology with nat1=easy, nat2=easy:
#
#   sudo bench/direct.sh            # from the repository root; prints the tables
#
# 1. tput  TCP throughput c1 -> c2 (iperf3, BENCH_RUNS x BENCH_SECONDS, median) through tern's TUNs
#          over a DIRECT path (checked in both daemons' `status --json` before and after, and on
#          the DERP relay's packet counter; the script fails if it is not direct), and
#     wg   through wireguard-go (Debian) in the same c1/c2 behind the same two NAT boxes, talking
#          to each other's NAT public address; the ratio. The paths take turns run by run.
#          Also per run: CPU of each tunnel process, UDP receive-buffer drops at the receiver.
# 2. ttd   Time to direct: restart both daemons (state kept, `tern down` first), `tern up` both,
#          ping c1 -> c2 through the TUN, poll both daemons' `status --json` every 50 ms until
#          each reports `path == "direct"` for the other. Two cases (BENCH_TTD_MODES):
#          both-up  the ping starts once both are Running with each other as peer; the time is
#                   from then (the goal's "both nodes up"),
#          race     the ping starts as soon as c1 has a route, c2 maybe not up yet; the time is
#                   from `tern up`.
#          BENCH_TTD_RUNS runs each (default 3, conntrack of both NAT boxes flushed before each),
#          median.
# 3. rss   Daemon memory: a third tern node in the lab's `server` namespace (public address, no NAT),
#          so c1 has 2 peers; VmRSS of c1's daemon idle, during and after iperf3 to both peers at once.
#
# Env: BENCH_SECONDS (default 10), BENCH_RUNS (default 3), BENCH_SKIP_BUILD=1, BENCH_TERN (binary),
#      BENCH_PARTS (subset of "tput wg ttd rss"), BENCH_TTD_RUNS (default 3),
#      BENCH_TTD_MODES (subset of "both-up race"),
#      BENCH_DIRECT_TIMEOUT (seconds to wait for a direct path, default 10),
#      BENCH_WG_MTUS (wireguard-go MTUs to measure, default "1420 1280": its default as in
#      dataplane.sh, the headline, and tern's TUN MTU for an equal-packet-size comparison),
#      BENCH_NAT1/BENCH_NAT2 (NAT modes, default easy: the figures are for easy x easy; e.g. hard
#      shows the script's failure when there is no direct path),
#      BENCH_ALLOW_DERP=1 (go on when a path is not direct, to try the other parts out: the figures
#      are then marked NOT DIRECT and the script still exits 3).
#      TERN_TUN_OFFLOAD=false (the lab's daemons inherit it: TUN offloads off, for comparison).
# With the wg part, both tern nodes run with `--netfilter-mode=off` (see tput_wg_setup).
# Everything runs in the lab's namespaces; the EXIT trap stops every process the script started
# (by PID) and runs `tern lab down`, which removes the namespaces and everything left in them.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbd
PARTS=${BENCH_PARTS:-tput wg ttd rss}
TTD_RUNS=${BENCH_TTD_RUNS:-3}
TTD_MODES=${BENCH_TTD_MODES:-both-up race}
DIRECT_TIMEOUT=${BENCH_DIRECT_TIMEOUT:-10}
WG_MTUS=${BENCH_WG_MTUS:-1420 1280}
ALLOW_DERP=${BENCH_ALLOW_DERP:-0}
WG_PORT=51820
CONTROL_URL=http://10.99.0.20:8080
WG_LABELS=()                   # label=MTU of each wireguard-go row, the headline first
NOT_DIRECT=0                   # set when a path was not direct (only with BENCH_ALLOW_DERP=1)

has_part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---------- tern nodes ----------
# node_view NODE PEER: NODE's view of PEER from its `status --json`, into V_STATE (backend state,
# "down" if the daemon does not answer), V_PATH ("none" if null), V_REASON (path_reason), V_EP.
node_view() {
    local out
    out=$(tern_cli "$1" status --json 2>/dev/null | jq -r --arg h "$2" '
        ([.peers[] | select(.hostname == $h)] | first) as $p
        | [.backend_state, ($p.path // "none"), ($p.path_reason // "-"), ($p.endpoint // "-")] | join("\t")' \
        2>/dev/null) || out=$'down\tnone\t-\t-'
    IFS=$'\t' read -r V_STATE V_PATH V_REASON V_EP <<<"$out" || true
}
# peer_history_len NODE PEER: how many path changes NODE has recorded for PEER.
peer_history_len() {
    tern_cli "$1" status --json | jq -r --arg h "$2" '[.peers[] | select(.hostname == $h)] | first | (.path_history // []) | length'
}
# history_line NODE PEER: NODE's path history for PEER as "HH:MM:SS path/reason -> ...".
history_line() {
    tern_cli "$1" status --json 2>/dev/null | jq -r --arg h "$2" '[.peers[] | select(.hostname == $h)] | first
        | [(.path_history // [])[] | "\(.at[11:19]) \(.path)/\(.reason)"] | join(" -> ")' 2>/dev/null || echo "?"
}
# not_direct MESSAGE: fail, or with BENCH_ALLOW_DERP=1 note it and go on.
not_direct() {
    if [ "$ALLOW_DERP" = 1 ]; then
        log "WARNING: $* (BENCH_ALLOW_DERP=1: going on; these figures are NOT for a direct path)"
        NOT_DIRECT=1
    else
        die "$* (set BENCH_ALLOW_DERP=1 to measure the other parts anyway)"
    fi
}

# require_direct NODE PEER PEER_IP: wait until NODE says `path == "direct"` for PEER (pinging it
# through the TUN, at most DIRECT_TIMEOUT s).
require_direct() {
    if ! wait_for_path "$1" "$2" "$3" direct "$DIRECT_TIMEOUT"; then
        node_view "$1" "$2"
        not_direct "$1's path to $2 is '$V_PATH' (path_reason '$V_REASON', backend $V_STATE) after ${DIRECT_TIMEOUT} s of pings, not 'direct' (a build without direct paths says 'derp' here, a NAT pair without a direct path names its cause)"
        return
    fi
    node_view "$1" "$2"
    log "$1 -> $2: path direct via $V_EP"
}

# ---------- UDP receive-buffer drops (per namespace: /proc/net/snmp) ----------
# udp_counters NODE: "<InDatagrams> <RcvbufErrors>" of NODE's namespace.
udp_counters() {
    ip netns exec "$LAB-$1" awk '/^Udp:/ { if (seen) { print $2, $6; exit } seen = 1 }' /proc/net/snmp
}
# udp_buffers NODE PORT: "receive R B, send S B", the buffers of NODE's IPv4 UDP socket on PORT
# (ss skmem rb and tb).
udp_buffers() {
    ip netns exec "$LAB-$1" ss -u -a -m -n "sport = :$2" 2>/dev/null \
        | awk '/0\.0\.0\.0|[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+:/ { v4 = 1; next }
            v4 && /skmem/ { match($0, /rb[0-9]+/); r = substr($0, RSTART + 2, RLENGTH - 2)
                match($0, /tb[0-9]+/); printf "receive %s B, send %s B", r, substr($0, RSTART + 2, RLENGTH - 2); exit }'
}
udp_pre() { udp_counters c2 >"$WORK/$1.$2.udp0"; }
udp_post() { udp_counters c2 >"$WORK/$1.$2.udp1"; }
# udp_drops LABEL: "receiver (c2) UDP socket drops per run: N (x % of datagrams), ..." from the hooks.
udp_drops() {
    local run list=""
    for run in $(seq 1 "$RUNS"); do
        list+=$(paste -d' ' "$WORK/$1.$run.udp0" "$WORK/$1.$run.udp1" | awk '{ d = $4 - $2; n = $3 - $1
            printf "%s%d (%.1f %%)", (r ? ", " : ""), d, n ? 100 * d / n : 0 }' r="$((run > 1))")
    done
    echo "UDP receive-buffer drops at c2 (RcvbufErrors) per run: $list"
}

# ---------- 1. throughput ----------
# Every run measures each path in turn (tern, then wireguard-go at each MTU), so that other load
# on this shared machine hits all paths alike.

# tput_tern_setup: check that both daemons are on a direct path, start iperf3 -s on c2's tailnet IP.
tput_tern_setup() {
    local ip1
    T_PID1=$(lab_pid tern:c1); T_PID2=$(lab_pid tern:c2)
    ip1=$(lab_tailnet_ip c1); T_IP2=$(lab_tailnet_ip c2)
    [ -n "$ip1" ] && [ -n "$T_IP2" ] && [ -n "$T_PID1" ] && [ -n "$T_PID2" ] \
        || die "lab status lacks a tailnet IP or a daemon PID: $(cat "$WORK/lab.json")"
    log "tailnet IPs c1 $ip1, c2 $T_IP2; daemon PIDs c1 $T_PID1, c2 $T_PID2"
    require_direct c1 c2 "$T_IP2"
    require_direct c2 c1 "$ip1"
    T_RTT=$(rtt_ms "$LAB-c1" "$T_IP2")
    [ -n "$T_RTT" ] || die "c1 cannot ping c2 through tern"
    T_H1=$(peer_history_len c1 c2); T_H2=$(peer_history_len c2 c1)
    node_view c1 c2; T_EP1=$V_EP
    node_view c2 c1; T_EP2=$V_EP
    start_iperf_server "$LAB-c2" "$T_IP2"; T_IPERF=$IPERF_PID
    # Independent check that the data does not go through the relay: its packet counter.
    T_DERP0=$(derp_metric packets_forwarded_total)
    : >"$WORK/tern.runs"
}

tput_tern_run() {
    BENCH_HOOK_PRE=udp_pre BENCH_HOOK_POST=udp_post \
        measure_one "$1" tern "$LAB-c1" "$T_IP2" "tern-c1=$T_PID1" "tern-c2=$T_PID2"
}

# tput_tern_finish: the path must have stayed direct under load (same path now, no path change
# recorded meanwhile, (nearly) nothing through the DERP relay); then the table row.
tput_tern_finish() {
    local derp1 data_packets relayed="DERP relay counter unreachable"
    derp1=$(derp_metric packets_forwarded_total)
    kill "$T_IPERF" 2>/dev/null || true
    if [ -n "$T_DERP0" ] && [ -n "$derp1" ]; then
        relayed="packets through the DERP relay during the runs: $((derp1 - T_DERP0))"
        data_packets=$(cat "$WORK"/tern.*.json | jq -s 'map(.end.sum_received.bytes) | add / 1280 | floor')
        # Allow disco/keepalive chatter, not the data.
        [ $((derp1 - T_DERP0)) -lt $((data_packets / 100 + 100)) ] \
            || not_direct "the DERP relay forwarded $((derp1 - T_DERP0)) packets during the runs (about $data_packets tern data packets were sent): the data did not go direct"
    fi
    local changes=$(( $(peer_history_len c1 c2) - T_H1 + $(peer_history_len c2 c1) - T_H2 ))
    node_view c1 c2
    [ "$V_PATH" = direct ] || not_direct "after the iperf3 runs c1's path to c2 is '$V_PATH' ($V_REASON)"
    local ep=$V_EP
    node_view c2 c1
    [ "$V_PATH" = direct ] || not_direct "after the iperf3 runs c2's path to c1 is '$V_PATH' ($V_REASON)"
    local label="tern c1 -> c2, direct (TUN tern0 MTU 1280, $NAT1 x $NAT2 NAT)"
    if [ "$changes" != 0 ] || [ "$ep" != "$T_EP1" ] || [ "$V_EP" != "$T_EP2" ]; then
        log "WARNING: the direct path changed during the runs: c1 -> c2 $T_EP1 then $ep, c2 -> c1 $T_EP2 then $V_EP, $changes path changes"
        label+=" -- PATH CHANGED DURING THE RUNS (was $T_EP1)"
    fi
    [ "$NOT_DIRECT" = 1 ] && label="tern c1 -> c2, NOT DIRECT (BENCH_ALLOW_DERP=1)"
    summarize tern "$label" "c1 -> c2 via $ep (c2 -> c1 via $V_EP); path changes during the runs: $changes; $relayed; $(udp_drops tern); c2's socket buffers: $(udp_buffers c2 41641); ping ${T_RTT} ms"
}

# wireguard-go through the same NATs: c1 and c2 each run wireguard-go (port 51820) with the
# other's NAT public address as endpoint. The easy NATs keep the source port (masquerade
# persistent), so c1's 10.1.0.2:51820 is 198.18.1.2:51820 outside, and they filter by address and
# port. First contact order: c1 sends first (its handshake opens nat1's mapping towards
# 198.18.2.2:51820; nat2 drops it as unsolicited), then c2 sends; nat1 lets c2's handshake in as
# the reply of that mapping, and c1's answer goes out through nat2's fresh mapping for c2. Both
# directions are open from then on.
# The tunnel addresses are in 100.64.0.0/10 because tern never advertises local addresses of that
# range as endpoints: with any other range the two tern daemons find each other through
# wireguard-go's wg0 and move their direct path into it (seen with 10.77.0.0/24).
tput_wg_setup() {
    W_WAN1=$(jq -r '.nat_boxes[] | select(.nat == "nat1") | .wan_ip' "$WORK/lab.json")
    W_WAN2=$(jq -r '.nat_boxes[] | select(.nat == "nat2") | .wan_ip' "$WORK/lab.json")
    [ -n "$W_WAN1" ] && [ -n "$W_WAN2" ] || die "lab status lacks the NAT boxes' public addresses"
    # tern's firewall (like tailscaled's ts-input) drops 100.64.0.0/10 sources that do not come
    # in on its TUN, wireguard-go's tunnel addresses included: the tern nodes run without it
    # (`--netfilter-mode=off`) for the whole comparison, tern's own runs too.
    tern_cli c1 set --netfilter-mode=off
    tern_cli c2 set --netfilter-mode=off
    wg_keys w1 w2
    start_wg "$LAB-c1"; W_PID1=$WG_PID
    start_wg "$LAB-c2"; W_PID2=$WG_PID
    nsenter -t "$W_PID1" -m -n wg set wg0 private-key "$WORK/w1.key" listen-port "$WG_PORT" \
        peer "${WG_PUB[w2]}" allowed-ips 100.127.77.2/32 endpoint "$W_WAN2:$WG_PORT"
    nsenter -t "$W_PID2" -m -n wg set wg0 private-key "$WORK/w2.key" listen-port "$WG_PORT" \
        peer "${WG_PUB[w1]}" allowed-ips 100.127.77.1/32 endpoint "$W_WAN1:$WG_PORT"
    ip -n "$LAB-c1" addr add 100.127.77.1/24 dev wg0
    ip -n "$LAB-c2" addr add 100.127.77.2/24 dev wg0
    ip -n "$LAB-c1" link set wg0 up
    ip -n "$LAB-c2" link set wg0 up
    # First contact: c1 first (lost at nat2, but opens nat1), then c2 (passes nat1 as a reply).
    ip netns exec "$LAB-c1" ping -c 1 -W 1 100.127.77.2 >/dev/null 2>&1 || true
    ip netns exec "$LAB-c2" ping -c 3 -i 0.3 -W 3 100.127.77.1 >"$WORK/wg-first-contact.txt" 2>&1 \
        || { cat "$WORK/wg-first-contact.txt" >&2; die "wireguard-go: c2 cannot reach c1 through the NATs"; }
    W_RTT=$(rtt_ms "$LAB-c1" 100.127.77.2)
    [ -n "$W_RTT" ] || die "wireguard-go: c1 cannot reach c2 through the NATs"
    local mapping
    mapping=$(ip netns exec "$LAB-nat1" conntrack -L -p udp --orig-port-src "$WG_PORT" 2>/dev/null | head -1)
    log "wireguard-go through the NATs up; nat1 conntrack: $mapping"
    start_iperf_server "$LAB-c2" 100.127.77.2; W_IPERF=$IPERF_PID
    W_BUFFERS=$(udp_buffers c2 "$WG_PORT")
    local mtu label
    for mtu in $WG_MTUS; do
        label=wg
        [ ${#WG_LABELS[@]} -gt 0 ] && label="wg$mtu"
        WG_LABELS+=("$label=$mtu")
        : >"$WORK/$label.runs"
    done
}

tput_wg_run() {
    local spec mtu
    for spec in "${WG_LABELS[@]}"; do
        mtu=${spec#*=}
        ip -n "$LAB-c1" link set wg0 mtu "$mtu"
        ip -n "$LAB-c2" link set wg0 mtu "$mtu"
        BENCH_HOOK_PRE=udp_pre BENCH_HOOK_POST=udp_post \
            measure_one "$1" "${spec%%=*}" "$LAB-c1" 100.127.77.2 "wg-c1=$W_PID1" "wg-c2=$W_PID2"
    done
}

tput_wg_finish() {
    local spec
    kill "$W_IPERF" 2>/dev/null || true
    for spec in "${WG_LABELS[@]}"; do
        summarize "${spec%%=*}" "wireguard-go c1 -> c2 through nat1/nat2 (endpoints $W_WAN1:$WG_PORT, $W_WAN2:$WG_PORT; MTU ${spec#*=})" \
            "$(udp_drops "${spec%%=*}"); c2's socket buffers: $W_BUFFERS; ping ${W_RTT} ms"
    done
    kill "$W_PID1" "$W_PID2" 2>/dev/null || true
}

bench_tput() {
    local run
    has_part tput && tput_tern_setup
    has_part wg && tput_wg_setup
    for run in $(seq 1 "$RUNS"); do
        has_part tput && tput_tern_run "$run"
        has_part wg && tput_wg_run "$run"
    done
    has_part tput && tput_tern_finish
    has_part wg && tput_wg_finish
    return 0
}

# ---------- 2. time to direct ----------
C1_PID=""; C2_PID=""; S1_PID=""

# start_daemon NODE: `tern daemon` in NODE's namespace with its lab state dir and socket; prints
# nothing, sets DAEMON_PID once the LocalAPI answers.
start_daemon() {
    local node=$1 ns=${2:-$LAB-$1}
    ip netns exec "$ns" "$TERN" --socket "$(lab_dir)/$node.sock" daemon \
        --state-dir "$(lab_dir)/$node" --tun tern0 >>"$WORK/daemon-$node.log" 2>&1 &
    DAEMON_PID=$!
    STARTED_PIDS+=("$DAEMON_PID")
    for _ in $(seq 1 100); do
        tern_cli "$node" status --json >/dev/null 2>&1 && return
        kill -0 "$DAEMON_PID" 2>/dev/null || die "the $node daemon exited: $(tail -5 "$WORK/daemon-$node.log")"
        sleep 0.1
    done
    die "the $node daemon's LocalAPI did not answer in 10 s: $(tail -5 "$WORK/daemon-$node.log")"
}

# stop_daemon PID: SIGTERM, wait for it to go (SIGKILL after 5 s).
stop_daemon() {
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
usec() { echo "${1/./}"; }     # $EPOCHREALTIME -> microseconds

# poll_both: both daemons' `status --json` at once (two CLIs in parallel, one jq), into
# S1 P1 R1 K1 (c1: backend state, path to c2, its reason, whether c2 is in its peer list) and
# S2 P2 R2 K2 (c2's view of c1).
poll_both() {
    tern_cli c1 status --json >"$WORK/poll1.json" 2>/dev/null &
    local a=$!
    tern_cli c2 status --json >"$WORK/poll2.json" 2>/dev/null &
    local b=$!
    wait "$a" || : >"$WORK/poll1.json"
    wait "$b" || : >"$WORK/poll2.json"
    local out
    out=$(jq -rn --slurpfile x "$WORK/poll1.json" --slurpfile y "$WORK/poll2.json" '
        def view($s; $h): ([($s.peers // [])[] | select(.hostname == $h)] | first) as $p
            | [($s.backend_state // "down"), ($p.path // "none"), ($p.path_reason // "-"),
               (if $p == null then "no" else "yes" end)];
        view($x[0] // {}; "c2") + view($y[0] // {}; "c1") | join("\t")' 2>/dev/null) \
        || out=$'down\tnone\t-\tno\tdown\tnone\t-\tno'
    IFS=$'\t' read -r S1 P1 R1 K1 S2 P2 R2 K2 <<<"$out" || true
}

# one_ttd MODE RUN: restart both daemons, `tern up` both at t0, then ping c1 -> c2 through the TUN:
#   both-up  once both daemons are Running with the other in their peer list (the goal's case:
#            both nodes up, then traffic),
#   race     as soon as c1 has a route to c2, whether c2 is up yet or not.
# Polls both daemons every 50 ms until each says `path == "direct"` for the other. Appends
# "<tern up -> both direct> <both up -> both direct> <ping start -> both direct>" (seconds) to
# $WORK/ttd.MODE. A status read that says direct is timed when its answer is in (an upper bound;
# the resolution is the poll period, logged).
one_ttd() {
    local mode=$1 run=$2 ip2 t0 t t_up="" t_run1="" t_run2="" t_ping="" t_c1="" t_c2="" ping_pid=""
    local deadline polls=0 rest tag="$1 run $2"
    ip2=$(lab_tailnet_ip c2)
    ip netns exec "$LAB-nat1" conntrack -F >/dev/null 2>&1 || true
    ip netns exec "$LAB-nat2" conntrack -F >/dev/null 2>&1 || true
    start_daemon c1; C1_PID=$DAEMON_PID
    start_daemon c2; C2_PID=$DAEMON_PID
    t0=$EPOCHREALTIME
    tern_cli c1 up --login-server "$CONTROL_URL" --auth-key "file:$(lab_dir)/auth.key" --hostname c1 &
    local up1=$!
    tern_cli c2 up --login-server "$CONTROL_URL" --auth-key "file:$(lab_dir)/auth.key" --hostname c2 &
    local up2=$!
    wait "$up1" || die "tern up c1 failed"
    wait "$up2" || die "tern up c2 failed"
    deadline=$(( $(usec "$t0") + DIRECT_TIMEOUT * 1000000 ))
    while :; do
        local p0=$EPOCHREALTIME
        poll_both
        t=$EPOCHREALTIME
        polls=$((polls + 1))
        [ -z "$t_run1" ] && [ "$S1" = Running ] && t_run1=$t
        [ -z "$t_run2" ] && [ "$S2" = Running ] && t_run2=$t
        [ -z "$t_up" ] && [ "$S1" = Running ] && [ "$S2" = Running ] && [ "$K1" = yes ] && [ "$K2" = yes ] && t_up=$t
        # Start (or restart: ping exits at once without a route) the traffic through the TUN.
        local go=0
        case $mode in
            both-up) [ -n "$t_up" ] && go=1 ;;
            race) [ "$S1" = Running ] && go=1 ;;
        esac
        if [ "$go" = 1 ] && { [ -z "$ping_pid" ] || ! kill -0 "$ping_pid" 2>/dev/null; } \
            && ip -n "$LAB-c1" route get "$ip2" 2>/dev/null | grep -q tern0; then
            ip netns exec "$LAB-c1" ping -D -i 0.2 -W 1 "$ip2" >>"$WORK/ttd-ping-$mode-$run.txt" 2>&1 &
            ping_pid=$!
            STARTED_PIDS+=("$ping_pid")
            [ -z "$t_ping" ] && t_ping=$t
        fi
        [ -z "$t_c1" ] && [ "$P1" = direct ] && t_c1=$t
        [ -z "$t_c2" ] && [ "$P2" = direct ] && t_c2=$t
        [ -n "$t_c1" ] && [ -n "$t_c2" ] && break
        if [ "$(usec "$t")" -ge "$deadline" ]; then
            not_direct "$tag: no direct path ${DIRECT_TIMEOUT} s after \`tern up\`: c1 sees c2 as '$P1' ($R1), c2 sees c1 as '$P2' ($R2)"
            break
        fi
        # One poll every 50 ms: sleep what is left of it.
        rest=$(( 50000 - ($(usec "$EPOCHREALTIME") - $(usec "$p0")) ))
        [ "$rest" -gt 0 ] && sleep "$(printf '0.%06d' "$rest")"
    done
    [ -n "$ping_pid" ] && kill "$ping_pid" 2>/dev/null
    local t_end=$EPOCHREALTIME
    since() { if [ -n "$1" ]; then elapsed "$t0" "$1"; else echo never; fi; }
    log "$tag: c1 Running after $(since "$t_run1") s, c2 after $(since "$t_run2") s, both up (Running, each other as peer) after $(since "$t_up") s, ping started after $(since "$t_ping") s; $polls polls of both daemons, one every $(( ($(usec "$t_end") - $(usec "$t0")) / (polls * 1000) )) ms"
    # When the first echo reply came back through the TUN (over DERP or direct), from ping -D.
    local first_reply
    first_reply=$(awk -F'[][]' '/bytes from/ { print $2; exit }' "$WORK/ttd-ping-$mode-$run.txt" 2>/dev/null)
    log "$tag: first ping reply through the TUN after $(since "$first_reply") s"
    # How each side got there (path_history: path/reason, oldest first).
    log "$tag: c1's path history for c2: $(history_line c1 c2); c2's for c1: $(history_line c2 c1)"
    if [ -n "$t_c1" ] && [ -n "$t_c2" ]; then
        local both
        both=$(awk -v a="$t_c1" -v b="$t_c2" 'BEGIN { print (a > b ? a : b) }')
        printf '%s %s %s\n' "$(elapsed "$t0" "$both")" "$(elapsed "$t_up" "$both")" "$(elapsed "$t_ping" "$both")" >>"$WORK/ttd.$mode"
        log "$tag: both direct $(elapsed "$t0" "$both") s after \`tern up\`, $(elapsed "$t_up" "$both") s after both were up, $(elapsed "$t_ping" "$both") s after the ping started (c1 alone: $(elapsed "$t0" "$t_c1") s after \`tern up\`)"
    else
        printf 'timeout timeout timeout\n' >>"$WORK/ttd.$mode"
    fi
}

bench_ttd() {
    # Take the lab's daemons over: `tern down` (stored prefs then say "not running", so a restarted
    # daemon waits for `tern up`) and stop them; the state dirs (node keys) stay.
    local mode run node pid first=1
    for node in c1 c2; do
        tern_cli "$node" down >/dev/null
    done
    for pid in "$(lab_pid tern:c1)" "$(lab_pid tern:c2)"; do stop_daemon "$pid"; done
    for mode in $TTD_MODES; do
        : >"$WORK/ttd.$mode"
        for run in $(seq 1 "$TTD_RUNS"); do
            if [ "$first" = 0 ]; then
                tern_cli c1 down >/dev/null; tern_cli c2 down >/dev/null
                stop_daemon "$C1_PID"; stop_daemon "$C2_PID"
            fi
            first=0
            one_ttd "$mode" "$run"
        done
    done
}

# ttd_summary MODE COLUMN WHAT: the runs of one mode and the median of COLUMN (1-based) of
# $WORK/ttd.MODE, against the goal.
ttd_summary() {
    local mode=$1 col=$2 what=$3 f="$WORK/ttd.$1"
    echo "$mode ($what):"
    awk '{ printf "  run %d: %s s after `tern up`, %s s after both were up, %s s after the ping started\n", NR, $1, $2, $3 }' "$f"
    if grep -q timeout "$f"; then
        echo "  median: n/a (a run did not reach a direct path)"
        return
    fi
    awk -v c="$col" '{ print $c }' "$f" | sort -g | awk -v n="$(wc -l <"$f")" '{ v[NR] = $1; if ($1 > 2) slow++ }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
              printf "  median **%.2f s** (min %.2f s, max %.2f s; %d of %d runs over 2 s); goal <= 2 s: %s\n",
                  m, v[1], v[NR], slow, n, (m <= 2 ? "met" : "NOT met") }'
}

# ---------- 3. RSS with 2 peers ----------
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.2f", k / 1024 }'; }

bench_rss() {
    [ -n "$C1_PID" ] || C1_PID=$(lab_pid tern:c1)
    [ -n "$C2_PID" ] || C2_PID=$(lab_pid tern:c2)
    mkdir -p "$(lab_dir)/s1"
    start_daemon s1 "$LAB-server"; S1_PID=$DAEMON_PID
    tern_cli s1 up --login-server "$CONTROL_URL" --auth-key "file:$(lab_dir)/auth.key" --hostname s1
    local n ip_s1="" ip2
    ip2=$(lab_tailnet_ip c2)
    for _ in $(seq 1 300); do
        n=$(tern_cli c1 status --json | jq '[.peers[] | select(.hostname == "c2" or .hostname == "s1")] | length')
        ip_s1=$(tern_cli s1 status --json | jq -r '[(.self.tailnet_ips // [])[] | select(contains(":") | not)] | first // empty')
        [ "$n" = 2 ] && [ -n "$ip_s1" ] && break
        sleep 0.1
    done
    [ "$n" = 2 ] && [ -n "$ip_s1" ] || die "c1 does not see both c2 and s1 as peers after 30 s"
    ip_s1=${ip_s1%/*}
    log "third node s1 in $LAB-server, tailnet IP $ip_s1; c1 has 2 peers"
    require_direct c1 s1 "$ip_s1"
    require_direct c1 c2 "$ip2"
    local npeers
    npeers=$(tern_cli c1 status --json | jq '.peers | length')
    sleep 5
    local idle idle_c2 idle_s1
    idle=$(rss_kib "$C1_PID"); idle_c2=$(rss_kib "$C2_PID"); idle_s1=$(rss_kib "$S1_PID")
    log "RSS idle: c1 $(mib "$idle") MiB, c2 $(mib "$idle_c2") MiB, s1 $(mib "$idle_s1") MiB"
    # Traffic to both peers at once: iperf3 c1 -> c2 and c1 -> s1 in parallel, RSS sampled each second.
    start_iperf_server "$LAB-c2" "$ip2"; local srv2=$IPERF_PID
    start_iperf_server "$LAB-server" "$ip_s1"; local srv3=$IPERF_PID
    ip netns exec "$LAB-c1" iperf3 -c "$ip2" -t "$SECONDS_PER_RUN" -J >"$WORK/rss-c2.json" &
    local cl2=$!
    ip netns exec "$LAB-c1" iperf3 -c "$ip_s1" -t "$SECONDS_PER_RUN" -J >"$WORK/rss-s1.json" &
    local cl3=$!
    STARTED_PIDS+=("$cl2" "$cl3")
    local peak=0 r
    while kill -0 "$cl2" 2>/dev/null || kill -0 "$cl3" 2>/dev/null; do
        r=$(rss_kib "$C1_PID"); [ "$r" -gt "$peak" ] && peak=$r
        sleep 1
    done
    wait "$cl2" || die "iperf3 c1 -> c2 failed"
    wait "$cl3" || die "iperf3 c1 -> s1 failed"
    kill "$srv2" "$srv3" 2>/dev/null || true
    local g2 g3
    g2=$(jq -r '.end.sum_received.bits_per_second / 1e9' "$WORK/rss-c2.json")
    g3=$(jq -r '.end.sum_received.bits_per_second / 1e9' "$WORK/rss-s1.json")
    local after after_c2 after_s1 hwm later
    after=$(rss_kib "$C1_PID"); after_c2=$(rss_kib "$C2_PID"); after_s1=$(rss_kib "$S1_PID")
    hwm=$(hwm_kib "$C1_PID")
    sleep 10
    later=$(rss_kib "$C1_PID")
    local p2 p3
    node_view c1 c2; p2=$V_PATH
    node_view c1 s1; p3=$V_PATH
    {
        echo "| daemon | peers | VmRSS idle | VmRSS during traffic (max of 1 s samples) | VmRSS right after | 10 s later | VmHWM |"
        echo "|---|---|---|---|---|---|---|"
        echo "| c1 (traffic to both peers) | $npeers | $(mib "$idle") MiB | $(mib "$peak") MiB | $(mib "$after") MiB | $(mib "$later") MiB | $(mib "$hwm") MiB |"
        echo "| c2 | 2 | $(mib "$idle_c2") MiB | | $(mib "$after_c2") MiB | | $(mib "$(hwm_kib "$C2_PID")") MiB |"
        echo "| s1 (server, no NAT) | 2 | $(mib "$idle_s1") MiB | | $(mib "$after_s1") MiB | | $(mib "$(hwm_kib "$S1_PID")") MiB |"
        echo
        printf 'traffic: iperf3 c1 -> c2 %.3f Gbit/s (path %s) and c1 -> s1 %.3f Gbit/s (path %s) at the same time, %s s\n' \
            "$g2" "$p2" "$g3" "$p3" "$SECONDS_PER_RUN"
    } >"$WORK/rss.md"
}

# ---------- run ----------
build_tern
install_tools
BACKGROUND=$(busy_percent 3)
log "machine busy before the runs: ${BACKGROUND}%"
NAT1=${BENCH_NAT1:-easy}
NAT2=${BENCH_NAT2:-easy}
lab_up "$NAT1" "$NAT2"
{ has_part tput || has_part wg; } && bench_tput
has_part ttd && bench_ttd
has_part rss && bench_rss

echo
echo "# tern direct paths, $(machine_line)"
echo "# lab: nat1 $NAT1, nat2 $NAT2; machine busy ${BACKGROUND}% in the 3 s before the runs (other load)"
if has_part tput || has_part wg; then
    echo "# iperf3 TCP, $RUNS x ${SECONDS_PER_RUN}s; CPU = mean over runs; process % of one core, machine % of all $NCPU cores"
    echo
    print_table
    tern_med=$(median_of tern)
    [ -n "$tern_med" ] && [ ${#WG_LABELS[@]} -gt 0 ] && echo
    if [ -n "$tern_med" ]; then
        echo "daemon CPU per Gbit/s (both ends, median of runs): tern $(cores_per_gbit tern | awk '{ printf "%.2f", $1 }') cores$(
            for spec in "${WG_LABELS[@]}"; do
                printf ', wireguard-go MTU %s %.2f cores' "${spec#*=}" "$(cores_per_gbit "${spec%%=*}")"
            done)"
    fi
    for spec in "${WG_LABELS[@]}"; do
        wg_med=$(median_of "${spec%%=*}")
        [ -n "$tern_med" ] && [ -n "$wg_med" ] || continue
        awk -v t="$tern_med" -v w="$wg_med" -v m="${spec#*=}" -v nd="$NOT_DIRECT" 'BEGIN { r = t / w
            printf "ratio tern-direct / wireguard-go MTU %s (same NATs) = %.3f / %.3f = **%.2f** (issue 15 goal >= 8: %s)%s\n",
                m, t, w, r, (r >= 8.0 ? "met" : "NOT met"), (nd == 1 ? " -- INVALID: tern was NOT on a direct path" : "") }'
    done
fi
if has_part ttd; then
    echo
    echo "time to direct ($NAT1 x $NAT2), daemons restarted and \`tern up\` on both each run; polls every 50 ms:"
    for mode in $TTD_MODES; do
        case $mode in
            both-up) ttd_summary both-up 2 "ping c1 -> c2 once both are Running with each other as peer; median from then" ;;
            race) ttd_summary race 1 "ping c1 -> c2 as soon as c1 has a route, c2 maybe not up yet; median from \`tern up\`" ;;
        esac
    done
fi
if has_part rss && [ -f "$WORK/rss.md" ]; then
    echo
    echo "daemon RSS (VmRSS from /proc/PID/status):"
    echo
    cat "$WORK/rss.md"
fi
if [ "$NOT_DIRECT" = 1 ]; then
    echo
    echo "NOT DIRECT: some path stayed on DERP (BENCH_ALLOW_DERP=1); these are not direct-path figures."
    exit 3
fi
