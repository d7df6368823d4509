#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# A depth run of one fuzz target: one libFuzzer process per CPU (each pinned with taskset, all
# sharing one working corpus, as libFuzzer's own -jobs mode does), until the processes together
# reach --runs executions or --time runs out. Prints one Markdown row for contrib/fuzz/README.md.
#
# Usage: contrib/fuzz/run-depth.sh TARGET [--runs N] [--time SECONDS] [--cpus N] [--work DIR]
#   TARGET        log_region | merge | backend_messages | blk_request
#   --runs N      executions in total (default 1000000), split evenly over the processes
#   --time S      wall-clock limit per process (default 1800)
#   --cpus N      processes, one per allowed CPU (default: the CPUs taskset allows, at most 8)
#   --work DIR    working corpus and logs, relative to where you run this (default
#                 <repo>/target/fuzz-depth/TARGET); its corpus/ and fuzz-*.log are replaced,
#                 then corpus/ is seeded from contrib/fuzz/corpus/TARGET
# Build first (ASan, debug assertions on, no compare tracing; see contrib/fuzz/README.md):
#   RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir contrib/fuzz --no-trace-compares
# A crash stops that process; its input lands in contrib/fuzz/artifacts/TARGET/ (copy it to
# artifacts-regressions/TARGET/ to keep it) and the script exits 1; bad arguments exit 2.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
usage() { sed -n '4,19s/^# \{0,1\}//p' "$0"; }
die() { echo "run-depth: $*" >&2; exit 2; }
[[ $# -ge 1 ]] || die "usage: $0 TARGET [--runs N] [--time SECONDS] [--cpus N] [--work DIR] (see --help)"
TARGET=$1; shift
case $TARGET in
log_region | merge | backend_messages | blk_request) ;;
-h | --help) usage; exit 0 ;;
*) die "unknown target $TARGET (see --help)" ;;
esac
RUNS=1000000
TIME=1800
CPUS=$(nproc)
((CPUS > 8)) && CPUS=8
WORK=$ROOT/target/fuzz-depth/$TARGET
while [[ $# -gt 0 ]]; do
	case $1 in
	-h | --help) usage; exit 0 ;;
	--runs | --time | --cpus | --work)
		[[ $# -ge 2 ]] || die "$1 needs a value"
		case $1 in
		--runs) RUNS=$2 ;;
		--time) TIME=$2 ;;
		--cpus) CPUS=$2 ;;
		--work) WORK=$2 ;;
		esac
		shift 2
		;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done
for v in RUNS TIME CPUS; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# Only this script's own files are removed, so a mistyped --work cannot wipe a tree.
[[ $WORK != "$ROOT" && $WORK != / ]] || die "--work $WORK: refusing the repository or /"
rm -rf "$WORK/corpus" "$WORK"/fuzz-*.log
cd "$ROOT"
BIN=contrib/fuzz/target/x86_64-unknown-linux-gnu/release/$TARGET
[[ -x $BIN ]] || die "$BIN missing: build it first (see --help)"
ART=contrib/fuzz/artifacts/$TARGET
mkdir -p "$WORK/corpus" "$ART"
cp contrib/fuzz/corpus/"$TARGET"/* "$WORK/corpus/"
PER=$(((RUNS + CPUS - 1) / CPUS))
CPU_LIST=($(taskset -pc $$ | sed 's/.*: //' | tr ',' '\n' | while IFS=- read -r a b; do seq "$a" "${b:-$a}"; done))
((${#CPU_LIST[@]} >= CPUS)) || die "only ${#CPU_LIST[@]} CPUs allowed, --cpus $CPUS"

echo "# $TARGET: $CPUS process(es) x $PER runs, at most ${TIME}s, $(git describe --always --dirty), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
start=$(date +%s.%N)
pids=()
for ((i = 0; i < CPUS; i++)); do
	ASAN_OPTIONS=detect_odr_violation=0 taskset -c "${CPU_LIST[$i]}" "$BIN" "$WORK/corpus" \
		-runs="$PER" -max_total_time="$TIME" -seed=$((i + 1)) -reload=30 -print_final_stats=1 \
		-artifact_prefix="$ART/" >"$WORK/fuzz-$i.log" 2>&1 &
	pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
end=$(date +%s.%N)

python3 - "$TARGET" "$WORK" "$CPUS" "$start" "$end" "$rc" <<'EOF'
import re, sys, pathlib
target, work, cpus, start, end, rc = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
runs, cov, ft = 0, 0, 0
for i in range(cpus):
    log = (work / f"fuzz-{i}.log").read_text(errors="replace")
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    runs += int(m.group(1)) if m else 0
    for m in re.finditer(r"cov: (\d+) ft: (\d+)", log):
        cov, ft = max(cov, int(m.group(1))), max(ft, int(m.group(2)))
secs = end - start
corpus = sum(1 for p in (work / "corpus").iterdir() if p.is_file())
print(f"| `{target}` | {runs:,} | {secs:.0f} s ({cpus} processes) | {runs / secs:,.0f} | {cov:,} | {ft:,} | {corpus:,} | {'none' if rc == 0 else 'CRASH: see ' + str(work) + '/fuzz-*.log'} |")
EOF
exit "$rc"
