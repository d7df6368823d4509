#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# vhost-dirtylog-blk against qemu-storage-daemon under the same load, in one run.
#
# Both daemons serve equal 1 GiB raw images on the same file system (the first 256 MiB hold the
# checker's pattern, written once with `vhost-dirtylog-check --write-image`). For each
# configuration below both are started fresh, the same `vhost-dirtylog-check --bench` load (4 KiB
# random reads over 256 MiB, logging off and on in alternating phases) runs against both (ABBA
# order), and the script prints IOPS (mean of the two halves), the logging overhead and the ratio:
#
#   direct-1q-qd32   ours --direct               vs qsd aio=io_uring,cache.direct=on   1 queue,  QD32
#   direct-2q-qd16   ours --direct --num-queues 2 vs qsd aio=io_uring,cache.direct=on   2 queues, QD16
#   cache-1q-qd32    ours (page cache)           vs qsd aio=io_uring,cache.direct=off  1 queue,  QD32
#   threads-1q-qd32  ours --direct               vs qsd aio=threads,cache.direct=on    1 queue,  QD32
#
# Usage: contrib/bench/blk-vs-qsd.sh [--dir DIR] [--phases N] [--phase TIME] [--only NAME]...
#                                    [--aio MODE]
#   --dir DIR     where the images go (default: target/bench-qsd; must support O_DIRECT, so not
#                 tmpfs)
#   --phases N    --bench-phases per backend and configuration (multiple of 8; default 200),
#                 run as two halves in ABBA order (ours, qsd, qsd, ours)
#   --phase TIME  --bench-phase per run (default 50ms)
#   --only NAME   run only this configuration (repeatable)
#   --aio MODE    pass --aio MODE to vhost-dirtylog-blk (default: its own default, io_uring)
# Needs: cargo build --release (the binaries are taken from ${CARGO_TARGET_DIR:-target}/release),
# qemu-storage-daemon (Debian: qemu-utils or qemu-system-x86), python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

BIN=${CARGO_TARGET_DIR:-target}/release
DIR=${CARGO_TARGET_DIR:-target}/bench-qsd
PHASES=200
PHASE=50ms
ONLY=()
AIO=()
while [[ $# -gt 0 ]]; do
	case $1 in
	--dir) DIR=$2; shift 2 ;;
	--phases) PHASES=$2; shift 2 ;;
	--phase) PHASE=$2; shift 2 ;;
	--only) ONLY+=("$2"); shift 2 ;;
	--aio) AIO=(--aio "$2"); shift 2 ;;
	-h | --help) sed -n '4,27s/^# \{0,1\}//p' "$0"; exit 0 ;;
	*) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done

die() { echo "blk-vs-qsd: $*" >&2; exit 1; }
for b in "$BIN/vhost-dirtylog-blk" "$BIN/vhost-dirtylog-check"; do
	[[ -x $b ]] || die "$b missing: run cargo build --release first"
done
QSD=$(command -v qemu-storage-daemon) || die "qemu-storage-daemon not found (Debian: apt-get install qemu-utils)"
command -v python3 >/dev/null || die "python3 not found"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [[ $(stat -f -c %T "$DIR") == tmpfs ]]; then
	die "$DIR is on tmpfs, which has no O_DIRECT; pass --dir on a real file system"
fi

PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	PIDS=()
}
trap cleanup EXIT

wait_sock() {
	for _ in $(seq 200); do
		[[ -S $1 ]] && return 0
		sleep 0.05
	done
	die "no socket $1 (see $DIR/*.log)"
}

echo "# images in $DIR ($(stat -f -c %T "$DIR")), $(nproc) CPUs, $(uname -r), $("$QSD" --version | head -1)"
if [[ ! -f $DIR/pattern.img ]]; then
	"$BIN/vhost-dirtylog-check" --write-image "$DIR/pattern.img" --disk-span 256M >/dev/null
fi
for img in ours qsd; do
	cp "$DIR/pattern.img" "$DIR/$img.img"
	truncate -s 1G "$DIR/$img.img"
done
sync

