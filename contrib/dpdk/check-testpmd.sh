#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# check-testpmd.sh: DPDK's vhost-user-net backend (dpdk-testpmd with a net_vhost port) and ours
# (vhost-dirtylog-net) under `vhost-dirtylog-check --device net`, every fault mode x runs x VMM
# style, each run with a freshly started backend; writes a markdown table of lost pages (by
# kind), exit codes and frame counts into --out. With --bench: frames per second into the
# guest's RX ring, logging off vs on, for each backend (`vhost-dirtylog-check --bench`).
#
# Backends (--backends, comma-separated; default dpdk-txonly,dpdk-tap,ours):
#   dpdk-txonly  testpmd --forward-mode=txonly: testpmd makes the frames (60, 460 or 1514 bytes:
#                --txpkts 60,400,1054 with `set txsplit rand`) and sends them into the guest's
#                RX ring; the checker runs with --traffic none (no TX frames, frame contents
#                not checked)
#   dpdk-tap     testpmd --forward-mode=io between the net_vhost port and a net_tap port
#                (a TAP interface in a private network namespace): the checker injects its
#                numbered frames through the TAP (--traffic tap:IF@NETNS), checks every frame
#                the guest receives and sends TX frames that come back out of the TAP. Root.
#   ours         vhost-dirtylog-net --socket-port (unix datagram port): --traffic socket:PORT
#   ours-tap     vhost-dirtylog-net --tap IF in a private network namespace: --traffic tap. Root.
#
# Usage: contrib/dpdk/check-testpmd.sh [OPTIONS]
#   --runs N            runs per backend, VMM style and fault mode (default 3; --bench: 1)
#   --faults LIST       fault modes, comma-separated (default: none, every --fault kind the
#                       checker knows one at a time, then all of them together: all)
#   --styles LIST       VMM styles: qemu,ch (default both)
#   --backends LIST     see above
#   --duration TIME     checker --duration of each run (default 3s)
#   --queues N          queue pairs (testpmd queues=N, checker --queues N; default 1)
#   --out DIR           where results go (default target/dpdk-check/DATE-TIME)
#   --testpmd PATH      dpdk-testpmd to run (default: target/dpdk/dpdk-testpmd from
#                       get-testpmd.sh, fetched if missing; else the system's dpdk-testpmd)
#   --system-testpmd    use the system's dpdk-testpmd (apt-get install dpdk-dev)
#   --bench             measure instead of check (see above); --bench-phases N (default 200)
#                       and --bench-phase TIME (default 50ms) are passed to the checker
#   --checker-arg ARG   one more argument for every checker run (repeatable)
#   --ours-arg ARG      one more argument for vhost-dirtylog-net (repeatable), e.g.
#                       --ours-arg=--seccomp-action=log
#   --strict            exit 3 if a run of ours (vhost-dirtylog-net) did not pass (for CI;
#                       DPDK's results are findings, never a failure)
#   --ours-bin PATH     vhost-dirtylog-net binary to run as "ours" (e.g. the negative-control
#                       build: cargo build --release --features test-drop-marks)
# The binaries come from ${CARGO_TARGET_DIR:-target}/release (built if missing). testpmd polls
# one CPU at 100% while it runs: one backend runs at a time, and is stopped (SIGINT, then
# SIGKILL) after every run. Exit status: 0 done (whatever the checker found: see the table),
# 1 setup failure, 2 usage, 3 (--strict) a run of ours did not pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO=$PWD
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET/release

RUNS=""
FAULTS=""
STYLES=qemu,ch
BACKENDS=dpdk-txonly,dpdk-tap,ours
DURATION=3s
QUEUES=1
OUT=""
TESTPMD=""
SYSTEM_TESTPMD=0
BENCH=0
STRICT=0
BENCH_PHASES=200
BENCH_PHASE=50ms
CHECKER_ARGS=()
OURS_ARGS=()
NETD=""
while [[ $# -gt 0 ]]; do
	case $1 in
	--runs) RUNS=$2; shift 2 ;;
	--faults) FAULTS=$2; shift 2 ;;
	--styles) STYLES=$2; shift 2 ;;
	--backends) BACKENDS=$2; shift 2 ;;
	--duration) DURATION=$2; shift 2 ;;
	--queues) QUEUES=$2; shift 2 ;;
	--out) OUT=$2; shift 2 ;;
	--testpmd) TESTPMD=$2; shift 2 ;;
	--system-testpmd) SYSTEM_TESTPMD=1; shift ;;
	--bench) BENCH=1; shift ;;
	--strict) STRICT=1; shift ;;
	--bench-phases) BENCH_PHASES=$2; shift 2 ;;
	--bench-phase) BENCH_PHASE=$2; shift 2 ;;
	--checker-arg) CHECKER_ARGS+=("$2"); shift 2 ;;
	--checker-arg=*) CHECKER_ARGS+=("${1#*=}"); shift ;;
	--ours-bin) NETD=$2; shift 2 ;;
	--ours-arg) OURS_ARGS+=("$2"); shift 2 ;;
	--ours-arg=*) OURS_ARGS+=("${1#*=}"); shift ;;
	-h | --help) awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print } /^set -euo/ { exit }' "$0"; exit 0 ;;
	*) echo "check-testpmd.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
