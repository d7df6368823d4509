#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Boot a QEMU guest on a virtio-net device and exchange frames with it, checked
# byte for byte. See contrib/qemu/README.md ("Network guest").
# One brace group, so bash parses it completely before running it.
{
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

EXIT_NO_KVM=77
EXIT_SKIP=77
TAP=vdltap0
VETH_DPDK=vdlv0 VETH_PEER=vdlv1
backend=ours
daemon="$VDL_REPO_DIR/target/release/vhost-dirtylog-net"
queues=1
frames=500
window=16
stream_frames=2000
control_frames=100
accel=auto
mem_mib=256
mac=52:54:00:12:34:56
out="$VDL_BUILD_DIR/net-out"
boot_timeout=120
timeout=30

usage() {
	cat <<EOF
Usage: contrib/qemu/net-boot.sh [OPTIONS]

Boots a tiny guest (guest/net-init.c as PID 1) whose only NIC is a
virtio-net-pci device, and talks to it through a packet port, a unix datagram
socket carrying one Ethernet frame per datagram (tools/netpeer.py):
  1. boot: the guest loads virtio_net, brings eth0 up (no IP) and prints
     "vdl-net: ready";
  2. echo: --frames K echo requests of 60..1514 bytes; every answer must be the
     request with the MACs swapped and the guest's sequence number and CRC-32 of
     the body filled in, byte for byte;
  3. guest check control: --control-frames echo requests of which every 5th has
     a corrupted body; the guest must flag exactly those (so its own check of
     the received data works);
  4. stream: --stream-frames frames, not answered; the guest must count all of
     them in sequence (no gap, no duplicate, no bad body).
PASS: all four, the guest never printed FATAL, QEMU (and the daemon) still run.

Backends:
  ours        vhost-dirtylog-net --socket-path VHOST_SOCK --socket-port PORT
              --socket-peer PEER --queues N --mac MAC, and QEMU with
              -netdev vhost-user (guest RAM: memory-backend-memfd,share=on)
  qemu-dgram  no daemon: QEMU's own -netdev dgram on the same kind of unix
              datagram port (the reference and self-test of this script)
  qemu-tap    no daemon: QEMU's -netdev tap (queues=N, vhost=off) on a TAP that
              QEMU creates in a new network namespace (unshare -n; nothing
              leaves it), netpeer on an AF_PACKET socket on that TAP: the
              multi-queue reference. Needs root and /dev/net/tun, else it exits
              $EXIT_SKIP (skipped, with a banner)
  dpdk        DPDK's vhost-user-net backend (dpdk-testpmd: net_vhost port with
              queues=N, io-forwarding to a net_af_packet port on one end of a
              veth pair in a new network namespace; netpeer on the other end):
              the reference vhost-user-net backend, same QEMU command line as
              ours. Needs root (else exit $EXIT_SKIP) and dpdk-testpmd
              (install-deps.sh --dpdk; else exit 3). testpmd polls: it keeps
              one host CPU busy while it runs

Options:
  --backend ours|qemu-dgram|qemu-tap|dpdk   (default $backend)
  --daemon PATH         vhost-dirtylog-net (default target/release/vhost-dirtylog-net)
  --queues N            queue pairs (ours: --queues N, -netdev queues=N, mq=on,
                        -smp N; the guest enables all of them and runs one
                        worker per queue pair; qemu-tap, dpdk likewise) (default
                        $queues; qemu-dgram: 1 only)
  --frames K            echo requests (default $frames)
  --window W            echo requests in flight (default $window; a unix
                        datagram socket queues at most net.unix.max_dgram_qlen
                        datagrams, 10 by default, before its sender gets EAGAIN:
                        QEMU's dgram netdev then waits, a backend that drops
                        loses answers here)
  --control-frames K    echo requests of the guest check control (default
                        $control_frames; 0 skips it)
  --stream-frames K     stream frames (default $stream_frames; 0 skips the stream)
  --mac MAC             guest MAC (default $mac)
  --accel auto|kvm|tcg  (default auto: kvm if /dev/kvm is a real KVM, else TCG)
  --mem-mib N           guest RAM (default $mem_mib)
  --out DIR             logs (default contrib/qemu/build/net-out; wiped)
  --boot-timeout S      (default $boot_timeout)   --timeout S  netpeer's (default $timeout)
  -h, --help

Exit status: 0 pass; 1 fail; 2 usage; 3 missing dependencies (the message says
what to install or build); $EXIT_NO_KVM --accel kvm without a usable /dev/kvm,
or qemu-tap / dpdk without root (or /dev/net/tun).
The last line is "qemu-net: N passed, M failed" (boot, checker, echo, control,
stream; "checker" is netpeer.py --self-test, the checker's own negative control).
EOF
}

ARGS=("$@")
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "net-boot.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
	case "$1" in
	--backend) need "$@"; backend="$2"; shift 2 ;;
	--daemon) need "$@"; daemon="$2"; shift 2 ;;
	--queues) need "$@"; queues="$2"; shift 2 ;;
	--frames) need "$@"; frames="$2"; shift 2 ;;
	--window) need "$@"; window="$2"; shift 2 ;;
	--control-frames) need "$@"; control_frames="$2"; shift 2 ;;
	--stream-frames) need "$@"; stream_frames="$2"; shift 2 ;;
	--mac) need "$@"; mac="$2"; shift 2 ;;
	--accel) need "$@"; accel="$2"; shift 2 ;;
	--mem-mib) need "$@"; mem_mib="$2"; shift 2 ;;
	--out) need "$@"; out="$2"; shift 2 ;;
	--boot-timeout) need "$@"; boot_timeout="$2"; shift 2 ;;
	--timeout) need "$@"; timeout="$2"; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "net-boot.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
	esac
