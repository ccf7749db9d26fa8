#!/usr/bin/env bash
# Builds tern's Debian package from an already built binary (no rebuild here):
#
#   packaging/build-deb.sh [--binary PATH] [--arch amd64|arm64] [--out DIR] [--gen-with PATH]
#
#   --binary    the tern binary to ship (default target/release/tern)
#   --arch      the package architecture (default: the host's, from dpkg); must match the binary
#   --out       where the .deb goes (default target/deb)
#   --gen-with  the tern binary that generates the manual pages and completions (default: the
#               shipped one; give a host build when the shipped one cannot run here, e.g. an
#               arm64 cross build: the pages come from the same clap tree if it is the same source)
#
# Prints the path of the .deb. Needs dpkg-deb, gzip and readelf (binutils).
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."

die() {
  echo "build-deb.sh: $*" >&2
  exit 1
}

binary=target/release/tern
arch=""
out=target/deb
gen_with=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --binary=*) binary=${1#*=}; shift ;;
    --arch) arch=${2:?--arch needs amd64 or arm64}; shift 2 ;;
    --arch=*) arch=${1#*=}; shift ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --gen-with) gen_with=${2:?--gen-with needs a path}; shift 2 ;;
    --gen-with=*) gen_with=${1#*=}; shift ;;
    -h|--help) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

for tool in dpkg-deb gzip readelf; do
  command -v "$tool" >/dev/null || die "$tool not found (packages dpkg, gzip, binutils)"
done
[ -f "$binary" ] && [ -x "$binary" ] || die "no executable binary at '$binary' (cargo build --release first?)"
[ -n "$arch" ] || arch=$(dpkg --print-architecture)
gen_with=${gen_with:-$binary}

# The ELF machine field must agree with --arch: a mislabelled package installs and then fails.
case "$arch" in
  amd64) want_machine="Advanced Micro Devices X86-64" ;;
  arm64) want_machine="AArch64" ;;
  *) die "unsupported --arch '$arch' (amd64 or arm64)" ;;
esac
machine=$(LC_ALL=C readelf -h "$binary" | sed -n 's/^ *Machine: *//p')
[ "$machine" = "$want_machine" ] || die "'$binary' is built for '$machine', not $arch"

version=$(sed -n '/^\[package\]/,/^\[/ s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || die "no [package] version in Cargo.toml"

# Shared libraries the binary links → Debian packages (a Rust binary needs only these two).
libs=$(LC_ALL=C readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
glibc=$(LC_ALL=C readelf --dyn-syms -W "$binary" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' \
  | sed 's/GLIBC_//' | sort -uV | tail -n1 || true)
# Packed relative relocations (build.rs, release builds) need glibc 2.36: a version need that no
# symbol carries, so --dyn-syms does not show it.
if LC_ALL=C readelf -V -W "$binary" | grep 'GLIBC_ABI_DT_RELR' >/dev/null; then
  glibc=$(printf '%s\n2.36\n' "$glibc" | sort -uV | tail -n1)
fi
depends="iproute2"
for lib in $libs; do
  case "$lib" in
    libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|ld-linux-*.so.*) ;;
    libgcc_s.so.1) case "$depends" in *libgcc-s1*) ;; *) depends="libgcc-s1, $depends" ;; esac ;;
    *) die "'$binary' links $lib: add its package to Depends in $0" ;;
  esac
done
if [ -n "$glibc" ]; then
  depends="libc6 (>= $glibc), $depends"
fi

stage=$(mktemp -d)
gen=$(mktemp -d)
trap 'rm -rf "$stage" "$gen"' EXIT
root=$stage/root
mkdir -p "$root/DEBIAN"

# Generate first: a --gen-with binary that cannot run here fails before anything is assembled.
"$gen_with" gen-man --out-dir "$gen/man" >/dev/null \
  || die "'$gen_with' could not generate the manual pages (a cross build? pass --gen-with a host build)"
for shell in bash zsh fish; do
  "$gen_with" completion "$shell" >"$gen/completion.$shell" || die "'$gen_with' completion $shell failed"
done

install -D -m 0755 "$binary" "$root/usr/bin/tern"
# Shipped stripped, as Debian's dh_strip does (debug info is for developers' builds): the
# host's strip for the host's architecture, the cross binutils' for arm64 when installed.
case "$arch" in
  "$(dpkg --print-architecture)") strip_tool=strip ;;
  arm64) strip_tool=aarch64-linux-gnu-strip ;;
  *) strip_tool= ;;
esac
if [ -n "$strip_tool" ] && command -v "$strip_tool" >/dev/null; then
  "$strip_tool" --strip-unneeded "$root/usr/bin/tern"
else
  echo "build-deb: no strip for $arch ($strip_tool): shipping the binary unstripped" >&2