[[ -n $RUNS ]] || RUNS=$((BENCH == 1 ? 1 : 3))
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "check-testpmd.sh: --runs must be a positive number" >&2; exit 2; }
[[ $QUEUES =~ ^[1-9][0-9]*$ ]] || { echo "check-testpmd.sh: --queues must be a positive number" >&2; exit 2; }

log() { printf '[check-testpmd %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[check-testpmd] ERROR: %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 not found (it writes the tables)"
if [[ ! -x $BIN/vhost-dirtylog-check || ! -x $BIN/vhost-dirtylog-net ]]; then
	log "building vhost-dirtylog-check and vhost-dirtylog-net (cargo build --release)"
	cargo build --release --bin vhost-dirtylog-check --bin vhost-dirtylog-net >&2 || die "cargo build failed"
fi
CHECK=$BIN/vhost-dirtylog-check
NETD=${NETD:-$BIN/vhost-dirtylog-net}

IFS=, read -r -a backends <<<"$BACKENDS"
IFS=, read -r -a styles <<<"$STYLES"
need_dpdk=0 need_root=0
for b in "${backends[@]}"; do
	case $b in
	dpdk-txonly) need_dpdk=1 ;;
	dpdk-tap) need_dpdk=1 need_root=1 ;;
	ours) ;;
	ours-tap) need_root=1 ;;
	*) die "unknown backend $b (dpdk-txonly, dpdk-tap, ours, ours-tap)" ;;
	esac
done
for s in "${styles[@]}"; do
	[[ $s == qemu || $s == ch ]] || die "unknown VMM style $s (qemu, ch)"
done
if [[ $need_root -eq 1 && $(id -u) -ne 0 ]]; then
	die "the tap backends need root (network namespace, TAP interface): run as root or pass --backends dpdk-txonly,ours"
fi

# The fault modes: none, then every kind the checker names in its error for an unknown one.
if [[ -z $FAULTS ]]; then
	kinds=$("$CHECK" --device net --fault '?' /nonexistent 2>&1 | sed -n 's/.*unknown fault "?" (\(.*\)).*/\1/p' | tr -d ' ') || true
	[[ -n $kinds ]] || kinds="log-resize,mem-table,log-toggle,reconnect,vring-addr,all,none"
	FAULTS=none
	IFS=, read -r -a ks <<<"$kinds"
	for k in "${ks[@]}"; do
		[[ $k == all || $k == none ]] || FAULTS+=",$k"
	done
	FAULTS+=",all"
fi
IFS=, read -r -a faults <<<"$FAULTS"
[[ $BENCH -eq 1 ]] && faults=(bench) styles=(qemu)

if [[ $need_dpdk -eq 1 ]]; then
	if [[ -z $TESTPMD && $SYSTEM_TESTPMD -eq 1 ]]; then
		TESTPMD=$(command -v dpdk-testpmd) || die "no dpdk-testpmd on PATH (apt-get install dpdk-dev, or drop --system-testpmd)"
	fi
	if [[ -z $TESTPMD ]]; then
		TESTPMD=$TARGET/dpdk/dpdk-testpmd
		bash "$REPO/contrib/dpdk/get-testpmd.sh" "$TARGET/dpdk" >/dev/null || die "get-testpmd.sh failed"
	fi
	[[ -x $TESTPMD ]] || die "$TESTPMD is not executable"
fi

