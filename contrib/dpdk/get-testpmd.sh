#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# get-testpmd.sh [--force] [DIR]: gets DPDK's dpdk-testpmd and the librte-* libraries it
# needs (plus the vhost, null, tap and pcap PMDs) from the distribution's packages (Debian
# bookworm: DPDK 22.11, ABI 23) WITHOUT installing anything: the .debs are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` into DIR (default target/dpdk of the
# repository; not under a world-writable directory such as /tmp, whose PMDs EAL refuses to
# load). A plain `apt-get install dpdk-dev` pulls in rdma-core, udev and systemd upgrades;
# this does not.
#
# Which packages: the librte-* packages that provide the librte_*.so sonames testpmd links
# (ldd of the unpacked binary; soname librte_net_vhost.so.23 -> package librte-net-vhost23,
# librte_net_mlx5.so.23 -> librte-net-mlx5-23, Debian's library package naming), the PMDs
# listed in PMDS, and, following Depends (first alternative) through library packages only,
# every lib* package not installed on this machine (libnuma1, libpcap0.8, libibverbs1,
# ibverbs-providers...). Non-library packages (udev, rdma-core, adduser...) are never
# followed. At the end ldd must resolve every library of testpmd and of the PMDs.
#
# Idempotent: a second run with the same package versions does nothing but print how to run
# testpmd (--force: download and unpack again). Needs apt-get, apt-cache, dpkg-deb; package
# lists (runs `apt-get update` itself when run as root and dpdk-dev has no candidate).
#
# Output: DIR/dpdk-testpmd, a wrapper that sets LD_LIBRARY_PATH and passes `-d` for the
# PMD directory (EAL options must come first, so pass yours after it:
#   DIR/dpdk-testpmd --no-huge --no-pci -m 512 --vdev net_vhost0,iface=/tmp/v.sock -- -i).
# Exit status: 0 ok, 1 failure (message on stderr), 2 usage.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
force=0
dir=""
for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	-h | --help)
		awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print } /^set -euo/ { exit }' "$0"
		exit 0
		;;
	-*)
		echo "get-testpmd.sh: unknown option $arg (usage: get-testpmd.sh [--force] [DIR])" >&2
		exit 2
		;;
	*)
		[[ -z $dir ]] || {
			echo "get-testpmd.sh: one DIR only" >&2
			exit 2
		}
		dir=$arg
		;;
	esac
done
dir=${dir:-$REPO_DIR/target/dpdk}
mkdir -p "$dir" || { echo "get-testpmd.sh: cannot create $dir" >&2; exit 1; }
dir=$(cd "$dir" && pwd)
# EAL loads a -d directory only if neither it nor any parent is writable by others (DPDK
# 22.11: "directory path /tmp is world-writable and insecure", then "Cannot init plugins").
p=$dir
while [[ -n $p ]]; do
	if [[ -n $(find "$p" -maxdepth 0 -perm -0002 2>/dev/null) ]]; then
		echo "get-testpmd.sh: $p is writable by everyone: DPDK's EAL refuses to load PMDs from $dir; choose a DIR outside it (e.g. under the repository's target/)" >&2
		exit 1
	fi
	[[ $p == / ]] && break
	p=$(dirname "$p")
done

log() { printf '[get-testpmd] %s\n' "$*" >&2; }
die() {
	printf '[get-testpmd] ERROR: %s\n' "$*" >&2
	exit 1
}

for t in apt-get apt-cache dpkg-deb dpkg-query ldd tar; do
	command -v "$t" >/dev/null 2>&1 || die "missing tool: $t (this script needs a Debian-like system with apt and dpkg)"
done
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")

# The candidate version of dpdk-dev (the package that ships /usr/bin/dpdk-testpmd).
candidate() { apt-cache policy dpdk-dev 2>/dev/null | awk '/Candidate:/ {print $2}'; }
ver=$(candidate)
if [[ -z $ver || $ver == "(none)" ]]; then
	if [[ $(id -u) -eq 0 ]]; then
		log "dpdk-dev has no candidate version: apt-get update"
		apt-get update -qq >&2 || die "apt-get update failed"
		ver=$(candidate)
	fi
	[[ -n $ver && $ver != "(none)" ]] ||
		die "apt knows no package dpdk-dev: run 'apt-get update' as root, or add Debian bookworm (main) to the apt sources"
