#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# QEMU live migration of a guest with a vhost-user-blk disk under guest I/O, or
# a vhost-user-net NIC under streamed frames (--device net), verified page by
# page (the two RAM files) and, for blk, byte for byte by the guest. See
# contrib/qemu/README.md.
# The whole script is one brace group, so bash parses it completely before
# running it: editing this file during a run cannot derail that run.
{
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat <<EOF
Usage: contrib/qemu/run-e2e.sh [OPTIONS]

--device blk (default): boots a tiny guest whose PID 1 reads patterned disk data
with O_DIRECT (the vhost-user-blk backend writes guest RAM) and checks every
8-byte word, then live-migrates it over 127.0.0.1, ping-pong, to a fresh QEMU +
fresh backend each round, while it runs.
--device net: the guest (guest/net-init.c) receives a stream of patterned
frames (tools/netstream.py) through vhost-dirtylog-net's packet port (the
backend writes them into guest RAM) while it is migrated the same way; the
stream follows the guest to each destination daemon's port.

RAM check (both devices, unless --no-ram-check): guest RAM is a shared
memory-backend-file (--ram-dir) on both sides and the destination starts
paused (-S). After each completed migration, with the source stopped
(postmigrate: its backend answered GET_VRING_BASE) and the destination not yet
resumed, tools/ramcmp.py compares the two RAM files page by page: any
differing page is a lost page, whatever the guest does with it. Then 'cont'.

PASS: every migration 'completed', 0 differing pages, the guest kept working on
every destination (blk: iterating with zero mismatching words; net: receiving
the stream with no bad frame).

Options:
  --device blk|net      the vhost-user device (default $device)
  --rounds N            migrations to do (default $rounds)
  --backend ours|qsd    vhost-user-blk backend: our daemon or qemu-storage-daemon
                        (default $backend; net: ours only)
  --daemon PATH         our daemon (default target/release/vhost-dirtylog-blk,
                        net: target/release/vhost-dirtylog-net)
  --no-ram-check        memfd RAM, destination resumes by itself, no page
                        comparison (the e2e as it was before the RAM check)
  --ram-dir DIR         where the RAM files go (default /dev/shm: tmpfs; two
                        guests' RAM at a time)
  --stream-rate N       net: frames per second (default $stream_rate; 0: as fast
                        as the guest takes them). Keep it below what the guest
                        can take (TCG: about 6000/s): with a full ring every
                        buffer is filled right after the guest posts (and so
                        zeroes) it, the guest's own writes then re-dirty nearly
                        every page the backend writes, and lost marks would go
                        unnoticed (see README.md, "Net migration")
  --frame-size N        net: bytes per frame, 60..1514, 0 for netpeer's mix
                        (default $frame_size: full-size frames fill whole
                        mergeable RX buffers, which Linux then attaches to the
                        skb without writing to them)
  --switch-early        net: re-point the stream to the destination's port
                        before 'cont' (default: once it runs), so frames wait
                        there when its rings start
  --negative            negative control: make the backend lose its dirty-log
                        marks and expect the loss to be detected (differing RAM
                        pages, or the guest's own check); exit 0 only if it is. ours: VHOST_DIRTYLOG_TEST_DROP_MARKS=1
                        (honoured by a build with --features test-drop-marks);
                        qsd: LD_PRELOAD shim (tools/dropmarks.c) that maps the
                        log fd of SET_LOG_BASE privately
  --out DIR             results and logs (default contrib/qemu/build/out)
  --accel auto|kvm|tcg  accelerator (default auto: kvm if /dev/kvm is a real
                        KVM, else TCG with a warning; kvm: exit $EXIT_NO_KVM if unusable)
  --mem-mib N           guest RAM (default 512 blk, 256 net)
  --buf-mib N           guest buffer set re-read and checked every iteration
                        (default $buf_mib)
  --disk-mib N          test disk size (default $disk_mib)
  --max-bandwidth-mib N migration max-bandwidth in MiB/s (default $max_bw_mib)
  --downtime-ms N       migration downtime-limit (default $downtime_ms)
  --warmup-iters N      guest iterations on each source before migrating (default $warmup_iters;
                        net: x $net_iter_frames stream frames)
  --settle-iters N      guest iterations required on each destination (default $settle_iters;
                        net: x $net_iter_frames stream frames)
  --boot-timeout S      (default $boot_timeout)    --migrate-timeout S (default $migrate_timeout)
  --progress-timeout S  max time for the guest to show progress (default $progress_timeout)
  --escalate-after S    if a migration has not converged after S s, raise its
                        downtime-limit to 5 s (recorded; 0: never; default $escalate_after)
  -h, --help

Exit status: 0 pass (or, with --negative, loss detected: differing pages or
the guest saw it); 1 fail; 2 usage;
3 missing dependencies (message says what to install); 4 the guest hung after a
switch-over because the source backend completed a request after GET_VRING_BASE
(a known qemu-storage-daemon/libvhost-user race, not a dirty-log loss);
$EXIT_NO_KVM --accel kvm but no usable /dev/kvm.
EOF
}

EXIT_NO_KVM=77
device=blk
rounds=5
backend=ours
daemon=""
negative=0
out="$VDL_BUILD_DIR/out"
accel=auto
mem_mib=""
ram_check=1
ram_dir=/dev/shm
stream_rate=1000
frame_size=1514
switch_early=0
net_iter_frames=500 # net: one "iteration" of the guest = this many stream frames
mac=52:54:00:12:34:56
buf_mib=96
disk_mib=256
max_bw_mib=512
downtime_ms=300
warmup_iters=3
settle_iters=3
boot_timeout=120
migrate_timeout=180
progress_timeout=30
escalate_after=30

need() { [[ $# -ge 2 && -n "$2" ]] || { echo "run-e2e.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
	case "$1" in
	--device) need "$@"; device="$2"; shift 2 ;;
	--no-ram-check) ram_check=0; shift ;;
	--ram-dir) need "$@"; ram_dir="$2"; shift 2 ;;
	--stream-rate) need "$@"; stream_rate="$2"; shift 2 ;;
	--frame-size) need "$@"; frame_size="$2"; shift 2 ;;
	--switch-early) switch_early=1; shift ;;
	--rounds) need "$@"; rounds="$2"; shift 2 ;;
	--backend) need "$@"; backend="$2"; shift 2 ;;
	--daemon) need "$@"; daemon="$2"; shift 2 ;;
	--negative) negative=1; shift ;;
	--out) need "$@"; out="$2"; shift 2 ;;
	--accel) need "$@"; accel="$2"; shift 2 ;;
	--mem-mib) need "$@"; mem_mib="$2"; shift 2 ;;
	--buf-mib) need "$@"; buf_mib="$2"; shift 2 ;;
	--disk-mib) need "$@"; disk_mib="$2"; shift 2 ;;
	--max-bandwidth-mib) need "$@"; max_bw_mib="$2"; shift 2 ;;
	--downtime-ms) need "$@"; downtime_ms="$2"; shift 2 ;;
	--warmup-iters) need "$@"; warmup_iters="$2"; shift 2 ;;
	--settle-iters) need "$@"; settle_iters="$2"; shift 2 ;;
	--boot-timeout) need "$@"; boot_timeout="$2"; shift 2 ;;
	--migrate-timeout) need "$@"; migrate_timeout="$2"; shift 2 ;;
	--progress-timeout) need "$@"; progress_timeout="$2"; shift 2 ;;
	--escalate-after) need "$@"; escalate_after="$2"; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "run-e2e.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
	esac