OUT=${OUT:-$TARGET/dpdk-check/$(date +%Y%m%d-%H%M%S)$([[ $BENCH -eq 1 ]] && echo -bench)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUNDIR=$(mktemp -d /tmp/vdl-dpdk.XXXXXX)
NETNS=""
BPID=""
EAL_PREFIX=""
ncpu=$(nproc)
# Both lcores (main, forwarding) float over all CPUs: the forwarding one polls at 100%, and
# the scheduler keeps it off whichever CPU the checker needs.
LCORES="0@(0-$((ncpu - 1))),1@(0-$((ncpu - 1)))"

stop_backend() {
	[[ -n $BPID ]] || return 0
	if kill -0 "$BPID" 2>/dev/null; then
		kill -INT "$BPID" 2>/dev/null || true
		local i
		for ((i = 0; i < 100; i++)); do
			kill -0 "$BPID" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$BPID" 2>/dev/null; then
			log "backend $BPID ignored SIGINT for 10 s: SIGKILL"
			kill -KILL "$BPID" 2>/dev/null || true
		fi
	fi
	wait "$BPID" 2>/dev/null || true
	BPID=""
	if [[ -n $EAL_PREFIX ]]; then
		# EAL's runtime directory of this run (empty with --no-shconf --no-telemetry)
		rm -rf "${XDG_RUNTIME_DIR:-/var/run}/dpdk/$EAL_PREFIX" "/var/run/dpdk/$EAL_PREFIX" 2>/dev/null || true
		EAL_PREFIX=""
	fi
}
cleanup() {
	stop_backend
	[[ -n $NETNS ]] && ip netns del "$NETNS" 2>/dev/null || true
	rm -rf "$RUNDIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

netns() {
	[[ -n $NETNS ]] && return 0
	NETNS="vdl-dpdk-$$"
	ip netns add "$NETNS" || die "ip netns add $NETNS failed"
	ip netns exec "$NETNS" ip link set lo up
	# no IPv6 chatter (router solicitations, DAD) on the TAP
	ip netns exec "$NETNS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || true
}

# start_backend NAME SOCK LOG [TXPKTS]: starts backend NAME serving vhost-user at SOCK;
# sets BPID and TRAFFIC (the checker's --traffic).
start_backend() {
	local name=$1 sock=$2 logf=$3 txpkts=${4:-60,400,1054}
	rm -f "$sock"
	local -a eal=(--no-huge --no-pci --no-shconf --no-telemetry -m 512 --lcores "$LCORES"
		--vdev "net_vhost0,iface=$sock,queues=$QUEUES")
	local -a pmd=(--nb-cores=1 --rxq="$QUEUES" --txq="$QUEUES" --total-num-mbufs=16384
		--stats-period 1)
	EAL_PREFIX="vdl-check-$$-$((++NSTART))"
	eal+=(--file-prefix "$EAL_PREFIX")
	case $name in
	dpdk-txonly)
		# 60, 460 or 1514 bytes: one, two or three of the --txpkts segments, at random
		printf 'set txsplit rand\n' >"$RUNDIR/txonly.cmds"
		[[ $txpkts == *,* ]] || : >"$RUNDIR/txonly.cmds"
		"$TESTPMD" "${eal[@]}" -- --forward-mode=txonly --auto-start --txpkts "$txpkts" \
			--cmdline-file "$RUNDIR/txonly.cmds" "${pmd[@]}" </dev/null >"$logf" 2>&1 &
		TRAFFIC=none
		;;
	dpdk-tap)
		netns
		ip netns exec "$NETNS" "$TESTPMD" "${eal[@]}" --vdev "net_tap0,iface=vdltap0" -- \
			--forward-mode=io --auto-start "${pmd[@]}" </dev/null >"$logf" 2>&1 &
		TRAFFIC="tap:vdltap0@$NETNS"
		;;
	ours)
		EAL_PREFIX=""
		"$NETD" --socket-path "$sock" --socket-port "$RUNDIR/port" --queues "$QUEUES" \
			"${OURS_ARGS[@]}" </dev/null >"$logf" 2>&1 &
		TRAFFIC="socket:$RUNDIR/port"
		;;
	ours-tap)
		EAL_PREFIX=""
		netns
		ip netns exec "$NETNS" "$NETD" --socket-path "$sock" --tap vdltap1 --queues "$QUEUES" \
			"${OURS_ARGS[@]}" </dev/null >"$logf" 2>&1 &
		TRAFFIC="tap:vdltap1@$NETNS"
		;;
	esac
	BPID=$!
	local deadline=$((SECONDS + 30))
	until [[ -S $sock ]]; do
		if ! kill -0 "$BPID" 2>/dev/null || ((SECONDS >= deadline)); then
			tail -n 20 "$logf" >&2
			stop_backend
			return 1
		fi
		sleep 0.05
	done
	# testpmd creates the socket before its ports are started; give it a moment
	[[ $name == dpdk-* ]] && sleep 0.5
	return 0
}

