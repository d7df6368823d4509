#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# QEMU's defaults against the daemon's defaults (issue 18, item 1):
#   qemu-system-x86_64 -smp 4 ... -device vhost-user-blk-pci,chardev=c   (no num-queues)
# asks the backend for one queue per vCPU (4) and refuses to start if it offers fewer. This
# starts the default daemon (no --num-queues) and that QEMU, and passes when the guest boots
# and reads the disk (the test guest's "VDL ITER" lines with 0 mismatches, see README.md).
# Negative control: the same QEMU against `--num-queues 1` must fail with QEMU's "maximum
# number of queues" error, proving that the check depends on the daemon's default.
#
# Usage: queues-default.sh [--daemon PATH] [--smp N] [--accel auto|kvm|tcg]
# Exit: 0 pass, 1 fail, 3 something missing (install-deps.sh), 77 --accel kvm without KVM.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$VDL_QEMU_DIR/../.."

daemon=target/release/vhost-dirtylog-blk
smp=4
accel=auto
boot_timeout=${BOOT_TIMEOUT:-120}
while [[ $# -gt 0 ]]; do
	case "$1" in
	--daemon) daemon="$2"; shift 2 ;;
	--smp) smp="$2"; shift 2 ;;
	--accel) accel="$2"; shift 2 ;;
	-h | --help) sed -n '3,14p' "$0"; exit 0 ;;
	*) echo "queues-default.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
case "$accel:$(vdl_kvm_state)" in
kvm:ok | auto:ok) accel=kvm ;;
kvm:*) vdl_banner "--accel kvm but /dev/kvm is not usable: SKIPPED"; exit 77 ;;
*) accel=tcg ;;
esac
vdl_check_deps || exit 3
[[ -x $daemon ]] || { echo "build the daemon: cargo build --release --bin vhost-dirtylog-blk" >&2; exit 3; }
bash "$VDL_QEMU_DIR/build-guest.sh" >/dev/null

work="$(mktemp -d)"
declare -a PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT

# run_case NAME DAEMON-ARGS... : prints "booted", "refused: <qemu error>" or "timeout"
run_case() {
	local name="$1"; shift
	local sock="$work/$name.sock" qmp="$work/$name.qmp" serial="$work/$name.serial"
	"$daemon" --socket-path "$sock" --read-only "$@" "$VDL_BUILD_DIR/disk.img" \
		>"$work/$name.daemon.log" 2>&1 &
	local dpid=$!
	PIDS+=("$dpid")
	local i
	for i in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done
	[[ -S $sock ]] || { cat "$work/$name.daemon.log" >&2; vdl_die "$name: daemon did not start"; }
	qemu-system-x86_64 -name "vdl-queues-$name" -accel "$accel" \
		-machine q35,memory-backend=mem -smp "$smp" -m 512M \
		-object memory-backend-memfd,id=mem,size=512M,share=on \
		-chardev socket,id=char0,path="$sock" \
		-device vhost-user-blk-pci,id=blk0,chardev=char0 \
		-kernel "$VDL_BUILD_DIR/vmlinuz" -initrd "$VDL_BUILD_DIR/initramfs.cpio" \
		-append "console=ttyS0 quiet panic=-1 vdl.buf_mib=16" \
		-serial file:"$serial" -qmp unix:"$qmp",server=on,wait=off \
		-display none -nodefaults -no-user-config -no-reboot \
		>"$work/$name.qemu.log" 2>&1 &
	local qpid=$!
	PIDS+=("$qpid")
	local deadline=$((SECONDS + boot_timeout))
	while ((SECONDS < deadline)); do
		if ! kill -0 "$qpid" 2>/dev/null; then
			echo "refused: $(grep -a -m1 -i 'queues\|error' "$work/$name.qemu.log" || tail -n1 "$work/$name.qemu.log")"
			kill "$dpid" 2>/dev/null || true
			return 0
		fi
		if grep -a -q 'VDL ITER n=1 ' "$serial" 2>/dev/null; then
			echo "booted: $(grep -a -m1 'VDL ITER n=1 ' "$serial") | daemon: $(grep -a -m1 -o '[0-9]* queue(s)' "$work/$name.daemon.log")"
			python3 "$VDL_QEMU_DIR/tools/qmp.py" "$qmp" quit >/dev/null 2>&1 || true
			kill "$qpid" "$dpid" 2>/dev/null || true
			return 0
		fi
		sleep 0.5
	done
	echo "timeout"
	tail -n 5 "$work/$name.qemu.log" "$serial" >&2 || true
	kill "$qpid" "$dpid" 2>/dev/null || true
}

vdl_log "QEMU -smp $smp, vhost-user-blk-pci without num-queues ($accel)"
pass=0 fail=0
r="$(run_case default)"
vdl_log "default daemon: $r"
if [[ $r == booted:* && $r == *mism_words=0* ]]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
r="$(run_case one-queue --num-queues 1)"
vdl_log "negative control, --num-queues 1: $r"
if [[ $r == refused:*"queues"* ]]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
echo "qemu-queues: $pass passed, $fail failed"
[[ $fail -eq 0 ]]