done
case "$device" in blk | net) ;; *) echo "run-e2e.sh: --device must be blk or net" >&2; exit 2 ;; esac
[[ -n $mem_mib ]] || mem_mib=$([[ $device == net ]] && echo 256 || echo 512)
[[ -n $daemon ]] || daemon="$VDL_REPO_DIR/target/release/vhost-dirtylog-$device"
for v in frame_size stream_rate rounds mem_mib buf_mib disk_mib max_bw_mib downtime_ms warmup_iters settle_iters \
	boot_timeout migrate_timeout progress_timeout escalate_after; do
	[[ "${!v}" =~ ^[0-9]+$ ]] || { echo "run-e2e.sh: --${v//_/-} must be a number" >&2; exit 2; }
done
[[ $rounds -ge 1 ]] || { echo "run-e2e.sh: --rounds must be >= 1" >&2; exit 2; }
case "$backend" in ours | qsd) ;; *) echo "run-e2e.sh: --backend must be ours or qsd" >&2; exit 2 ;; esac
[[ $device == blk || $backend == ours ]] || { echo "run-e2e.sh: --device net: --backend ours only (DPDK: net-boot.sh --backend dpdk)" >&2; exit 2; }
if [[ $ram_check -eq 1 && ! -d $ram_dir ]]; then echo "run-e2e.sh: --ram-dir $ram_dir is not a directory" >&2; exit 2; fi
case "$accel" in auto | kvm | tcg) ;; *) echo "run-e2e.sh: --accel must be auto, kvm or tcg" >&2; exit 2 ;; esac

# ---------------------------------------------------------------- preflight
kvm_state="$(vdl_kvm_state)"
case "$accel:$kvm_state" in
kvm:ok | auto:ok) accel=kvm ;;
kvm:*)
	vdl_banner "KVM NOT USABLE: /dev/kvm is '$kvm_state' on this machine." \
		"--accel kvm was requested: exiting $EXIT_NO_KVM (skip). Use --accel auto|tcg to run under TCG."
	exit $EXIT_NO_KVM
	;;
