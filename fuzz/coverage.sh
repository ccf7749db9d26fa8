#!/bin/sh
# Names the handler functions a target's corpus reaches, with hit counts, on run.sh's -s none
# build (no rebuild). gdb puts a breakpoint on the first body line of each function, and on a
# few lines that show a handler did its job (a Challenge sent, a leg bound, a Pong queued…), at
# every place the code was inlined; the target runs corpus/, seeds/ and regressions/ once
# (-runs=0); gdb reports the hits and the function it resolves at each breakpoint (inlined
# ones included), and addr2line the chain of functions it was inlined through.
# "?" where gdb names no function at the address (addr2line still gives the chain).
# libFuzzer's -print_coverage prints nothing in this build (no sanitizer runtime to symbolize),
# and most handlers are inlined into handle_packet / handle_disco.
#
# Usage: fuzz/coverage.sh TARGET          (TARGET: relay_packet or disco_parse)
# Needs gdb and addr2line. Writes logs/TARGET.gdb (the gdb script) and logs/TARGET.gdb.log.
set -eu
[ $# -eq 1 ] || { sed -n 11,12p "$0"; exit 2; }
cd "$(dirname "$0")"
t=$1
# One breakpoint per line: FUNCTION (its first body line) or FUNCTION|TEXT (the first line in
# FUNCTION containing TEXT).
case $t in
  relay_packet)
    srcs="src/relay/server.rs"
    specs="handle_packet
classify
handle_control
on_bind
on_bind|let sealed = disco::seal_with
on_answer
on_answer|leg.bound = Some(from)
forward
forward|leg.last_seen = Some(now)
maybe_rotate_mac
maybe_rotate_mac|self.mac.previous = Some
allocate
new_endpoint
expire" ;;
  disco_parse)
    srcs="src/paths/table.rs src/paths.rs"
    specs="set_peers
handle_udp
handle_derp
open
deliver
handle_disco
handle_disco|self.handle_ping(now, from, ping)
handle_ping|self.transmits.push_back(Transmit {
handle_ping|self.attribute(src)
handle_disco|self.handle_pong(now, from, pong)
handle_pong
handle_pong|self.best = Some(candidate)
handle_disco|self.handle_call_me_maybe(now, &eps)
handle_call_me_maybe|self.drop_sourceless(now)
handle_call_me_maybe|self.send_disco_pings(now
handle_disco|self.handle_relay_alloc_request(from, request)
handle_relay_alloc_request|Event::RelayAllocRequest
handle_timeout
on_outgoing
cli_ping
send_via_derp
set_local" ;;
  *) echo "coverage.sh: no function list for $t" >&2; exit 2 ;;
esac
bin="target/$(rustc -vV | sed -n 's/^host: //p')/release/$t"
[ -x "$bin" ] || { echo "coverage.sh: build first (fuzz/run.sh builds $bin)" >&2; exit 2; }
mkdir -p logs "corpus/$t"
gdbs="logs/$t.gdb"
{
  echo "set pagination off"
  echo "set confirm off"
  n=0
  echo "$specs" | while IFS= read -r spec; do
    f=${spec%%|*}
    text=; case $spec in *"|"*) text=${spec#*|} ;; esac
    for s in $srcs; do
      line=$(awk -v f="$f" -v text="$text" '
        !sig && $0 ~ "fn " f "[(<]" { sig = 1 }
        sig && !body && /\{ *$/ { body = NR + 1; if (text == "") { print body; exit } ; next }
        body && index($0, text) { print NR; exit }' "../$s")
      if [ -n "$line" ]; then
        echo "# $spec"
        echo "break $s:$line"
        break
      fi
    done
  done
} >"$gdbs"
n=$(grep -c '^break ' "$gdbs")
{
  echo "commands 1-$n"
  echo "silent"
  echo "continue"
  echo "end"
  echo "run corpus/$t seeds/$t regressions/$t -runs=0"
  echo "info breakpoints"
} >>"$gdbs"
gdb -batch -x "$gdbs" "$bin" >"$gdbs.log" 2>&1
# gdb runs the binary without ASLR: PIE base 0x555555554000.
# Per breakpoint: gdb's first location (address, function, line: gdb moves a breakpoint to the
# next line with code, so the line is gdb's) and its hits.
printf '%-45s %-24s %9s  %s\n' "breakpoint (function|line text)" "line (gdb)" "hits" \
  "function there (gdb) < inlined into (addr2line)"
awk '/breakpoint already hit/ { h[n] = $4; next }
  /^[0-9]+(\.[0-9]+)? / {
    n = $1; sub(/\..*/, "", n)
    if (!(n in addr) && / 0x[0-9a-f]+ /) {
      for (j = 1; j <= NF; j++) if ($j ~ /^0x/) addr[n] = $j
      fn[n] = "?"; if (/ in .* at /) { fn[n] = $0; sub(/.* in /, "", fn[n]); sub(/ at .*/, "", fn[n]) }
      at[n] = $NF
    }
  }
  END { for (i = 1; i in addr; i++) print i, addr[i], fn[i], at[i], h[i] + 0 }' "$gdbs.log" |
while read -r i addr fn at hits; do
  spec=$(sed -n '/^# /p' "$gdbs" | sed -n "${i}p" | cut -c3-)
  off=$(printf '0x%x' $((addr - 0x555555554000)))
  frames=$(addr2line -f -i -C -e "$bin" "$off" | paste - - | awk '{ print $1 }')
  [ "$fn" = "?" ] && fn=$(echo "$frames" | head -1 | sed 's/.*::\([^:]*\)$/\1/')
  chain=$(echo "$frames" | sed 1d | paste -sd'<' - | cut -c1-80)
  printf '%-45s %-24s %9d  %s\n' "$spec" "$at" "$hits" "$fn${chain:+ < $chain}"
done
grep -E '^(Done|#[0-9]+[[:space:]]+INITED)' "$gdbs.log" || true