done
for v in queues frames window control_frames stream_frames mem_mib boot_timeout timeout; do
	[[ "${!v}" =~ ^[0-9]+$ ]] || { echo "net-boot.sh: --${v//_/-} must be a number" >&2; exit 2; }
done
case "$backend" in ours | qemu-dgram | qemu-tap | dpdk) ;; *) echo "net-boot.sh: --backend must be ours, qemu-dgram, qemu-tap or dpdk" >&2; exit 2 ;; esac
case "$accel" in auto | kvm | tcg) ;; *) echo "net-boot.sh: --accel must be auto, kvm or tcg" >&2; exit 2 ;; esac
[[ $frames -ge 1 && $window -ge 1 ]] || { echo "net-boot.sh: --frames and --window must be >= 1" >&2; exit 2; }
[[ $queues -ge 1 && $queues -le 16 ]] || { echo "net-boot.sh: --queues must be 1..16" >&2; exit 2; }
[[ $backend != qemu-dgram || $queues -eq 1 ]] || { echo "net-boot.sh: -netdev dgram has one queue pair: --queues 1 with --backend qemu-dgram" >&2; exit 2; }
[[ $mac =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || { echo "net-boot.sh: --mac must look like 52:54:00:12:34:56" >&2; exit 2; }

# ---------------------------------------------------------------- preflight
kvm_state="$(vdl_kvm_state)"
case "$accel:$kvm_state" in
kvm:ok | auto:ok) accel=kvm ;;
kvm:*) vdl_banner "--accel kvm but /dev/kvm is '$kvm_state': SKIPPED"; exit $EXIT_NO_KVM ;;
auto:*) vdl_log "no usable KVM (/dev/kvm: $kvm_state): TCG"; accel=tcg ;;
tcg:*) ;;
esac
vdl_check_deps net || exit 3
if [[ $backend == dpdk ]] && ! command -v dpdk-testpmd >/dev/null 2>&1; then
	echo "missing: dpdk-testpmd (Debian package dpdk-dev; with librte-net-vhost23 and librte-net-af-packet23)" >&2
	echo "To install it: sudo bash $VDL_QEMU_DIR/install-deps.sh --dpdk" >&2
	exit 3