version() {
	case $1 in
	dpdk-*)
		if [[ $TESTPMD == "$TARGET/dpdk/dpdk-testpmd" ]]; then
			sed -n 's/.*dpdk-testpmd \([^ ]*\) from Debian.*/DPDK \1 (Debian packages, get-testpmd.sh)/p' "$TESTPMD"
		else
			echo "DPDK $(dpkg-query -W -f '${Version}' dpdk-dev 2>/dev/null || echo '?') ($TESTPMD)"
		fi
		;;
	*) echo "$("$NETD" --version 2>/dev/null | head -n1) ($NETD)" ;;
	esac
}

NSTART=0
: >"$OUT/runs.tsv"
printf 'backend\tstyle\tfault\trun\texit\tjson\tstderr\tbackend_log\tframe_label\n' >"$OUT/runs.tsv"
{
	echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "host: $(uname -r), $ncpu CPU(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "checker: $("$CHECK" --version) ($CHECK)"
	for b in "${backends[@]}"; do echo "$b: $(version "$b")"; done
	echo "queues: $QUEUES, duration: $DURATION, runs: $RUNS, extra checker args: ${CHECKER_ARGS[*]:-none}, extra vhost-dirtylog-net args: ${OURS_ARGS[*]:-none}"
} >"$OUT/env.txt"
total=$((${#backends[@]} * ${#styles[@]} * ${#faults[@]} * RUNS))
n=0
fail_setup=0
for fault in "${faults[@]}"; do
	for style in "${styles[@]}"; do
		for b in "${backends[@]}"; do
			# --bench with testpmd's own frames: 64-byte and 1,500-byte frames, one run each
			txpkts_list=(60,400,1054)
			[[ $fault == bench && $b == dpdk-txonly ]] && txpkts_list=(64 1500) && total=$((total + RUNS))
			for txpkts in "${txpkts_list[@]}"; do
				label=""
				[[ $fault == bench && $b == dpdk-txonly ]] && label="$txpkts B"
				for ((r = 1; r <= RUNS; r++)); do
					n=$((n + 1))
					id="$b.$style.$fault${label:+.${txpkts}B}.$r"
					sock="$RUNDIR/vhost.sock"
					if ! start_backend "$b" "$sock" "$OUT/$id.backend.log" "$txpkts"; then
						log "[$n/$total] $id: backend did not start (see $OUT/$id.backend.log)"
						printf '%s\t%s\t%s\t%s\t%s\t\t\t%s\t%s\n' "$b" "$style" "$fault" "$r" setup \
							"$id.backend.log" "$label" >>"$OUT/runs.tsv"
						fail_setup=$((fail_setup + 1))
						continue
					fi
					args=(--device net --traffic "$TRAFFIC" --queues "$QUEUES" --json --no-progress)
					if [[ $fault == bench ]]; then
						args+=(--bench --bench-phases "$BENCH_PHASES" --bench-phase "$BENCH_PHASE")
					else
						args+=(--vmm-style "$style" --fault "$fault" --duration "$DURATION")
					fi
					rc=0
					timeout 300 "$CHECK" "${args[@]}" "${CHECKER_ARGS[@]}" "$sock" \
						>"$OUT/$id.json" 2>"$OUT/$id.stderr" || rc=$?
					stop_backend
					printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$b" "$style" "$fault" "$r" "$rc" \
						"$id.json" "$id.stderr" "$id.backend.log" "$label" >>"$OUT/runs.tsv"
					log "[$n/$total] $id: exit $rc $(python3 "$REPO/contrib/dpdk/table.py" --one "$OUT/$id.json")"
				done
			done
		done
	done
done

python3 "$REPO/contrib/dpdk/table.py" "$OUT" >"$OUT/results.md" || die "table.py failed"
cat "$OUT/results.md"
log "results: $OUT/results.md (per run: $OUT/*.json, *.stderr, *.backend.log)"
[[ $fail_setup -eq 0 ]] || die "$fail_setup run(s) without a backend (see runs.tsv)"
if [[ $STRICT -eq 1 ]]; then
	bad=$(awk -F'\t' 'NR > 1 && $1 ~ /^ours/ && $5 != "0"' "$OUT/runs.tsv" | wc -l)
	if [[ $bad -gt 0 ]]; then
		log "--strict: $bad run(s) of vhost-dirtylog-net did not pass (see $OUT/results.md)"
		exit 3
	fi
fi
