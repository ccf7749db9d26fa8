#!/usr/bin/env bash
# Which functions does the daemon run? Writes link/hot.ld, the list that release builds link first.
#
#   sudo bench/hot_code.sh         # from the repository root; then rebuild (cargo build --release)
#
# The daemon's resident memory is mostly its own code: the kernel maps the whole 64 KiB around
# every page of code that runs, and with the functions a daemon runs spread over the binary
# nearly all of it ends up mapped (bench/README.md, "Issue 15, fifth round"). This script runs two
# labs with 100 peers each, every daemon under valgrind's callgrind (TERN_LAB_DAEMON_WRAPPER): an
# easy one (direct paths), and hard NATs with a peer relay node (relay client and server). In
# each, c1 does what the memory bench and a user do: waits for the netmap, asks for status (text
# and JSON), `ip`, `metrics`, `netcheck`, `tern ping` and kernel ping to c2, iperf3 both ways
# through the TUNs, then idles. Every function a daemon ran goes into link/hot.ld by mangled name.
# The names hold a hash of the build's metadata (toolchain, dependency versions, features) and of
# the function's type, not of its code: most edits keep them; a toolchain or dependency update
# changes them, and so can a change to a type (a new field in the engine renamed 70 of its
# functions) (bench/memory.sh prints how many of the list the binary defines). A stale list costs
# memory, never correctness: the functions not in it are linked after the listed ones. Rerun it
# after large changes and after a toolchain or dependency update. Needs valgrind (apt-get
# installs it when missing); takes about 6 minutes.
# Env: BENCH_SKIP_BUILD=1, BENCH_TERN (binary), HOT_IDLE_SECONDS (default 60).
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init thc
IDLE_SECONDS=${HOT_IDLE_SECONDS:-60}
build_tern
install_tools
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >&2

c1() { ip netns exec "$LAB-c1" "$TERN" --socket "$(lab_dir)/c1.sock" "$@"; }

# profile_lab ARGS…: a lab (`tern lab up --synthetic-peers 99 ARGS…`) with every daemon under
# callgrind; c1 does what a user does; the daemons stop, each leaving $WORK/callgrind.out.<pid>.
profile_lab() {
    log "tern lab up --synthetic-peers 99 $* (prefix $LAB), the daemons under callgrind"
    LAB_UP=1
    TERN_LAB_DAEMON_WRAPPER="valgrind --tool=callgrind --demangle=no --callgrind-out-file=$WORK/callgrind.out.%p" \
        TERN_LAB_PREFIX="$LAB" "$TERN" lab up --synthetic-peers 99 "$@" >"$WORK/lab-up.log" 2>&1 \
        || { cat "$WORK/lab-up.log" >&2; die "tern lab up failed"; }
    TERN_LAB_PREFIX="$LAB" "$TERN" lab status --json >"$WORK/lab.json"
    local ip2 n want daemons pid
    ip2=$(lab_tailnet_ip c2)
    want=$(jq '.tern_nodes | length + 98' "$WORK/lab.json")
    for _ in $(seq 1 360); do
        n=$(c1 status --json 2>/dev/null | jq '.peers | length' 2>/dev/null || echo 0)
        [ "$n" = "$want" ] && break
        sleep 0.5
    done
    [ "$n" = "$want" ] || die "c1 under valgrind lists $n peers, not $want"

    log "status, ip, metrics, netcheck, ping, iperf3 both ways, ${IDLE_SECONDS} s idle"
    for _ in 1 2 3; do c1 status >/dev/null; c1 status --json >/dev/null; done
    c1 ip >/dev/null
    c1 metrics >/dev/null
    c1 netcheck >/dev/null || log "netcheck failed (ignored)"
    c1 ping -c 3 "$ip2" >/dev/null || log "tern ping failed (ignored)"
    ip netns exec "$LAB-c1" ping -c 10 -i 0.2 "$ip2" >/dev/null
    start_iperf_server "$LAB-c2" "$ip2"
    ip netns exec "$LAB-c1" iperf3 -c "$ip2" -t 3 >/dev/null
    ip netns exec "$LAB-c1" iperf3 -c "$ip2" -t 3 -R >/dev/null
    kill "$IPERF_PID" 2>/dev/null || true
    sleep "$IDLE_SECONDS"
    for _ in 1 2 3; do c1 status --json >/dev/null; done

    daemons=$(jq -r '.processes[] | select(.name | startswith("tern:")) | .pid' "$WORK/lab.json")
    for pid in $daemons; do kill "$pid"; done
    for pid in $daemons; do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        [ -s "$WORK/callgrind.out.$pid" ] || die "callgrind wrote nothing for daemon $pid (see $(lab_dir)/*.log)"
    done
    lab_down
}

# An easy lab (direct paths), then hard NATs with a peer relay node (relay client and server).
profile_lab
profile_lab --nat1 hard --nat2 hard --relay

# The functions that ran (callgrind names each once, in the first "fn=(id) name" or "cfn=(id) name"
# line that mentions it: as the function that ran or as one that was called), kept when the
# binary defines them. Exact names go first (.text.hot): with the hash left open, every
# instantiation of a generic function that ran would come along (5.1 MiB of code instead of
# 3.1 MiB). The same names with their hashes left open follow (.text.warm), so that a build whose
# hashes differ (another toolchain, target or dependency version) still gets most of the order.
out="$ROOT/link/hot.ld"
nm --defined-only "$TERN" | awk '$2 ~ /^[tT]$/ { print $3 }' | sort -u >"$WORK/defined"
cat "$WORK"/callgrind.out.* | sed -n 's/^c\{0,1\}fn=([0-9]*) \(.*\)$/\1/p' | sort -u >"$WORK/ran"
comm -12 "$WORK/defined" "$WORK/ran" >"$WORK/hot"
# Legacy names end in "17h<16 hex digits>E"; v0 names (the standard library's) hold crates as
# "Cs<disambiguator>_".
sed -E 's/17h[0-9a-f]{16}E$/17h*E/; s/Cs[0-9A-Za-z]+_/Cs*_/g' "$WORK/hot" | grep -F '*' | sort -u >"$WORK/warm"
{
    echo "/* Generated by bench/hot_code.sh on $(date -u '+%Y-%m-%d') from $(git -C "$ROOT" rev-parse --short HEAD) ($(rustc --version)):"
    echo " * the $(wc -l <"$WORK/hot") functions the lab's daemons ran, with 100 peers. Release builds link them"
    echo " * first (build.rs), so the code a daemon runs shares as few 64 KiB windows as it can. */"
    echo "SECTIONS"
    echo "{"
    echo "  .text.hot :"
    echo "  {"
    echo "    *("
    # LLVM puts a function marked cold (#[cold]) in .text.unlikely.<name>.
    sed 's/^.*$/      .text.& .text.unlikely.&/' "$WORK/hot"
    echo "    )"
    echo "  }"
    echo "  .text.warm :"
    echo "  {"
    echo "    *("
    sed 's/^.*$/      .text.& .text.unlikely.&/' "$WORK/warm"
    echo "    )"
    echo "  }"
    echo "}"
    echo "INSERT BEFORE .text;"
} >"$out"
log "wrote $out: $(wc -l <"$WORK/hot") functions, $(wc -l <"$WORK/warm") patterns for other builds"