fi
if [[ ($backend == qemu-tap || $backend == dpdk) && -z ${VDL_NET_IN_NETNS:-} ]]; then
	why=""
	[[ $(id -u) -eq 0 ]] || why="not root"
	[[ $backend == dpdk || -c /dev/net/tun ]] || why="${why:+$why, }no /dev/net/tun"
	command -v unshare >/dev/null || why="${why:+$why, }no unshare (util-linux)"
	command -v ip >/dev/null || why="${why:+$why, }no ip (iproute2)"
	if [[ -n $why ]]; then
		vdl_banner "--backend $backend SKIPPED: $why" "(it creates its interfaces in a new network namespace)"
		exit $EXIT_SKIP
	fi
	# again, in a new network namespace: the interfaces and their traffic stay there
	VDL_NET_IN_NETNS=1 exec unshare -n bash "${BASH_SOURCE[0]}" "${ARGS[@]}"
fi
if [[ $backend == ours && ! -x "$daemon" ]]; then
	echo "net-boot.sh: our daemon '$daemon' is missing or not executable." >&2
	echo "  build it: cargo build --release --bin vhost-dirtylog-net" >&2
	echo "  (or run the reference: --backend qemu-dgram)" >&2
	exit 3
fi
[[ $backend == ours ]] && daemon="$(cd "$(dirname "$daemon")" && pwd)/$(basename "$daemon")"
bash "$VDL_QEMU_DIR/build-guest.sh" --net-only

if [[ -d "$out" && -n "$(ls -A "$out")" && ! -e "$out/.vdl-net-out" ]]; then
	echo "net-boot.sh: --out $out exists, is not empty and is not an earlier net-boot.sh output; not wiping it" >&2
	exit 2
fi
rm -rf "$out"
mkdir -p "$out"
touch "$out/.vdl-net-out"
out="$(cd "$out" && pwd)"
SOCKDIR="$(mktemp -d /tmp/vdl-net.XXXXXX)"
VHOST_SOCK="$SOCKDIR/vhost.sock" PORT="$SOCKDIR/port.sock" PEER="$SOCKDIR/peer.sock"
SERIAL="$out/serial.log"