fi
install -D -m 0644 packaging/tern.service "$root/lib/systemd/system/tern.service"
install -D -m 0644 packaging/tern-relay.service "$root/lib/systemd/system/tern-relay.service"
install -D -m 0644 packaging/tern.tmpfiles "$root/usr/lib/tmpfiles.d/tern.conf"
install -D -m 0644 packaging/default.tern "$root/etc/default/tern"
install -D -m 0644 packaging/default.tern-relay "$root/etc/default/tern-relay"
install -D -m 0644 "$gen/completion.bash" "$root/usr/share/bash-completion/completions/tern"
install -D -m 0644 "$gen/completion.zsh" "$root/usr/share/zsh/vendor-completions/_tern"
install -D -m 0644 "$gen/completion.fish" "$root/usr/share/fish/vendor_completions.d/tern.fish"

# Manual pages: the hand-written overview plus one generated page per command, gzip -n (no
# timestamp) as Debian policy asks.
install -D -m 0644 man/tern.1 "$root/usr/share/man/man1/tern.1"
for page in "$gen"/man/*.[18]; do
  section=${page##*.}
  install -D -m 0644 "$page" "$root/usr/share/man/man$section/$(basename "$page")"
done
gzip -9n "$root"/usr/share/man/man*/*.[18]

install -d -m 0755 "$root/usr/share/doc/tern"
cat >"$root/usr/share/doc/tern/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tern
Comment: tern is statically linked with Rust crates under their own licenses (MIT,
 Apache-2.0, BSD, ISC and similar; see Cargo.lock in the source for the list).

Files: *
Copyright: the tern authors
License: BSD-3-Clause

License: BSD-3-Clause
 Redistribution and use in source and binary forms, with or without modification, are
 permitted provided that the following conditions are met:
 .
 1. Redistributions of source code must retain the above copyright notice, this list of
    conditions and the following disclaimer.
 2. Redistributions in binary form must reproduce the above copyright notice, this list of
    conditions and the following disclaimer in the documentation and/or other materials
    provided with the distribution.
 3. Neither the name of the copyright holder nor the names of its contributors may be used
    to endorse or promote products derived from this software without specific prior
    written permission.
 .
 THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY
 EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF
 MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL
 THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL,
 SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT
 OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
 INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT
 LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
 OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
EOF
chmod 0644 "$root/usr/share/doc/tern/copyright"

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: tern
Version: $version
Architecture: $arch
Maintainer: ${DEB_MAINTAINER:-tern maintainers <tern@example.invalid>}
Installed-Size: $installed_size
Depends: $depends
Recommends: nftables | iptables
Section: net
Priority: optional
Description: Tailscale-compatible node for Linux
 tern joins a tailnet run by Tailscale's coordination server, Headscale or its own lab
 server and talks to Tailscale nodes: WireGuard tunnels over direct UDP paths, DERP and peer
 relays, MagicDNS, exit nodes and subnet routes, and a peer relay server of its own.
 .
 The package installs the daemon's systemd units (tern.service, and tern-relay.service for
 a headless relay node) but enables neither: run systemctl enable --now tern, then tern up.
EOF

printf '%s\n' /etc/default/tern /etc/default/tern-relay >"$root/DEBIAN/conffiles"

# Maintainer scripts. They honour $DPKG_ROOT (dpkg --root with --force-script-chrootless runs
# them on the host with DPKG_ROOT set to the target root): files only under it, and systemctl
# only for the running system, i.e. never with DPKG_ROOT set and never without systemd.
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# tern postinst: tell systemd about the units. Nothing is enabled or started here: the node
# needs `tern up` with a control server and key first, so enabling is left to the admin
# (systemctl enable --now tern, or tern-relay). An upgrade restarts what was running.
set -e
if [ "$1" = configure ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  systemd-tmpfiles --create tern.conf || true
  if [ -n "$2" ]; then
    systemctl try-restart tern.service tern-relay.service || true
  fi
fi
exit 0
EOF

cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# tern prerm: stop the daemon before its binary goes (on upgrade it keeps running until
# postinst restarts it with the new binary).
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl stop tern.service tern-relay.service || true
fi
exit 0
EOF

cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# tern postrm: on purge, remove what tern and its units created outside the package's files:
# the state (node keys, preferences), the runtime directory, the admin's enable links and
# leftover copies of the conffiles. Paths are under $DPKG_ROOT (empty for the running system).
set -e
root=${DPKG_ROOT:-}
if [ "$1" = purge ]; then
  rm -rf "$root/var/lib/tern" "$root/run/tern"
  for unit in tern.service tern-relay.service; do
    rm -f "$root/etc/systemd/system/multi-user.target.wants/$unit"
  done
  for f in tern tern-relay; do
    rm -f "$root/etc/default/$f" "$root/etc/default/$f.dpkg-old" "$root/etc/default/$f.dpkg-new" \
      "$root/etc/default/$f.dpkg-dist" "$root/etc/default/$f.dpkg-bak" "$root/etc/default/$f.dpkg-tmp"
  done
fi
if { [ "$1" = remove ] || [ "$1" = purge ]; } && [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
  | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/tern_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
