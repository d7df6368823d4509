#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Stream test frames into a migrating net guest until told to stop: the traffic
source of `run-e2e.sh --device net`. Standard library only; the frames are
netpeer.py's stream frames (kind 3, sizes 60..1514 bytes, patterned body; see
guest/net-init.c), which the guest checks and counts.

--port is a path that the test re-points (a symlink replaced with rename(2))
from the source daemon's packet port to the destination daemon's after each
switch-over: every sendto(2) resolves it anew, so the stream follows the guest.
A port whose daemon takes no frame (no RX buffers, or a stopped source) holds
the sender back (EAGAIN): the frame is retried 1 ms later on whatever the path
names then. A frame counts as sent
when a port accepted it; frames still queued in a stopped source's port, or
held in its daemon's one-frame bounce buffer, are lost with it (the guest then
counts a gap: frame loss across a switch-over is normal for a network and is
reported, not a failure).

Every --progress-s it rewrites --progress FILE (JSON: frames sent, bytes, the
time). On SIGTERM/SIGINT it stops, asks the guest for its counters (kind 4
stats query, answered by the guest through the daemon to --bind) and prints and
writes (--json) the totals: frames sent, and the guest's stream_rx, gap, dup,
bad (a frame whose body did not match: corruption inside the guest's RAM).

Exit: 0 stopped by a signal and the guest answered; 1 the guest did not answer
the final stats query; 2 bad arguments or --bind unusable.
"""
import argparse
import json
import os
import signal
import socket
import struct
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netpeer  # noqa: E402  (pattern, frame layout, Peer.stats)

stop = False


def on_signal(_sig, _frame):
    global stop
    stop = True


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--port", required=True, help="packet port to send to (resolved on every send)")
    ap.add_argument("--bind", required=True, help="our socket (the daemons' --socket-peer)")
    ap.add_argument("--guest-mac", type=netpeer.parse_mac, default=netpeer.parse_mac("52:54:00:12:34:56"))
    ap.add_argument("--mac", type=netpeer.parse_mac, default=netpeer.parse_mac("02:76:64:6c:00:01"))
    ap.add_argument("--rate", type=float, default=0,
                    help="frames per second at most (default 0: as fast as the port takes them)")
    ap.add_argument("--seq-start", type=int, default=1000000)
    ap.add_argument("--frame-size", type=int, default=0,
                    help="every frame this many bytes (60..1514; default 0: netpeer's sizes 60..1514)")
    ap.add_argument("--progress", help="JSON progress file, rewritten every --progress-s")
    ap.add_argument("--progress-s", type=float, default=0.5)
    ap.add_argument("--json", help="final totals as JSON")
    ap.add_argument("--timeout", type=float, default=10.0, help="final stats query, seconds")
    a = ap.parse_args()
    if a.frame_size and not netpeer.MIN_FRAME <= a.frame_size <= netpeer.MAX_FRAME:
        ap.error("--frame-size must be 60..1514")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        p = netpeer.Peer(a.port, a.bind, a.mac, a.guest_mac, a.timeout)
    except OSError as e:
        print(f"netstream: cannot bind {a.bind}: {e}", file=sys.stderr)
        return 2
    sock = p.socks[0]
    # Non-blocking, with a short sleep on EAGAIN: poll(2) on an unconnected
    # unix datagram socket says nothing about the receiver's queue.
    sock.setblocking(False)
    t0 = time.monotonic()
    sent = nbytes = blocked = 0
    last_progress = 0.0
    gap = 1.0 / a.rate if a.rate else 0
    k = 0
    f = None
    while not stop:
        if f is None:
            f = netpeer.build(p.guest_mac, p.mac, netpeer.STREAM, a.seq_start + k,
                              a.frame_size or netpeer.frame_size(k))
            f[19] = 0  # stream 0
            struct.pack_into(">I", f, 26, 1)  # stride 1
            f = bytes(f)
        try:
            sock.sendto(f, a.port)
            sent += 1
            nbytes += len(f)
            k += 1
            f = None
            if gap:
                time.sleep(gap)
        except (socket.timeout, BlockingIOError):
            blocked += 1  # the port's queue is full: the guest has no RX buffers
            time.sleep(0.001)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            blocked += 1  # the port is being replaced
            time.sleep(0.05)
        # drain whatever the guest sends (stats answers to nobody, other frames)
        try:
            while True:
                sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, socket.timeout):
            pass
        now = time.monotonic()
        if a.progress and now - last_progress >= a.progress_s:
            last_progress = now
            write_json(a.progress, {"sent": sent, "bytes": nbytes, "blocked": blocked,
                                    "seconds": round(now - t0, 3), "last_seq": a.seq_start + k - 1})
    secs = time.monotonic() - t0
    sock.settimeout(1.0)  # the stats query may wait for room in the port
    try:
        st = p.stats(0xFFFF0002)
    except OSError as e:
        print(f"netstream: final stats query: {e}", file=sys.stderr)
        st = None
    res = {"sent": sent, "bytes": nbytes, "blocked": blocked, "seconds": round(secs, 3),
           "first_seq": a.seq_start, "last_seq": a.seq_start + k - 1,
           "frames_per_s": round(sent / secs, 1) if secs > 0 else 0, "guest": st,
           "other_frames": p.other}
    if a.progress:
        write_json(a.progress, res)
    if a.json:
        write_json(a.json, res)
    p.close()
    if st is None:
        print(f"netstream: {sent} frames sent in {secs:.1f} s; the guest did not answer the final stats query")
        return 1
    print(f"netstream: {sent} frames ({nbytes} bytes) sent in {secs:.1f} s; guest: stream {st['stream_rx']} "
          f"gap {st['gap']} dup {st['dup']} bad {st['bad']} (last seq {st['last_stream_seq']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
