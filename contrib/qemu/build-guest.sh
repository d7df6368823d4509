#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Build the test guest and the test disk into $VDL_BUILD_DIR (contrib/qemu/build):
#   vdl-init         static PID 1 + workload (guest/init.c)
#   initramfs.cpio   vdl-init + the kernel's virtio modules (tools/mkinitramfs.py)
#   vmlinuz          copy of the guest kernel
#   libvdl-dropmarks.so  LD_PRELOAD shim for the negative control with qsd
#   disk.img         raw image with the known pattern (guest/mkdisk.c), only
#                    rebuilt if missing or of another size/seed
#   vdl-net-init     static PID 1 of the network guest (guest/net-init.c)
#   initramfs-net.cpio  vdl-net-init + virtio_pci, virtio_net and their deps
# Usage: build-guest.sh [--disk-mib N] [--seed HEX] [--net-only]
#   --net-only: only vmlinuz, vdl-net-init and initramfs-net.cpio (net-boot.sh)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

disk_mib=256
seed=56444c2d51454d55
net_only=0
while [[ $# -gt 0 ]]; do
	case "$1" in
	--disk-mib) disk_mib="$2"; shift 2 ;;
	--seed) seed="$2"; shift 2 ;;
	--net-only) net_only=1; shift ;;
	*) vdl_die "build-guest.sh: unknown argument $1" ;;
	esac
done

deps=blk
[[ $net_only -eq 1 ]] && deps=net
vdl_check_deps "$deps" >/dev/null 2>&1 || { vdl_check_deps "$deps"; exit 3; }
vdl_find_kernel
mkdir -p "$VDL_BUILD_DIR"
cd "$VDL_BUILD_DIR"

CFLAGS=(-O2 -Wall -Wextra -Werror -std=gnu11)
# the network guest (net-boot.sh)
gcc "${CFLAGS[@]}" -static -o vdl-net-init.tmp "$VDL_QEMU_DIR/guest/net-init.c"
mv vdl-net-init.tmp vdl-net-init
netmods="$(python3 "$VDL_QEMU_DIR/tools/mkinitramfs.py" --init vdl-net-init \
	${VDL_MODDIR:+--moddir "$VDL_MODDIR"} --out initramfs-net.cpio virtio_pci virtio_net)"
cp -f "$VDL_KERNEL" vmlinuz
if [[ $net_only -eq 1 ]]; then
	vdl_log "net guest: kernel $(basename "$VDL_KERNEL"), initramfs-net $(du -k initramfs-net.cpio | cut -f1) KiB ($netmods)"
	exit 0
fi

gcc "${CFLAGS[@]}" -static -o vdl-init.tmp "$VDL_QEMU_DIR/guest/init.c"
mv vdl-init.tmp vdl-init
gcc "${CFLAGS[@]}" -o mkdisk.tmp "$VDL_QEMU_DIR/guest/mkdisk.c"
mv mkdisk.tmp mkdisk
# host-side LD_PRELOAD shim for the negative control with qemu-storage-daemon
gcc "${CFLAGS[@]}" -shared -fPIC -o libvdl-dropmarks.so.tmp "$VDL_QEMU_DIR/tools/dropmarks.c" -ldl
mv libvdl-dropmarks.so.tmp libvdl-dropmarks.so

mods="$(python3 "$VDL_QEMU_DIR/tools/mkinitramfs.py" --init vdl-init \
	${VDL_MODDIR:+--moddir "$VDL_MODDIR"} --out initramfs.cpio virtio_pci virtio_blk)"
cp -f "$VDL_KERNEL" vmlinuz

stamp="size_mib=$disk_mib seed=$seed"
if [[ ! -f disk.img || "$(cat disk.img.stamp 2>/dev/null)" != "$stamp" ]]; then
	rm -f disk.img disk.img.stamp
	./mkdisk disk.img "$disk_mib" "$seed"
	echo "$stamp" >disk.img.stamp
fi
vdl_log "guest: kernel $(basename "$VDL_KERNEL"), initramfs $(du -k initramfs.cpio | cut -f1) KiB ($mods), disk.img ${disk_mib} MiB"
