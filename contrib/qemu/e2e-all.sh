#!/usr/bin/env bash
# The QEMU live-migration end-to-end suite as CI runs it (called by contrib/test-all.sh):
#  1. our daemon, E2E_ROUNDS (default 5) ping-pong migrations under guest I/O: must PASS;
#  2. negative control: a test build of our daemon that drops every mark: the guest must
#     detect the loss (run-e2e.sh --negative exits 0 only then);
#  3. the reference backend, qemu-storage-daemon, and its negative control;
#  4. net: the guest boots on vhost-dirtylog-net (1 and 2 queue pairs) and on QEMU's own
#     -netdev dgram (the reference), net-boot.sh;
#  5. net: E2E_NET_ROUNDS (default 5) ping-pong migrations of a guest receiving a frame
#     stream through vhost-dirtylog-net, and its negative control;
#  before them, queues-default.sh: QEMU -smp 4 without num-queues on the default daemon.
# Every migration (blk and net) is checked page by page: after it completes, the source's
# and the paused destination's RAM files must be identical (tools/ramcmp.py).
# Installs QEMU and the guest kernel first (Debian, as root). Without a usable /dev/kvm the
# guest runs under TCG (slower; the check is the same, see README.md); E2E_ACCEL=kvm makes a
# missing KVM skip the suite instead (exit 77 from run-e2e.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
rounds=${E2E_ROUNDS:-5}
net_rounds=${E2E_NET_ROUNDS:-5}
accel=${E2E_ACCEL:-auto}
out=target/qemu-e2e

step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
run() { bash contrib/qemu/run-e2e.sh --accel "$accel" "$@"; }

step "install QEMU, qemu-storage-daemon and a guest kernel"
bash contrib/qemu/install-deps.sh

step "build the daemons (negative-control builds first, then the real ones)"
cargo build --release --features test-drop-marks --bin vhost-dirtylog-blk --bin vhost-dirtylog-net
mkdir -p target/e2e-bin
cp target/release/vhost-dirtylog-blk target/e2e-bin/vhost-dirtylog-blk-drop-marks
cp target/release/vhost-dirtylog-net target/e2e-bin/vhost-dirtylog-net-drop-marks
cargo build --release --bin vhost-dirtylog-blk --bin vhost-dirtylog-net

step "QEMU defaults: -smp 4 without num-queues on the default daemon (and its negative control)"
set +e
bash contrib/qemu/queues-default.sh --accel "$accel"
rc=$?
set -e
[[ $rc -eq 0 || $rc -eq 77 ]] || { echo "QEMU default-queues test FAILED (exit $rc)"; exit "$rc"; }

set +e
run --backend ours --rounds "$rounds" --out "$out/ours"
rc=$?
set -e
if [[ $rc -eq 77 ]]; then
	echo "!!! /dev/kvm is not usable and E2E_ACCEL=kvm: QEMU end-to-end suite SKIPPED !!!"
	exit 0
fi
[[ $rc -eq 0 ]] || { echo "QEMU e2e with vhost-dirtylog-blk FAILED (exit $rc)"; exit "$rc"; }

step "negative control: our daemon with marking disabled must be caught"
run --backend ours --negative --rounds 3 \
	--daemon target/e2e-bin/vhost-dirtylog-blk-drop-marks --out "$out/ours-negative"

step "reference: qemu-storage-daemon"
set +e
run --backend qsd --rounds "$rounds" --out "$out/qsd"
rc=$?
set -e
if [[ $rc -eq 4 ]]; then
	echo "WARNING: qemu-storage-daemon completed a request after GET_VRING_BASE (known libvhost-user race), not a dirty-log loss"
elif [[ $rc -ne 0 ]]; then
	echo "QEMU e2e with qemu-storage-daemon FAILED (exit $rc)"
	exit "$rc"
fi
run --backend qsd --negative --rounds 3 --out "$out/qsd-negative"

step "net: boot on vhost-dirtylog-net (1 and 2 queue pairs) and on QEMU's -netdev dgram"
bash contrib/qemu/net-boot.sh --accel "$accel" --backend ours --queues 1 --out "$out/net-boot-ours-1"
bash contrib/qemu/net-boot.sh --accel "$accel" --backend ours --queues 2 --out "$out/net-boot-ours-2"
bash contrib/qemu/net-boot.sh --accel "$accel" --backend qemu-dgram --out "$out/net-boot-dgram"

step "net: live migration under a frame stream, RAM compared page by page"
run --device net --rounds "$net_rounds" --out "$out/net"

step "net negative control: vhost-dirtylog-net with marking disabled must be caught"
run --device net --negative --rounds 5 \
	--daemon target/e2e-bin/vhost-dirtylog-net-drop-marks --out "$out/net-negative"

step "summary"
for d in ours ours-negative qsd qsd-negative net net-negative; do
	[[ -f "$out/$d/summary.md" ]] && { echo "--- $d"; cat "$out/$d/summary.md"; }
done
echo "qemu-e2e: 9 passed, 0 failed"