# name  ours-args  qsd-blockdev-options  queues  depth
CONFIGS=(
	"direct-1q-qd32|--direct --num-queues 1|aio=io_uring,cache.direct=on|1|32"
	"direct-2q-qd16|--direct --num-queues 2|aio=io_uring,cache.direct=on|2|16"
	"cache-1q-qd32|--num-queues 1|aio=io_uring,cache.direct=off|1|32"
	"threads-1q-qd32|--direct --num-queues 1|aio=threads,cache.direct=on|1|32"
)

bench() { # socket queues depth -> JSON on stdout
	"$BIN/vhost-dirtylog-check" --bench --queues "$2" --depth "$3" --disk-span 256M --no-prepare \
		--bench-phases "$((PHASES / 2))" --bench-phase "$PHASE" --json --no-progress "$1"
}

RESULTS=()
for c in "${CONFIGS[@]}"; do
	IFS='|' read -r name ours_args qsd_opts nq depth <<<"$c"
	if [[ ${#ONLY[@]} -gt 0 && ! " ${ONLY[*]} " == *" $name "* ]]; then
		continue
	fi
	rm -f "$DIR/ours.sock" "$DIR/qsd.sock"
	# shellcheck disable=SC2086
	RUST_LOG=warn "$BIN/vhost-dirtylog-blk" --socket-path "$DIR/ours.sock" $ours_args "${AIO[@]}" \
		"$DIR/ours.img" >"$DIR/ours-$name.log" 2>&1 &
	PIDS+=($!)
	"$QSD" --blockdev "driver=file,node-name=file0,filename=$DIR/qsd.img,$qsd_opts" \
		--export "type=vhost-user-blk,id=e0,node-name=file0,addr.type=unix,addr.path=$DIR/qsd.sock,writable=on,num-queues=$nq" \
		>"$DIR/qsd-$name.log" 2>&1 &
	PIDS+=($!)
	wait_sock "$DIR/ours.sock"
	wait_sock "$DIR/qsd.sock"
	echo "# $name: ours [$ours_args ${AIO[*]}] vs qsd [$qsd_opts], $nq queue(s) x QD$depth" >&2
	# ABBA order (ours, qsd, qsd, ours; half the phases each), so drift and the other side's
	# after-effects (cache, CPU frequency) hit both alike.
	o1=$(bench "$DIR/ours.sock" "$nq" "$depth") || die "bench against ours failed ($name)"
	q1=$(bench "$DIR/qsd.sock" "$nq" "$depth") || die "bench against qemu-storage-daemon failed ($name)"
	q2=$(bench "$DIR/qsd.sock" "$nq" "$depth") || die "bench against qemu-storage-daemon failed ($name)"
	o2=$(bench "$DIR/ours.sock" "$nq" "$depth") || die "bench against ours failed ($name)"
	RESULTS+=("$name|$o1|$o2|$q1|$q2")
	cleanup
done

printf '%s\n' "${RESULTS[@]}" | python3 -c '
import json, sys
def mean(a, b, k):
    return (a[k] + b[k]) / 2
print()
print("| configuration | ours off | ours on | ours overhead (median) | qsd off | qsd on | qsd overhead (median) | ours/qsd off | ours/qsd on |")
print("|---|---|---|---|---|---|---|---|---|")
for line in sys.stdin:
    if not line.strip():
        continue
    name, *runs = line.rstrip("\n").split("|")
    o1, o2, q1, q2 = (json.loads(r) for r in runs)
    oo, on, qo, qn = mean(o1, o2, "iops_off"), mean(o1, o2, "iops_on"), mean(q1, q2, "iops_off"), mean(q1, q2, "iops_on")
    print("| %s | %s | %s | %.2f%% | %s | %s | %.2f%% | %.2fx | %.2fx |" % (
        name, format(round(oo), ","), format(round(on), ","), mean(o1, o2, "overhead_median_pct"),
        format(round(qo), ","), format(round(qn), ","), mean(q1, q2, "overhead_median_pct"),
        oo / qo, on / qn))
'
