#!/usr/bin/env bash
# Runs every test of the project: the cargo test suite (unit, integration over real unix
# sockets, fuzz-corpus replay, doc tests), the loom model checks, and the QEMU + KVM live
# migration end-to-end test with its negative control and the qemu-storage-daemon reference.
#
# On a fresh Debian machine run it as root (or with sudo available): it installs QEMU and the
# guest kernel it needs with apt-get (contrib/qemu/install-deps.sh). Without a usable /dev/kvm the
# QEMU part runs under TCG (said loudly).
#
# Environment: E2E_ROUNDS (default 5), SKIP_E2E=1 to run only the cargo tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "cargo test --release (unit, integration, corpus replay, doc tests)"
cargo test --release

step "negative controls: the drop-marks builds of both daemons are caught"
cargo test --release --features test-drop-marks --test blk_log --test net_basic --test check_net drop_marks

if [[ -f tests/loom.rs ]]; then
	step "loom model checks"
	LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-3} RUSTFLAGS="--cfg loom" \
		cargo test --release --test loom --target-dir target/loom
fi

if [[ "${SKIP_E2E:-0}" == 1 ]]; then
	echo "SKIP_E2E=1: QEMU end-to-end test skipped"
	exit 0
fi
if [[ -f contrib/qemu/e2e-all.sh ]]; then
	step "QEMU + KVM live migration end-to-end"
	bash contrib/qemu/e2e-all.sh
fi