# ---------------------------------------------------------------- processes
declare -A PID=()
stop_proc() { # stop_proc NAME [GRACE_SECONDS]
	local name="$1" grace="${2:-5}" pid="${PID[$1]:-}"
	[[ -n "$pid" ]] || return 0
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		local i
		for ((i = 0; i < grace * 10; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
	unset "PID[$name]"
}
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
	local rc=$?
	local n
	for n in "${!PID[@]}"; do stop_proc "$n" 3; done
	rm -rf "$SOCKDIR"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
alive() { [[ -n "${PID[$1]:-}" ]] && kill -0 "${PID[$1]}" 2>/dev/null; }

passed=0 failed=0
declare -a results=()
result() { # result NAME ok|FAIL DETAIL
	results+=("$1: $2: $3")
	if [[ $2 == ok ]]; then passed=$((passed + 1)); vdl_log "$1: ok: $3"; else failed=$((failed + 1)); vdl_log "$1: FAIL: $3"; fi
}
finish() {
	local r
	printf '%s\n' "${results[@]}" >"$out/result.txt"
	if [[ $failed -eq 0 && $passed -ge 1 ]]; then
		vdl_banner "PASS: net guest on the $backend backend ($accel, $queues queue pair(s)): $(printf '%s\n' "${results[@]}" | cut -d: -f1 | paste -sd, -)"
	else
		vdl_banner "FAIL: net guest on $backend backend; logs: $out" "${results[@]}"
		tail -n 15 "$SERIAL" >&2 2>/dev/null || true
		[[ $backend == ours || $backend == dpdk ]] && tail -n 15 "$out/daemon.log" >&2 2>/dev/null || true
	fi
	echo "qemu-net: $passed passed, $failed failed"
	[[ $failed -eq 0 ]] && exit 0
	exit 1
}

vdl_log "backend=$backend accel=$accel queues=$queues frames=$frames control=$control_frames stream=$stream_frames mem=${mem_mib}MiB"
vdl_log "qemu: $(qemu-system-x86_64 --version | head -n 1)"

declare -a netdev device
smp=1
if [[ $backend == ours ]]; then
	vdl_log "daemon: $daemon"
	"$daemon" --socket-path "$VHOST_SOCK" --socket-port "$PORT" --socket-peer "$PEER" \
		--queues "$queues" --mac "$mac" >"$out/daemon.log" 2>&1 &
	PID[daemon]=$!
	deadline=$((SECONDS + 15))
	ports_ready() { # PORT, PORT.1 .. PORT.(N-1): one per queue pair
		local k
		[[ -S $PORT ]] || return 1
		for ((k = 1; k < queues; k++)); do [[ -S $PORT.$k ]] || return 1; done
	}
	until [[ -S $VHOST_SOCK ]] && ports_ready; do
		if ! alive daemon; then
			tail -n 20 "$out/daemon.log" >&2
			result boot FAIL "the daemon exited before creating its sockets"
			finish
		fi
		if ((SECONDS >= deadline)); then
			tail -n 20 "$out/daemon.log" >&2
			result boot FAIL "the daemon created no $VHOST_SOCK and $PORT (.k) within 15 s"
			finish
		fi
		sleep 0.05
	done
	netdev=(-chardev "socket,id=char0,path=$VHOST_SOCK"
		-netdev "vhost-user,id=net0,chardev=char0,queues=$queues")
	device=(-device "virtio-net-pci,netdev=net0,mac=$mac")
	if [[ $queues -gt 1 ]]; then
		# MSI-X vectors: one per virtqueue (2 per queue pair) + control + config
		device=(-device "virtio-net-pci,netdev=net0,mac=$mac,mq=on,vectors=$((2 * queues + 2))")
		smp=$queues
	fi
elif [[ $backend == dpdk ]]; then
	# in our own network namespace (see above)
	echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null || true
	ip link set lo up
	ip link add "$VETH_DPDK" type veth peer name "$VETH_PEER"
	ip link set "$VETH_DPDK" up
	ip link set "$VETH_PEER" up
	dpdk_prefix="vdl-net-$$"
	vdl_log "dpdk: $(dpkg-query -W -f '${Version}' dpdk-dev 2>/dev/null || echo '?') dpdk-testpmd"
	# --no-huge: no hugepages needed (guest RAM comes from QEMU's memfd);
	# io forwarding: vhost port 0 queue i <-> af_packet port 1 queue i
	dpdk-testpmd --no-huge -m 256 --no-pci --file-prefix "$dpdk_prefix" \
		--vdev "net_vhost0,iface=$VHOST_SOCK,queues=$queues" \
		--vdev "net_af_packet0,iface=$VETH_DPDK,qpairs=$queues" \
		-- --forward-mode=io --auto-start --stats-period 5 --total-num-mbufs=16384 \
		--rxq="$queues" --txq="$queues" --nb-cores=1 </dev/null >"$out/daemon.log" 2>&1 &
	PID[daemon]=$!
	deadline=$((SECONDS + 30))
	until [[ -S $VHOST_SOCK ]]; do
		if ! alive daemon || ((SECONDS >= deadline)); then
			tail -n 20 "$out/daemon.log" >&2
			result boot FAIL "dpdk-testpmd did not create $VHOST_SOCK"
			finish
		fi
		sleep 0.05
	done
	netdev=(-chardev "socket,id=char0,path=$VHOST_SOCK"
		-netdev "vhost-user,id=net0,chardev=char0,queues=$queues")
	device=(-device "virtio-net-pci,netdev=net0,mac=$mac")
	if [[ $queues -gt 1 ]]; then
		device=(-device "virtio-net-pci,netdev=net0,mac=$mac,mq=on,vectors=$((2 * queues + 2))")
		smp=$queues
	fi
elif [[ $backend == qemu-tap ]]; then
	# in our own network namespace (see above): no IPv6 chatter on the TAP
	echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null || true
	ip link set lo up
	netdev=(-netdev "tap,id=net0,ifname=$TAP,script=no,downscript=no,vhost=off,queues=$queues")
	device=(-device "virtio-net-pci,netdev=net0,mac=$mac")
	if [[ $queues -gt 1 ]]; then
		device=(-device "virtio-net-pci,netdev=net0,mac=$mac,mq=on,vectors=$((2 * queues + 2))")
		smp=$queues
	fi
else
	netdev=(-netdev "dgram,id=net0,local.type=unix,local.path=$PORT,remote.type=unix,remote.path=$PEER")
	device=(-device "virtio-net-pci,netdev=net0,mac=$mac")
fi

t0=$SECONDS
qemu-system-x86_64 -name vdl-net \
	-accel "$accel" -machine q35,memory-backend=mem -smp "$smp" -m "${mem_mib}M" \
	-object memory-backend-memfd,id=mem,size="${mem_mib}M",share=on \
	"${netdev[@]}" "${device[@]}" \
	-kernel "$VDL_BUILD_DIR/vmlinuz" -initrd "$VDL_BUILD_DIR/initramfs-net.cpio" \
	-append "console=ttyS0 quiet panic=-1 vdl.queues=0" \
	-serial file:"$SERIAL" -qmp unix:"$SOCKDIR/qmp.sock",server=on,wait=off \
	-display none -nodefaults -no-user-config -no-reboot >"$out/qemu.log" 2>&1 &
PID[qemu]=$!
if [[ $backend == qemu-tap ]]; then
	for i in $(seq 200); do ip link show "$TAP" >/dev/null 2>&1 && break; sleep 0.05; done
	ip link set "$TAP" up || { result boot FAIL "no TAP $TAP from QEMU: $(tail -n 1 "$out/qemu.log")"; finish; }
fi

# ---------------------------------------------------------------- 1. boot
deadline=$((SECONDS + boot_timeout))
ready=""
while :; do
	ready="$(grep -a -m1 'vdl-net: ready' "$SERIAL" 2>/dev/null | tr -d '\r')" || true
	[[ -n $ready ]] && break
	if grep -a -q 'vdl-net: FATAL' "$SERIAL" 2>/dev/null; then
		result boot FAIL "$(grep -a -m1 'vdl-net: FATAL' "$SERIAL" | tr -d '\r')"
		finish
	fi
	if ! alive qemu; then
		tail -n 10 "$out/qemu.log" >&2
		result boot FAIL "QEMU exited during boot: $(tail -n 1 "$out/qemu.log")"
		finish
	fi
	if ((SECONDS >= deadline)); then
		result boot FAIL "no 'vdl-net: ready' within $boot_timeout s"
		finish
	fi
	sleep 0.2
done
guest_mac="$(sed -n 's/.* mac=\([0-9a-f:]*\).*/\1/p' <<<"$ready")"
guest_queues="$(sed -n 's/.* queues=\([0-9]*\)\/.*/\1/p' <<<"$ready")"
guest_workers="$(sed -n 's/.* workers=\([0-9]*\).*/\1/p' <<<"$ready")"
if [[ ${guest_mac,,} != "${mac,,}" ]]; then
	result boot FAIL "the guest's MAC is $guest_mac, QEMU was given $mac ($ready)"
	finish
fi
if [[ $guest_queues != "$queues" ]]; then
	result boot FAIL "the guest enabled $guest_queues queue pair(s), expected $queues ($ready)"
	finish
fi
result boot ok "$((SECONDS - t0)) s: ${ready#vdl-net: }"

# ---------------------------------------------------------------- 2-4. traffic
# the checker first: netpeer must pass a correct fake guest and fail broken ones
# (an answer with a flipped byte, a wrong CRC, a lost or duplicated answer, a
# guest that does not flag a corrupted body, a stream with gaps)
rc=0
python3 "$VDL_QEMU_DIR/tools/netpeer.py" --self-test >"$out/checker.log" 2>&1 || rc=$?
if [[ $rc -eq 0 ]]; then result checker ok "$(tail -n 1 "$out/checker.log")"; else result checker FAIL "$(tail -n 1 "$out/checker.log")"; cat "$out/checker.log" >&2; fi
NETPEER=(python3 "$VDL_QEMU_DIR/tools/netpeer.py" --guest-mac "$mac" --timeout "$timeout" --window "$window")
case $backend in
qemu-tap) NETPEER+=(--iface "$TAP") ;;
dpdk) NETPEER+=(--iface "$VETH_PEER") ;;
ours) NETPEER+=(--port "$PORT" --bind "$PEER" --pairs "$queues") ;;
*) NETPEER+=(--port "$PORT" --bind "$PEER") ;;
esac
# several guest workers (one per queue pair) may answer out of order
[[ ${guest_workers:-1} -gt 1 ]] && NETPEER+=(--unordered)
peer() { # peer NAME ARGS...: runs netpeer, records the result
	local name="$1"; shift
	local rc=0 line
	"${NETPEER[@]}" --json "$out/$name.json" "$@" >"$out/$name.log" 2>&1 || rc=$?
	line="$(grep -a '^netpeer:' "$out/$name.log" | head -n 1)"
	[[ -n $line ]] || line="$(tail -n 1 "$out/$name.log")"
	if [[ $rc -eq 0 ]]; then result "$name" ok "${line#netpeer: PASS: }"; else result "$name" FAIL "(netpeer exit $rc) ${line#netpeer: }"; cat "$out/$name.log" >&2; fi
}
peer echo --frames "$frames" --seq-start 1
[[ $control_frames -gt 0 ]] && peer control --frames "$control_frames" --corrupt-every 5 --seq-start 100000
[[ $stream_frames -gt 0 ]] && peer stream --mode stream --frames "$stream_frames" --seq-start 200000

