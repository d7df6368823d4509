#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Install what contrib/qemu/run-e2e.sh needs on Debian (bookworm or later).
# Idempotent and quiet: does nothing when everything is already there.
#
#  - QEMU (qemu-system-x86: qemu-system-x86_64 with vhost-user-blk-pci) and
#    qemu-utils (qemu-storage-daemon, the reference vhost-user-blk backend).
#    On bookworm both come from bookworm-backports (QEMU 10.0): machines with
#    qemu-utils 10.0 from backports cannot take bookworm's qemu-system 7.2
#    (qemu-utils 10 Breaks qemu-system-common << 8.0, apt would remove it).
#  - gcc + libc6-dev (static PID 1 for the guest), python3 (QMP client).
#  - The guest kernel: Debian's linux-image-cloud-amd64 is *downloaded and
#    unpacked* (apt-get download + dpkg-deb -x) into $VDL_QEMU_CACHE/kernel,
#    not installed: installing a kernel package on a container/CI host would
#    pull initramfs-tools, udev and a systemd upgrade and run update-initramfs
#    for a kernel nobody boots on the host. Its vmlinuz boots under KVM or TCG;
#    virtio, virtio_ring, virtio_pci(_modern_dev/_legacy_dev) and virtio_blk
#    are modules of the same package that mkinitramfs.py puts in the initramfs.
#  - With --dpdk (only then): dpdk-testpmd (Debian package dpdk-dev) and its
#    vhost-user and AF_PACKET PMDs, the reference vhost-user-net backend of
#    net-boot.sh --backend dpdk (about 100 MiB of libraries).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $(id -u) -ne 0 ]]; then
	if command -v sudo >/dev/null 2>&1; then
		exec sudo -E bash "$0" "$@"
	fi
	vdl_die "install-deps.sh must run as root"
fi
with_dpdk=0
for arg in "$@"; do
	case "$arg" in
	--dpdk) with_dpdk=1 ;;
	*) vdl_die "install-deps.sh: unknown argument $arg (only --dpdk)" ;;
	esac
done
export DEBIAN_FRONTEND=noninteractive
APT_Q=(-q -y -o Dpkg::Use-Pty=0 -o APT::Install-Recommends=false)

tools_ok() {
	command -v qemu-system-x86_64 >/dev/null 2>&1 &&
		command -v qemu-storage-daemon >/dev/null 2>&1 &&
		command -v gcc >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1 &&
		[[ -e "$(gcc -print-file-name=libc.a)" ]]
}

codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
aptlog="$(mktemp)"
trap 'rm -f "$aptlog"' EXIT
quiet() { # run quietly; show the output only if it fails
	if ! "$@" >"$aptlog" 2>&1; then
		cat "$aptlog" >&2
		vdl_die "failed: $*"
	fi
}
updated=0
apt_update() {
	if [[ $updated -eq 0 ]]; then
		quiet apt-get update -q
		updated=1
	fi
}

if ! tools_ok; then
	qemu_target=()
	if [[ "$codename" == bookworm ]]; then
		if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
			vdl_log "adding bookworm-backports to apt sources (QEMU 10.0 to match qemu-utils 10.0)"
			cat >/etc/apt/sources.list.d/debian-bookworm-backports.sources <<-'EOF'
				Types: deb
				URIs: http://deb.debian.org/debian
				Suites: bookworm-backports
				Components: main
				Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
			EOF
		fi
		qemu_target=(-t bookworm-backports)
	fi
	apt_update
	vdl_log "apt-get install qemu-system-x86 qemu-utils gcc libc6-dev python3 ${qemu_target[*]}"
	quiet apt-get install "${APT_Q[@]}" "${qemu_target[@]}" qemu-system-x86 qemu-utils
	quiet apt-get install "${APT_Q[@]}" gcc libc6-dev python3
fi

# Guest kernel: unpack (not install) linux-image-cloud-amd64, unless a kernel
# is already found ($KERNEL, the cache, or /boot).
if ! vdl_find_kernel; then
	apt_update
	# The meta package depends on exactly one versioned image package.
	img="$(apt-cache depends --no-recommends --no-suggests "$VDL_KERNEL_PKG" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
	[[ -n "$img" ]] || vdl_die "cannot resolve $VDL_KERNEL_PKG to a linux-image-<version> package"
	vdl_log "unpacking $img into $VDL_QEMU_CACHE/kernel"
	tmp="$(mktemp -d)"
	trap 'rm -rf "$tmp" "$aptlog"' EXIT
	chmod 755 "$tmp" # apt-get download drops privileges to _apt
	(cd "$tmp" && quiet apt-get download -q "$img")
	rm -rf "$VDL_QEMU_CACHE/kernel.new"
	mkdir -p "$VDL_QEMU_CACHE/kernel.new"
	dpkg-deb -x "$tmp"/"$img"_*.deb "$VDL_QEMU_CACHE/kernel.new"
	rm -rf "$VDL_QEMU_CACHE/kernel"
	mv "$VDL_QEMU_CACHE/kernel.new" "$VDL_QEMU_CACHE/kernel"
fi

if [[ $with_dpdk -eq 1 ]] && ! command -v dpdk-testpmd >/dev/null 2>&1; then
	apt_update
	# the PMD packages carry the DPDK ABI in their names (librte-net-vhost23 on bookworm)
	pmds="$(apt-cache pkgnames librte-net-vhost | sort -V | tail -n 1) $(apt-cache pkgnames librte-net-af-packet | sort -V | tail -n 1)"
	vdl_log "apt-get install dpdk-dev $pmds (dpdk-testpmd)"
	# shellcheck disable=SC2086  # two package names
	quiet apt-get install "${APT_Q[@]}" dpdk-dev $pmds
fi

vdl_check_deps >/dev/null || { vdl_check_deps; exit 1; }
vdl_find_kernel
vdl_log "deps ok: $(qemu-system-x86_64 --version | head -1); kernel $VDL_KERNEL"