auto:*)
	why="/dev/kvm is missing"
	[[ $kvm_state == no-access ]] && why="/dev/kvm is not accessible to $(id -un)"
	[[ $kvm_state == pvm ]] && why="/dev/kvm is PVM (kvm_pvm), which boots a stock kernel only at a crawl"
	vdl_banner "NO USABLE KVM: $why." \
		"Running under TCG instead. The check is the same: the vhost-user backend writes guest" \
		"RAM behind QEMU's back under either accelerator, so only its dirty log can tell" \
		"QEMU to resend those pages. Use --accel kvm to require KVM (exit $EXIT_NO_KVM if absent)."
	accel=tcg
	;;
tcg:*) ;;
esac

if ! vdl_check_deps "$device"; then
	exit 3
fi
if [[ $backend == ours && ! -x "$daemon" ]]; then
	echo "run-e2e.sh: our daemon '$daemon' is missing or not executable." >&2
	echo "  build it: cargo build --release --bin vhost-dirtylog-$device" >&2
	[[ $negative -eq 1 ]] && echo "  (negative control: cargo build --release --features test-drop-marks --bin vhost-dirtylog-$device)" >&2
	exit 3
fi
daemon="$(cd "$(dirname "$daemon")" && pwd)/$(basename "$daemon")"

if [[ $device == net ]]; then
	bash "$VDL_QEMU_DIR/build-guest.sh" --net-only
else
	bash "$VDL_QEMU_DIR/build-guest.sh" --disk-mib "$disk_mib"
fi
IMG="$VDL_BUILD_DIR/disk.img"
QMP=(python3 "$VDL_QEMU_DIR/tools/qmp.py")

# --out is wiped: only if it is empty or a previous output of this script.
if [[ -d "$out" && -n "$(ls -A "$out")" && ! -e "$out/.vdl-e2e-out" ]]; then
	echo "run-e2e.sh: --out $out exists, is not empty and is not an earlier run-e2e.sh output; not wiping it" >&2
	exit 2
fi
rm -rf "$out"
mkdir -p "$out/logs" "$out/rounds"
touch "$out/.vdl-e2e-out"
out="$(cd "$out" && pwd)"
SOCKDIR="$(mktemp -d /tmp/vdl-e2e.XXXXXX)"
RAMDIR=""
[[ $ram_check -eq 1 ]] && RAMDIR="$(mktemp -d "$ram_dir/vdl-e2e-ram.XXXXXX")"