# the guest's own view, and the processes must still be there
sleep 1.2
last="$(grep -a 'vdl-net: rx ' "$SERIAL" | tail -n 1 | tr -d '\r')"
vdl_log "guest: ${last:-no counter line}"
if grep -a -q 'vdl-net: FATAL' "$SERIAL"; then
	result guest FAIL "$(grep -a -m1 'vdl-net: FATAL' "$SERIAL" | tr -d '\r')"
fi
alive qemu || result qemu FAIL "QEMU exited: $(tail -n 1 "$out/qemu.log")"
if [[ $backend == ours || $backend == dpdk ]]; then
	alive daemon || result daemon FAIL "the daemon exited: $(tail -n 1 "$out/daemon.log")"
	if grep -a -q -i 'panicked' "$out/daemon.log"; then result daemon FAIL "the daemon panicked: $(grep -a -m1 -i panicked "$out/daemon.log")"; fi
fi
python3 "$VDL_QEMU_DIR/tools/qmp.py" "$SOCKDIR/qmp.sock" quit >/dev/null 2>&1 || true
stop_proc qemu 10
if [[ $backend == ours || $backend == dpdk ]]; then stop_proc daemon 10; fi
if [[ $backend == dpdk ]]; then
	vdl_log "dpdk-testpmd: $(grep -a -A3 'Accumulated forward statistics' "$out/daemon.log" | grep -a -o 'RX-packets: *[0-9]*\|TX-packets: *[0-9]*\|TX-dropped: *[0-9]*' | tr -s ' ' | paste -sd, -)"
	rm -rf "/var/run/dpdk/$dpdk_prefix"
fi
finish
}
