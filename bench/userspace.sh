#!/usr/bin/env bash
# Userspace networking throughput vs the TUN, in one lab (`tern lab up`, release build):
# a second tern daemon in c1 runs `--tun userspace-networking` with a SOCKS5 proxy; an HTTP
# server on c2's tailnet address serves a file from tmpfs; curl in c1 downloads it, in turns,
# (a) through the kernel TUN of the lab's c1 daemon and (b) through the userspace daemon's
# SOCKS5 proxy. BENCH_RUNS x one download of BENCH_MB MiB each, median MiB/s; also the
# userspace daemon's RSS idle and after the runs.
# Usage (root): bench/userspace.sh   (BENCH_SKIP_BUILD=1 to reuse target/release/tern)
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init tbu
MB=${BENCH_MB:-512}

build_tern
command -v jq >/dev/null || die "jq missing (apt-get install jq)"
command -v curl >/dev/null || die "curl missing"
lab_up easy easy
C2=$(lab_tailnet_ip c2)
KEY=$(cat "$(lab_dir)/auth.key")

# The file and its server on c2's tailnet address.
mkdir -p "$WORK/www"
head -c "$((MB * 1024 * 1024))" /dev/zero >"$WORK/www/big"
ip netns exec "$LAB-c2" python3 -m http.server 8000 --bind "$C2" --directory "$WORK/www" \
    >"$WORK/http.log" 2>&1 &
STARTED_PIDS+=("$!")

# The userspace daemon in c1.
U="$WORK/u1"
mkdir -p "$U"
ip netns exec "$LAB-c1" "$TERN" daemon --tun userspace-networking --port 41700 \
    --state-dir "$U/state" --socket "$U/tern.sock" --socks5-server 127.0.0.1:1080 \
    >"$WORK/u1.log" 2>&1 &
UPID=$!
STARTED_PIDS+=("$UPID")
for _ in $(seq 1 50); do [ -S "$U/tern.sock" ] && break; sleep 0.1; done
"$TERN" --socket "$U/tern.sock" up --login-server http://10.99.0.20:8080 --auth-key "$KEY" \
    --hostname u1 >/dev/null
for _ in $(seq 1 100); do
    ip netns exec "$LAB-c1" curl -s --max-time 2 --socks5-hostname 127.0.0.1:1080 \
        -o /dev/null "http://$C2:8000/" && break
    sleep 0.3
done
rss_idle=$(awk '/^VmRSS/ { print $2 }' "/proc/$UPID/status")

# One download; prints MiB/s.
download() {
    local speed
    speed=$(ip netns exec "$LAB-c1" curl -s --max-time 120 -o /dev/null -w '%{speed_download}' "$@" \
        "http://$C2:8000/big")
    awk -v s="$speed" 'BEGIN { printf "%.1f\n", s / 1048576 }'
}

: >"$WORK/tun" ; : >"$WORK/socks"
for run in $(seq 1 "$RUNS"); do
    t=$(download); echo "$t" >>"$WORK/tun"
    s=$(download --socks5-hostname 127.0.0.1:1080); echo "$s" >>"$WORK/socks"
    log "run $run: TUN $t MiB/s, SOCKS5 (userspace) $s MiB/s"
done
rss_after=$(awk '/^VmRSS/ { print $2 }' "/proc/$UPID/status")
# Proof that the SOCKS5 downloads went through u1's userspace stack (not the host's routes).
through_stack=$("$TERN" --socket "$U/tern.sock" status --json | jq '.data_plane.netstack.tcp_outbound')
tun=$(median <"$WORK/tun")
socks=$(median <"$WORK/socks")

echo
echo "Userspace networking vs TUN, $(machine_line); curl download of $MB MiB from c2, $RUNS runs, median"
echo
echo "| path | MiB/s | Mbit/s |"
echo "|---|---:|---:|"
awk -v v="$tun" 'BEGIN { printf "| c1 TUN (kernel, tern c1) | %.1f | %.0f |\n", v, v * 8.388608 }'
awk -v v="$socks" 'BEGIN { printf "| c1 SOCKS5 -> userspace stack (tern u1) | %.1f | %.0f |\n", v, v * 8.388608 }'
echo
awk -v t="$tun" -v s="$socks" 'BEGIN { printf "SOCKS5 userspace / TUN = %.0f %%\n", 100 * s / t }'
echo "connections u1's userspace stack opened to c2: $through_stack (one per SOCKS5 download and probe)"
echo "userspace daemon RSS: ${rss_idle} KiB idle (netstack up, no connection), ${rss_after} KiB after the runs"