# ---------------------------------------------------------------- processes
declare -A PID=()   # name -> pid of every process we started
stop_proc() {       # stop_proc NAME [GRACE_SECONDS]
	local name="$1" grace="${2:-5}" pid="${PID[$1]:-}"
	[[ -n "$pid" ]] || return 0
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		local i
		for ((i = 0; i < grace * 10; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			vdl_log "$name (pid $pid) ignored SIGTERM for ${grace}s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
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
	if [[ -n $RAMDIR && -z ${VDL_E2E_KEEP_RAM:-} ]]; then rm -rf "$RAMDIR"; elif [[ -n $RAMDIR ]]; then echo "RAM files kept (VDL_E2E_KEEP_RAM): $RAMDIR" >&2; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

alive() { [[ -n "${PID[$1]:-}" ]] && kill -0 "${PID[$1]}" 2>/dev/null; }

start_backend() { # start_backend IDX
	local i="$1" sock="$SOCKDIR/$device-$1.sock" log="$out/logs/backend-$1.log"
	rm -f "$sock"
	if [[ $device == net ]]; then
		# packet port PORT-i; every daemon sends the guest's frames to the
		# one peer socket netstream.py binds
		local -a pre=()
		[[ $negative -eq 1 ]] && pre=(env VHOST_DIRTYLOG_TEST_DROP_MARKS=1)
		"${pre[@]}" "$daemon" --socket-path "$sock" --socket-port "$SOCKDIR/port-$i" \
			--socket-peer "$SOCKDIR/peer" --queues 1 --mac "$mac" >"$log" 2>&1 &
	elif [[ $backend == qsd ]]; then
		local -a pre=()
		[[ $negative -eq 1 ]] && pre=(env LD_PRELOAD="$VDL_BUILD_DIR/libvdl-dropmarks.so")
		"${pre[@]}" qemu-storage-daemon \
			--blockdev driver=file,node-name=file0,filename="$IMG",read-only=on \
			--blockdev driver=raw,node-name=disk0,file=file0,read-only=on \
			--export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path="$sock",writable=off,num-queues=1 \
			>"$log" 2>&1 &
	elif [[ $negative -eq 1 ]]; then
		VHOST_DIRTYLOG_TEST_DROP_MARKS=1 "$daemon" --socket-path "$sock" --read-only --num-queues 1 "$IMG" >"$log" 2>&1 &
	else
		"$daemon" --socket-path "$sock" --read-only --num-queues 1 "$IMG" >"$log" 2>&1 &
	fi
	PID[backend-$i]=$!
	local deadline=$((SECONDS + 15))
	until [[ -S "$sock" && ($device == blk || -S "$SOCKDIR/port-$i") ]]; do
		alive "backend-$i" || { tail -n 20 "$log" >&2; vdl_die "backend $i exited before creating $sock"; }
		((SECONDS < deadline)) || { tail -n 20 "$log" >&2; vdl_die "backend $i: no socket $sock after 15 s"; }
		sleep 0.05
	done
}

start_qemu() { # start_qemu IDX incoming(0|1)
	local i="$1" incoming="$2"
	local -a extra=() mem dev
	# with the RAM check the destination stays paused after the migration (-S)
	# until the two RAM files have been compared
	[[ $incoming -eq 1 ]] && extra=(-incoming defer)
	[[ $incoming -eq 1 && $ram_check -eq 1 ]] && extra+=(-S)
	if [[ $ram_check -eq 1 ]]; then
		mem=(-object "memory-backend-file,id=mem,size=${mem_mib}M,share=on,mem-path=$RAMDIR/ram-$i")
	else
		mem=(-object "memory-backend-memfd,id=mem,size=${mem_mib}M,share=on")
	fi
	if [[ $device == net ]]; then
		dev=(-chardev "socket,id=char0,path=$SOCKDIR/net-$i.sock"
			-netdev "vhost-user,id=net0,chardev=char0,queues=1"
			-device "virtio-net-pci,netdev=net0,mac=$mac"
			-kernel "$VDL_BUILD_DIR/vmlinuz" -initrd "$VDL_BUILD_DIR/initramfs-net.cpio"
			-append "console=ttyS0 quiet panic=-1 vdl.queues=0 vdl.report_ms=500")
	else
		dev=(-chardev "socket,id=char0,path=$SOCKDIR/blk-$i.sock"
			-device vhost-user-blk-pci,id=blk0,chardev=char0,num-queues=1
			-kernel "$VDL_BUILD_DIR/vmlinuz" -initrd "$VDL_BUILD_DIR/initramfs.cpio"
			-append "console=ttyS0 quiet panic=-1 vdl.buf_mib=$buf_mib")
	fi
	qemu-system-x86_64 -name "vdl-e2e-$i" \
		-accel "$accel" -machine q35,memory-backend=mem -smp 1 -m "${mem_mib}M" \
		"${mem[@]}" "${dev[@]}" \
		-serial file:"$out/logs/serial-$i.log" \
		-qmp unix:"$SOCKDIR/qmp-$i.sock",server=on,wait=off \
		-display none -nodefaults -no-user-config -no-reboot \
		"${extra[@]}" >"$out/logs/qemu-$i.log" 2>&1 &
	PID[qemu-$i]=$!
	if ! "${QMP[@]}" "$SOCKDIR/qmp-$i.sock" wait --timeout 30 >/dev/null; then
		tail -n 20 "$out/logs/qemu-$i.log" >&2
		vdl_die "qemu $i: no QMP within 30 s"
	fi
}

# ---------------------------------------------------------------- guest log
# blk: the guest's iteration count ("VDL ITER n="); net: its stream frame
# count ("vdl-net: rx N tx N bad B gap G dup D stream N ...", every 500 ms
# while it changes)
ITER_RE='VDL ITER n=[0-9]*'
[[ $device == net ]] && ITER_RE='vdl-net: rx .* stream [0-9]*'
last_iter() { # last_iter LOG -> last iteration (0 if none)
	local n
	n="$(grep -a -o "$ITER_RE" "$1" 2>/dev/null | tail -n 1 | sed 's/.*[ =]//')" || true
	echo "${n:-0}"
}
first_iter() {
	local n
	n="$(grep -a -o "$ITER_RE" "$1" 2>/dev/null | head -n 1 | sed 's/.*[ =]//')" || true
	echo "${n:-0}"
}
net_counter() { # net_counter NAME: the guest's last value of counter NAME (bad, gap, dup)
	local n
	n="$(cat "$out"/logs/serial-*.log 2>/dev/null | grep -a -o "vdl-net: rx .* $1 [0-9]*" | tail -n 1 | sed 's/.* //')" || true
	echo "${n:-0}"
}
if [[ $device == net ]]; then
	# bad: a stream frame whose body did not match (corrupt RAM under the guest)
	mismatch_lines() { local b; b="$(net_counter bad)"; [[ $b -gt 0 ]] && echo "$b" || cat "$out"/logs/serial-*.log 2>/dev/null | grep -a -c 'vdl-net: BAD' || true; }
	mismatch_pages() { echo 0; }
	mismatch_words() { net_counter bad; }
	fatal_lines() { cat "$out"/logs/serial-*.log 2>/dev/null | grep -a 'vdl-net: FATAL' || true; }
else
mismatch_lines() { cat "$out"/logs/serial-*.log 2>/dev/null | grep -a -c 'VDL MISMATCH' || true; }
mismatch_pages() {
	cat "$out"/logs/serial-*.log 2>/dev/null | grep -a -o 'VDL ITER n=[0-9]* [^ ]* [^ ]* mism_pages=[0-9]*' |
		sed 's/.*mism_pages=//' | awk '{ s += $1 } END { print s + 0 }'
}
mismatch_words() {
	cat "$out"/logs/serial-*.log 2>/dev/null | grep -a -o 'VDL ITER n=[0-9]* [^ ]* mism_words=[0-9]*' |
		sed 's/.*mism_words=//' | awk '{ s += $1 } END { print s + 0 }'
}
fatal_lines() { cat "$out"/logs/serial-*.log 2>/dev/null | grep -a 'VDL FATAL' || true; }
fi

# wait_iter IDX MIN TIMEOUT: wait until guest on qemu IDX printed ITER n >= MIN.
# Returns 0 ok, 1 qemu died, 2 timeout, 4 guest reported data loss / FATAL.
wait_iter() {
	local i="$1" min="$2" timeout="$3" log="$out/logs/serial-$1.log"
	local deadline=$((SECONDS + timeout))
	while :; do
		if [[ $(mismatch_lines) -gt 0 || -n "$(fatal_lines)" ]]; then return 4; fi
		[[ $(last_iter "$log") -ge $min ]] && return 0
		alive "qemu-$i" || return 1
		((SECONDS < deadline)) || return 2
		sleep 0.1
	done
}

verdict_file="$out/result.txt"
finish() { # finish RC MESSAGE
	local rc="$1" msg="$2"
	if [[ $rc -ne 0 || $negative -eq 1 ]] && [[ -n ${VDL_E2E_HOLD:-} ]]; then
		# debugging: keep every process (and the RAM files) for inspection
		vdl_log "HOLD (VDL_E2E_HOLD): $msg; sockets in $SOCKDIR, RAM in $RAMDIR; sleeping ${VDL_E2E_HOLD}s"
		sleep "$VDL_E2E_HOLD"
	fi
	stop_stream
	python3 "$VDL_QEMU_DIR/tools/summarize.py" "$out" --device "$device" --backend "$backend" --accel "$accel" \
		--negative "$negative" --verdict "$msg" --rc "$rc" || true
	echo "$msg" >"$verdict_file"
	if [[ $rc -eq 0 ]]; then vdl_banner "$msg"; else vdl_banner "$msg" "logs: $out/logs"; fi
	# closing line for CI logs: each migration round is a test (the negative
	# control is one test: loss detected or not)
	if [[ $negative -eq 1 ]]; then
		if [[ $rc -eq 0 ]]; then echo "qemu-e2e: 1 passed, 0 failed"; else echo "qemu-e2e: 0 passed, 1 failed"; fi
	else
		echo "qemu-e2e: $ok_rounds passed, $((rc == 0 ? 0 : 1)) failed"
	fi
	exit "$rc"
}
fail() {
	if [[ $negative -eq 1 ]]; then
		finish 1 "negative control: INCONCLUSIVE: $* (no loss detected; expected differing pages or the guest to see stale data)"
	fi
	finish 1 "FAIL: $*"
}
detected() { # negative control hit: loss seen
	if [[ $negative -eq 1 ]]; then
		finish 0 "negative control: loss detected (good): $*"
	fi
	fail "$*"
}

# ---------------------------------------------------------------- net traffic
# netstream.py sends to $SOCKDIR/port, a symlink re-pointed (rename(2)) to the
# current daemon's packet port after each switch-over.
stream_frames() { # frames the streamer has had accepted so far
	python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("sent", 0))' "$out/stream.progress.json" 2>/dev/null || echo 0
}
point_stream() { # point_stream IDX
	ln -sfn "$SOCKDIR/port-$1" "$SOCKDIR/port.new"
	mv -T "$SOCKDIR/port.new" "$SOCKDIR/port"
}
start_stream() {
	point_stream 0
	local -a rate=()
	[[ $stream_rate -gt 0 ]] && rate=(--rate "$stream_rate")
	python3 "$VDL_QEMU_DIR/tools/netstream.py" --port "$SOCKDIR/port" --bind "$SOCKDIR/peer" \
		--guest-mac "$mac" --progress "$out/stream.progress.json" --json "$out/stream.json" \
		--frame-size "$frame_size" "${rate[@]}" >"$out/logs/netstream.log" 2>&1 &
	PID[netstream]=$!
}
stream_line=""
stop_stream() {
	[[ $device == net && -n ${PID[netstream]:-} ]] || return 0
	stop_proc netstream 15
	stream_line="$(tail -n 1 "$out/logs/netstream.log" 2>/dev/null)"
	vdl_log "${stream_line:-netstream: no output}"
}

# report the guest figures of a round as JSON
guest_json() { # guest_json ROUND SRC DST before src_last dst_first dst_check
	local extra=""
	if [[ $device == net ]]; then
		extra="$(printf ', "frames_streamed": %d, "guest_stream_rx": %d, "guest_gap_total": %d, "guest_dup_total": %d, "guest_bad_total": %d' \
			"$(stream_frames)" "$(last_iter "$out/logs/serial-$3.log")" "$(net_counter gap)" "$(net_counter dup)" "$(net_counter bad)")"
	fi
	printf '{"round": %d, "src": %d, "dst": %d, "iter_at_migrate_start": %d, "src_last_iter": %d, "dst_first_iter": %d, "dst_iter_checked": %d, "mismatch_lines_total": %d, "mismatch_words_total": %d%s}\n' \
		"$@" "$(mismatch_lines)" "$(mismatch_words)" "$extra" >"$out/rounds/round-$1.guest.json"
}

# ---------------------------------------------------------------- RAM check
ram_pages_total=0 ram_pages_differing=0 ram_line=""
# ram_check_round ROUND SRC DST: the source must be stopped (postmigrate) and
# the destination paused after loading everything; then compare the two files.
ram_check_round() {
	local r="$1" s="$2" d="$3" st out_line rc=0
	st="$("${QMP[@]}" "$SOCKDIR/qmp-$d.sock" status --want paused --timeout 30)" ||
		fail "round $r: destination did not reach 'paused' after the migration (state: $st)"
	st="$("${QMP[@]}" "$SOCKDIR/qmp-$s.sock" status)" || st="?"
	[[ $st == postmigrate ]] || fail "round $r: source state is '$st', not postmigrate: cannot compare RAM"
	out_line="$(python3 "$VDL_QEMU_DIR/tools/ramcmp.py" "$RAMDIR/ram-$s" "$RAMDIR/ram-$d" \
		--machine q35 --json "$out/rounds/round-$r.ram.json")" || rc=$?
	[[ $rc -le 1 ]] || fail "round $r: ramcmp.py failed (rc $rc): $out_line"
	ram_pages_total=$((ram_pages_total + $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pages"])' "$out/rounds/round-$r.ram.json")))
	ram_line="${out_line%%$'\n'*}"
	vdl_log "round $r: RAM qemu $s vs qemu $d: $ram_line"
	if [[ $rc -eq 1 ]]; then
		printf '%s\n' "$out_line" >&2
		ram_pages_differing=$((ram_pages_differing + $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["differing_pages"])' "$out/rounds/round-$r.ram.json")))
		return 1
	fi
	return 0
}

# ---------------------------------------------------------------- run
iter_unit=1
[[ $device == net ]] && iter_unit=$net_iter_frames
neg_note=""
[[ $negative -eq 1 ]] && neg_note=" (NEGATIVE CONTROL: marks dropped by $([[ $backend == ours ]] && echo VHOST_DIRTYLOG_TEST_DROP_MARKS=1 || echo LD_PRELOAD=libvdl-dropmarks.so))"
if [[ $device == net ]]; then
	vdl_log "device=net backend=$backend$neg_note accel=$accel rounds=$rounds mem=${mem_mib}MiB ram-check=$ram_check max-bandwidth=${max_bw_mib}MiB/s downtime-limit=${downtime_ms}ms"
else
	vdl_log "device=blk backend=$backend$neg_note accel=$accel rounds=$rounds mem=${mem_mib}MiB ram-check=$ram_check buffers=${buf_mib}MiB disk=${disk_mib}MiB max-bandwidth=${max_bw_mib}MiB/s downtime-limit=${downtime_ms}ms"
fi
vdl_log "qemu: $(qemu-system-x86_64 --version | head -n 1)"
[[ $backend == qsd ]] && vdl_log "qsd: $(qemu-storage-daemon --version | head -n 1)"
[[ $backend == ours ]] && vdl_log "daemon: $daemon"
[[ $ram_check -eq 1 ]] && vdl_log "RAM files in $RAMDIR"
cat >"$out/config.json" <<EOF2
{"device": "$device", "backend": "$backend", "negative": $negative, "accel": "$accel", "rounds": $rounds,
 "mem_mib": $mem_mib, "buf_mib": $buf_mib, "disk_mib": $disk_mib, "ram_check": $ram_check,
 "max_bandwidth_mib_s": $max_bw_mib, "downtime_limit_ms": $downtime_ms,
 "qemu": "$(qemu-system-x86_64 --version | head -n 1)",
 "kernel": "$(basename "$(readlink -f "$VDL_KERNEL")")",
 "daemon": "$([[ $backend == ours ]] && echo "$daemon" || command -v qemu-storage-daemon)"}
EOF2

prepare() { "${QMP[@]}" "$SOCKDIR/qmp-$1.sock" prepare --caps events \
	--max-bandwidth $((max_bw_mib * 1024 * 1024)) --downtime-limit "$downtime_ms"; }

t_start=$SECONDS
ok_rounds=0
src=0
start_backend 0
start_qemu 0 0
prepare 0
vdl_log "guest 0 booting"
if [[ $device == net ]]; then
	# the stream starts once the guest's NIC is up
	deadline=$((SECONDS + boot_timeout))
	until grep -a -q 'vdl-net: ready' "$out/logs/serial-0.log" 2>/dev/null; do
		alive qemu-0 || { tail -n 20 "$out/logs/qemu-0.log" >&2; fail "guest 0: QEMU exited during boot"; }
		[[ -z "$(fatal_lines)" ]] || fail "guest 0: $(fatal_lines | head -n 1)"
		((SECONDS < deadline)) || { tail -n 30 "$out/logs/serial-0.log" >&2; fail "guest 0: no 'vdl-net: ready' within $boot_timeout s of boot"; }
		sleep 0.2
	done
	start_stream
fi
rc=0; wait_iter 0 $((warmup_iters * iter_unit)) "$boot_timeout" || rc=$?
case $rc in
0) vdl_log "guest 0 up: $(grep -a -m1 -E 'VDL READY|vdl-net: ready' "$out/logs/serial-0.log" | tr -d '\r'), iteration $(last_iter "$out/logs/serial-0.log") after $((SECONDS - t_start)) s" ;;
1) tail -n 20 "$out/logs/qemu-0.log" >&2; fail "guest 0: QEMU exited during boot" ;;
2) tail -n 30 "$out/logs/serial-0.log" >&2; [[ $device == net ]] && tail -n 5 "$out/logs/netstream.log" "$out/logs/backend-0.log" >&2; fail "guest 0: no $((warmup_iters * iter_unit)) iterations within $boot_timeout s of boot" ;;
4) fail "guest 0: data mismatch or FATAL before any migration: $(fatal_lines | head -n 1)" ;;
esac

for ((r = 1; r <= rounds; r++)); do
	dst=$r
	slog="$out/logs/serial-$src.log" dlog="$out/logs/serial-$dst.log"
	start_backend "$dst"
	start_qemu "$dst" 1
	prepare "$dst"
	port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
	"${QMP[@]}" "$SOCKDIR/qmp-$dst.sock" incoming "tcp:127.0.0.1:$port" || fail "round $r: migrate-incoming failed"

	# Let the guest run a few more iterations on this source, so migration
	# starts in the middle of a stream of device writes.
	rc=0; wait_iter "$src" $(($(last_iter "$slog") + iter_unit)) "$progress_timeout" || rc=$?
	[[ $rc -eq 4 ]] && detected "round $r: guest reported $(mismatch_lines) mismatching pages before migrating"
	[[ $rc -ne 0 ]] && fail "round $r: guest on qemu $src made no progress before migrating (rc $rc)"

	before="$(last_iter "$slog")"
	vdl_log "round $r/$rounds: migrating qemu $src -> qemu $dst (tcp:127.0.0.1:$port) at guest iteration $before"
	mrc=0
	"${QMP[@]}" "$SOCKDIR/qmp-$src.sock" migrate "tcp:127.0.0.1:$port" \
		--timeout "$migrate_timeout" --escalate-after "$escalate_after" \
		--out "$out/rounds/round-$r.migrate.json" || mrc=$?
	if [[ $mrc -ne 0 ]]; then
		grep -a -i -E 'error|migrat|vhost' "$out/logs/qemu-$src.log" "$out/logs/qemu-$dst.log" | tail -n 10 >&2 || true
		guest_json "$r" "$src" "$dst" "$before" "$(last_iter "$slog")" 0 0
		err="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("query_migrate",{}).get("error-desc") or "")' "$out/rounds/round-$r.migrate.json" 2>/dev/null || true)"
		fail "round $r: migration did not complete (qmp.py rc $mrc${err:+: $err}; see $out/rounds/round-$r.migrate.json)"
	fi
	if [[ $ram_check -eq 1 ]]; then
		# Source stopped, destination paused: the RAM files must be equal.
		# Any difference ends the run (a pass for the negative control).
		ram_ok=1
		ram_check_round "$r" "$src" "$dst" || ram_ok=0
		[[ $device == net && $switch_early -eq 1 ]] && point_stream "$dst"
		"${QMP[@]}" "$SOCKDIR/qmp-$dst.sock" cmd cont >/dev/null || fail "round $r: 'cont' on the destination failed"
		if [[ $ram_ok -eq 0 ]]; then
			guest_json "$r" "$src" "$dst" "$before" "$(last_iter "$slog")" 0 0
			detected "round $r: ${ram_line#ramcmp: } (source stopped, destination paused; $out/rounds/round-$r.ram.json)"
		fi
	fi
	# The destination resumes (by itself without the RAM check); the source stays paused.
	dst_state="$("${QMP[@]}" "$SOCKDIR/qmp-$dst.sock" status --want running --timeout 30)" ||
		fail "round $r: destination did not reach 'running' (state: $dst_state)"
	# net: the stream follows the guest once the destination runs (its rings
	# are started); --switch-early: before 'cont', so frames wait in the
	# destination's port when its rings start
	[[ $device == net && ($switch_early -eq 0 || $ram_check -eq 0) ]] && point_stream "$dst"
	src_state="$("${QMP[@]}" "$SOCKDIR/qmp-$src.sock" status)" || src_state="?"
	[[ $src_state == postmigrate ]] || vdl_log "round $r: note: source state is '$src_state' (expected postmigrate)"
	src_last="$(last_iter "$slog")"
	"${QMP[@]}" "$SOCKDIR/qmp-$src.sock" quit >/dev/null 2>&1 || true
	stop_proc "qemu-$src" 10
	stop_proc "backend-$src" 10
	[[ $ram_check -eq 1 && -z ${VDL_E2E_KEEP_RAM:-} ]] && rm -f "$RAMDIR/ram-$src"

	# The guest must go on iterating on the destination and check at least
	# settle_iters full buffer sets there (every buffer filled on the source
	# before the switch-over is checked at least once); net: receive
	# settle_iters x $net_iter_frames more stream frames.
	settle_from=$src_last
	if [[ $device == net ]]; then
		# the source's last counter line may be up to 500 ms old: count from
		# the destination's first line instead
		rc=0; wait_iter "$dst" 1 "$progress_timeout" || rc=$?
		[[ $rc -eq 0 ]] && settle_from="$(first_iter "$dlog")"
	fi
	[[ ${rc:-0} -eq 0 ]] && { rc=0; wait_iter "$dst" $((settle_from + settle_iters * iter_unit)) "$progress_timeout" || rc=$?; }
	dst_first="$(first_iter "$dlog")" dst_now="$(last_iter "$dlog")"
	guest_json "$r" "$src" "$dst" "$before" "$src_last" "$dst_first" "$dst_now"
	case $rc in
	0) ;;
	1) detected "round $r: QEMU $dst exited after switch-over (guest stopped): $(tail -n 3 "$out/logs/qemu-$dst.log" | tr '\n' ' ')" ;;
	2)
		if [[ $negative -eq 0 ]] && grep -q 'vu_panic: Error writing eventfd' "$out/logs/backend-$src.log" 2>/dev/null; then
			finish 4 "FAIL (backend bug, not dirty logging): round $r: the guest hung on the destination because the SOURCE backend completed a request after GET_VRING_BASE ('vu_panic: Error writing eventfd' in backend-$src.log): libvhost-user (qemu-storage-daemon) replies to GET_VRING_BASE without draining in-flight requests, so that completion never reaches the destination"
		fi
		detected "round $r: guest stopped iterating on the destination (last iteration $dst_now, source's last $src_last, no progress for $progress_timeout s)"
		;;
	4) detected "round $r: guest found $(mismatch_words) mismatching words in $(mismatch_pages) pages (first: $(grep -a -h -m1 -E 'VDL (MISMATCH|FATAL)|vdl-net: (BAD|FATAL)' "$out"/logs/serial-*.log | tr -d '\r'))" ;;
	esac
	[[ $dst_first -gt $before ]] || fail "round $r: destination's first iteration $dst_first is not past $before"
	ram_note=""
	[[ $ram_check -eq 1 ]] && ram_note=", RAM identical"
	net_note=""
	[[ $device == net ]] && net_note=", $(stream_frames) frames streamed so far (guest gap $(net_counter gap) dup $(net_counter dup))"
	vdl_log "round $r: ok: $(python3 "$VDL_QEMU_DIR/tools/summarize.py" --oneline "$out/rounds/round-$r.migrate.json"); guest iterations $before -> src last $src_last -> dst $dst_first..$dst_now, 0 mismatches$ram_note$net_note"
	ok_rounds=$((ok_rounds + 1))
	src=$dst