fi
case "$ver" in
22.11.*) ;;
*) log "warning: dpdk-dev $ver is not DPDK 22.11 (Debian bookworm); continuing with it" ;;
esac
# The DPDK ABI (librte-eal23 -> 23) names the library packages and the PMD directory.
abi=$(apt-cache show --no-all-versions dpdk-dev | sed -n 's/^Depends:.*librte-eal\([0-9][0-9]*\).*/\1/p' | head -n1)
[[ -n $abi ]] || die "cannot find the DPDK ABI (librte-eal<N>) in dpdk-dev's Depends"
libdir="$dir/usr/lib/$multiarch"
pmddir="$libdir/dpdk/pmds-$abi.0"
bin="$dir/usr/bin/dpdk-testpmd"
wrapper="$dir/dpdk-testpmd"
# PMDs (loaded with -d): vhost-user port, null and pcap ports (traffic sources for io
# forwarding), tap port (kernel TAP interface), the default mempool driver.
PMDS=(net-vhost net-null net-tap net-pcap mempool-ring)
stamp="$dir/.get-testpmd.done"
want_stamp="dpdk-dev=$ver abi=$abi arch=$arch pmds=${PMDS[*]}"

print_usage() {
	cat <<EOF
dpdk-testpmd $ver (DPDK ABI $abi) in $dir
  run it through the wrapper (EAL options first, testpmd's after --):
    $wrapper --no-huge --no-pci -m 512 --vdev 'net_vhost0,iface=/tmp/vhost.sock,queues=1' -- --forward-mode=txonly --auto-start --total-num-mbufs=8192
  or directly:
    LD_LIBRARY_PATH=$libdir $bin -d $pmddir --no-huge --no-pci ...
EOF
}

if [[ $force -eq 0 && -f $stamp && -x $wrapper && "$(cat "$stamp")" == "$want_stamp" ]]; then
	log "already there ($want_stamp)"
	print_usage
	exit 0
fi

mkdir -p "$dir/debs"
debs="$dir/debs"
# apt-get download as root warns that the download is unsandboxed unless _apt can write
# to the directory; that is harmless, but keep the output clean when we can.
if [[ $(id -u) -eq 0 ]] && id _apt >/dev/null 2>&1; then chown _apt "$debs" 2>/dev/null || true; fi

# Candidate versions, looked up once per package (apt-cache is slow to start).
declare -A CAND=()
candidates() {
	local p v
	while read -r p v; do
		CAND[$p]=$v
	done < <(apt-cache policy "$@" 2>/dev/null | awk '
		/^[^ ]/ { p = $1; sub(/:$/, "", p) }
		/^  Candidate:/ { print p, $2 }')
}
cand() {
	[[ -n ${CAND[$1]:-} ]] || candidates "$1"
	local v=${CAND[$1]:-}
	[[ -n $v && $v != "(none)" ]] || die "package $1 has no candidate version (apt-get update?)"
	echo "${v//:/%3a}"
}
# deb_of PKG: the downloaded .deb of PKG's candidate version (empty if not there).
deb_of() { compgen -G "$debs/${1}_$(cand "$1")_*.deb" | head -n1 || true; }
# download PKG...: fetches the candidate .deb of each package into $debs (skipped if there).
download() {
	local p need=()
	candidates "$@"
	for p in "$@"; do
		[[ -n $(deb_of "$p") ]] || need+=("$p")
	done
	[[ ${#need[@]} -eq 0 ]] && return 0
	log "apt-get download ${#need[@]} package(s): ${need[*]}"
	(cd "$debs" && apt-get download -qq "${need[@]}" 2>&1 | grep -v 'unsandboxed' >&2) || true
	for p in "${need[@]}"; do
		[[ -n $(deb_of "$p") ]] || die "apt-get download $p failed"
	done
}
# The C runtime always comes from the system (a private libc would not match its ld.so).
# VDL_DPDK_BARE=1 pretends no other library is installed (to test what a bare machine needs).
installed() {
	case "$1" in libc6 | libgcc-s1 | libstdc++6 | libcrypt1) return 0 ;; esac
	[[ ${VDL_DPDK_BARE:-0} != 1 ]] || return 1
	[[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# 1. dpdk-dev: only usr/bin/dpdk-testpmd out of it (the rest are headers and tools).
download dpdk-dev
rm -rf "$dir/usr"
mkdir -p "$dir"
dpkg-deb --fsys-tarfile "$(deb_of dpdk-dev)" | tar -x -C "$dir" ./usr/bin/dpdk-testpmd ||
	die "dpdk-dev's package has no usr/bin/dpdk-testpmd"

# 2. The librte-* packages of testpmd's sonames, and the PMDs.
declare -A seen=()
queue=()
add() {
	local p=$1
	[[ -n ${seen[$p]:-} ]] && return 0
	seen[$p]=1
	queue+=("$p")
}
soname_pkg() { # librte_net_mlx5.so.23 -> librte-net-mlx5-23
	local base=${1%%.so.*} n=${1##*.so.}
	base=${base//_/-}
	if [[ $base =~ [0-9]$ ]]; then echo "$base-$n"; else echo "$base$n"; fi
}
while read -r so; do
	add "$(soname_pkg "$so")"
done < <(ldd "$bin" 2>/dev/null | awk '$1 ~ /^librte_.*\.so\./ {print $1}')
[[ ${#queue[@]} -gt 0 ]] || die "ldd lists no librte_* library for $bin"
for p in "${PMDS[@]}"; do add "librte-$p$abi"; done

# 3. Follow Depends (first alternative of each) through library packages: librte-* always,
# other lib* packages (and ibverbs-providers, zlib1g) only when not installed here.
pkgs=()
while [[ ${#queue[@]} -gt 0 ]]; do
	batch=("${queue[@]}")
	queue=()
	pkgs+=("${batch[@]}")
	while read -r d; do
		case "$d" in
		librte-*) add "$d" ;;
		lib* | ibverbs-providers | zlib1g) installed "$d" || add "$d" ;;
		*) ;;
		esac
	done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
		--no-replaces --no-enhances "${batch[@]}" 2>/dev/null | awk '
		/^[^ ]/ { skip = 0; next }
		/Depends:/ {
			alt = ($1 ~ /^\|/); d = $2
			if (!skip && d !~ /^</) print d
			skip = alt
		}')
done
download "${pkgs[@]}"

# 4. Unpack.
log "unpacking ${#pkgs[@]} package(s) into $dir"
for p in "${pkgs[@]}"; do
	dpkg-deb -x "$(deb_of "$p")" "$dir"
done
[[ -d $pmddir ]] || die "no PMD directory $pmddir after unpacking"

# 5. Every library of testpmd and of the PMDs resolves, librte_* from $dir.
bad=0
for f in "$bin" "$pmddir"/librte_*.so."$abi"; do
	[[ -e $f ]] || continue
	out=$(LD_LIBRARY_PATH=$libdir ldd "$f" 2>&1) || true
	if grep -q 'not found' <<<"$out"; then
		log "unresolved libraries of $f:"
		grep 'not found' <<<"$out" >&2
		bad=1
	fi
	if grep -E '^\s*librte_' <<<"$out" | grep -v -F "$libdir/" | grep -q .; then
		log "librte_* libraries of $f resolved outside $dir:"
		grep -E '^\s*librte_' <<<"$out" | grep -v -F "$libdir/" >&2
		bad=1
	fi
done
[[ $bad -eq 0 ]] || die "incomplete library set (see above)"

# EAL always loads its compiled-in PMD directory too (RTE_EAL_PMD_PATH, the system's
# /usr/lib/<multiarch>/dpdk/pmds-<abi>.0) when it exists: with a system DPDK of the same ABI
# installed, its PMDs and ours would register the same drivers twice (EAL panics:
# "UIO_RESOURCE_LIST tailq is already registered"). The wrapper then mounts ours over that
# directory in a private mount namespace (root), or else uses the system's PMDs.
sysdir="/usr/lib/$multiarch/dpdk/pmds-$abi.0"
cat >"$wrapper" <<EOF
#!/bin/sh
# dpdk-testpmd $ver from Debian's packages, unpacked by contrib/dpdk/get-testpmd.sh.
# EAL options first, testpmd's after --.
LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
if [ ! -d "$sysdir" ]; then
	exec "$bin" -d "$pmddir" "\$@"
elif [ "\$(id -u)" -eq 0 ] && command -v unshare >/dev/null 2>&1; then
	# a system DPDK is installed: ours replace its PMDs, in a private mount namespace
	exec unshare -m --propagation private sh -c 'mount --bind "\$0" "\$1" && shift && exec "\$@"' \\
		"$pmddir" "$sysdir" "$bin" "\$@"
else
	echo "dpdk-testpmd wrapper: the system's DPDK PMDs in $sysdir are loaded (EAL loads them anyway)" >&2
	exec "$bin" "\$@"
fi
EOF
chmod +x "$wrapper"
echo "$want_stamp" >"$stamp"
log "done: ${#pkgs[@]} packages, $(du -sh "$dir/usr" | cut -f1) unpacked"
print_usage
