#!/bin/sh
# Launch a guest whose disk is served by vhost-dirtylog-blk, ready for live migration.
#
# vhost-user needs guest RAM the backend can map: a shared memory backend
# (memory-backend-memfd,share=on) bound to a NUMA node. QEMU only allows migrating a
# vhost-user device whose backend offers VHOST_F_LOG_ALL and the LOG_SHMFD protocol
# feature, which vhost-dirtylog-blk does.
#
# Usage: qemu-launch-example.sh DISK.img [GUEST-KERNEL-OR-BOOT-ARGS...]
#   Env: MEM (default 2G), SOCK (default /tmp/vhost-dirtylog-blk.sock),
#        QUEUES (default 2), BACKEND (default vhost-dirtylog-blk in PATH),
#        QEMU (default qemu-system-x86_64)
set -eu

DISK=${1:?usage: $0 DISK.img [extra qemu args...]}
shift
MEM=${MEM:-2G}
SOCK=${SOCK:-/tmp/vhost-dirtylog-blk.sock}
QUEUES=${QUEUES:-2}
BACKEND=${BACKEND:-vhost-dirtylog-blk}
QEMU=${QEMU:-qemu-system-x86_64}

# 1. Start the backend; it serves one frontend at a time and waits for the next after a
#    disconnect (the migration destination's QEMU connects to its own backend instance).
"$BACKEND" --socket-path "$SOCK" --num-queues "$QUEUES" "$DISK" &
BACKEND_PID=$!
trap 'kill "$BACKEND_PID" 2>/dev/null || true' EXIT INT TERM
while [ ! -S "$SOCK" ]; do sleep 0.05; done

# 2. Start the guest. The disk appears as /dev/vda.
"$QEMU" \
    -machine q35,accel=kvm -cpu host -m "$MEM" -smp 2 \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -numa node,memdev=mem \
    -chardev socket,id=vublk0,path="$SOCK" \
    -device vhost-user-blk-pci,chardev=vublk0,num-queues="$QUEUES" \
    -nographic "$@"

# Migration: start the same command on the destination with "-incoming tcp:0:4444" and
# its own backend on the same (shared) disk, then in the source monitor:
#   (qemu) migrate -d tcp:DEST:4444
# The backend marks every page it writes in QEMU's dirty log while the migration runs.