done

if [[ $negative -eq 1 ]]; then
	hint=""
	if [[ $backend == ours ]] && ! grep -q -s 'VHOST_DIRTYLOG_TEST_DROP_MARKS' "$out"/logs/backend-*.log; then
		hint=" (the daemon never mentioned VHOST_DIRTYLOG_TEST_DROP_MARKS: was it built with --features test-drop-marks?)"
	fi
	finish 1 "negative control: NO loss detected after $rounds rounds with marks dropped$hint"
fi
[[ $(mismatch_lines) -eq 0 && $(mismatch_words) -eq 0 && -z "$(fatal_lines)" ]] || fail "mismatches in the guest logs"
ram_text=""
[[ $ram_check -eq 1 ]] && ram_text=", RAM compared page by page: $ram_pages_total pages, 0 differing"
if [[ $device == net ]]; then
	stop_stream
	[[ $stream_line == netstream:*guest:* ]] || fail "the guest did not answer the final stats query: $stream_line"
	finish 0 "PASS: $rounds/$rounds migrations completed (net, $backend backend, $accel)$ram_text; ${stream_line#netstream: }, $((SECONDS - t_start)) s"
fi
finish 0 "PASS: $rounds/$rounds migrations completed ($backend backend, $accel), guest verified $(last_iter "$out/logs/serial-$src.log") iterations x ${buf_mib} MiB with 0 mismatches$ram_text, $((SECONDS - t_start)) s"
# shellcheck disable=SC2317  # not reached: finish exits
exit 1
}
