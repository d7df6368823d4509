# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this
#
# Shared helpers of contrib/qemu/*.sh: paths, dependency checks, kernel lookup.
# Sourced, never run.

VDL_QEMU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VDL_REPO_DIR="$(cd "$VDL_QEMU_DIR/../.." && pwd)"
VDL_BUILD_DIR="${VDL_BUILD_DIR:-$VDL_QEMU_DIR/build}"
# Where install-deps.sh unpacks the guest kernel package (outside the work tree,
# so a fresh clone in CI reuses it).
VDL_QEMU_CACHE="${VDL_QEMU_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/vhost-dirtylog-qemu}"
# The Debian package whose kernel we boot: virtio_pci and virtio_blk are
# modules there (=m), which the initramfs carries.
VDL_KERNEL_PKG="${VDL_KERNEL_PKG:-linux-image-cloud-amd64}"

vdl_log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
vdl_die() { printf '[e2e] ERROR: %s\n' "$*" >&2; exit 1; }

vdl_banner() {
	local line="################################################################################"
	printf '%s\n' "$line" >&2
	local l
	for l in "$@"; do printf '## %s\n' "$l" >&2; done
	printf '%s\n' "$line" >&2
}

# vdl_find_kernel: sets VDL_KERNEL (vmlinuz) and VDL_MODDIR (/lib/modules/VER,
# may be empty if the kernel has everything built in). Order: $KERNEL (+
# optional $KERNEL_MODDIR), the kernel unpacked by install-deps.sh in
# $VDL_QEMU_CACHE/kernel, then the newest /boot/vmlinuz-*.
vdl_find_kernel() {
	VDL_KERNEL="" VDL_MODDIR=""
	if [[ -n "${KERNEL:-}" ]]; then
		[[ -r "$KERNEL" ]] || { echo "KERNEL=$KERNEL is not readable" >&2; return 1; }
		VDL_KERNEL="$KERNEL"
		local ver="${KERNEL##*/vmlinuz-}"
		if [[ -n "${KERNEL_MODDIR:-}" ]]; then
			VDL_MODDIR="$KERNEL_MODDIR"
		elif [[ -d "$(dirname "$KERNEL")/../lib/modules/$ver" ]]; then
			VDL_MODDIR="$(cd "$(dirname "$KERNEL")/../lib/modules/$ver" && pwd)"
		elif [[ -d "/lib/modules/$ver" ]]; then
			VDL_MODDIR="/lib/modules/$ver"
		fi
		return 0
	fi
	local root k ver
	for root in "$VDL_QEMU_CACHE/kernel" ""; do
		# newest version first
		while IFS= read -r k; do
			[[ -r "$k" ]] || continue
			ver="${k##*/vmlinuz-}"
			if [[ -d "$root/lib/modules/$ver/kernel" ]]; then
				VDL_KERNEL="$k" VDL_MODDIR="$root/lib/modules/$ver"
				return 0
			fi
		done < <(printf '%s\n' "$root"/boot/vmlinuz-* | sort -rV)
	done
	return 1
}

# vdl_check_deps [blk|net]: prints every missing piece with the Debian package
# that provides it; returns 1 if anything is missing. blk (the default): what
# run-e2e.sh needs; net: what net-boot.sh needs (no qemu-storage-daemon, but
# virtio-net-pci and the dgram and vhost-user netdevs).
vdl_check_deps() {
	local what="${1:-blk}"
	local missing=0
	local -a pkgs=()
	local -a tools=(qemu-system-x86_64:qemu-system-x86 gcc:gcc python3:python3 timeout:coreutils)
	[[ $what == blk ]] && tools+=(qemu-storage-daemon:qemu-utils)
	local t
	for t in "${tools[@]}"; do
		if ! command -v "${t%%:*}" >/dev/null 2>&1; then
			echo "missing: ${t%%:*} (Debian package ${t#*:})" >&2
			pkgs+=("${t#*:}")
			missing=1
		fi
	done
	# static libc for the guest's PID 1
	if command -v gcc >/dev/null 2>&1 && ! [[ -e "$(gcc -print-file-name=libc.a)" ]]; then
		echo "missing: static libc (libc.a) for 'gcc -static' (Debian package libc6-dev)" >&2
		pkgs+=(libc6-dev)
		missing=1
	fi
	if [[ $what == blk ]] && command -v qemu-system-x86_64 >/dev/null 2>&1 &&
		! qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vhost-user-blk-pci"'; then
		echo "missing: vhost-user-blk-pci in $(command -v qemu-system-x86_64)" >&2
		missing=1
	fi
	if [[ $what == net ]] && command -v qemu-system-x86_64 >/dev/null 2>&1; then
		if ! qemu-system-x86_64 -device help 2>/dev/null | grep -q '"virtio-net-pci"'; then
			echo "missing: virtio-net-pci in $(command -v qemu-system-x86_64)" >&2
			missing=1
		fi
		local nd
		for nd in dgram vhost-user; do
			if ! qemu-system-x86_64 -netdev help 2>/dev/null | grep -qx "$nd"; then
				echo "missing: -netdev $nd in $(command -v qemu-system-x86_64) (dgram needs QEMU >= 7.2)" >&2
				missing=1
			fi
		done
	fi
	if ! vdl_find_kernel; then
		echo "missing: a guest kernel (no \$KERNEL, nothing in $VDL_QEMU_CACHE/kernel/boot, no /boot/vmlinuz-*)" >&2
		echo "         install-deps.sh unpacks Debian's $VDL_KERNEL_PKG there (apt-get download + dpkg-deb -x)," >&2
		echo "         or: apt-get install $VDL_KERNEL_PKG   (then it is found in /boot)" >&2
		missing=1
	fi
	if [[ $missing -ne 0 ]]; then
		echo >&2
		echo "To install everything: sudo bash $VDL_QEMU_DIR/install-deps.sh" >&2
		if [[ ${#pkgs[@]} -gt 0 ]]; then
			echo "(Debian packages: ${pkgs[*]}; on bookworm QEMU comes from bookworm-backports:" >&2
			echo " apt-get install -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-utils)" >&2
		fi
		return 1
	fi
	return 0
}

# Is /dev/kvm a hypervisor that runs a stock kernel at native speed? Some
# sandboxes expose /dev/kvm backed by PVM (kvm_pvm, a software hypervisor for
# PVM-aware guests): a stock Debian kernel needs minutes just to decompress.
vdl_kvm_state() {
	if [[ ! -e /dev/kvm ]]; then
		echo missing
	elif [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
		echo no-access
	elif [[ -d /sys/module/kvm_pvm ]]; then
		echo pvm
	else
		echo ok
	fi
}
