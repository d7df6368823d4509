#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""The host end of the network guest test: send patterned Ethernet frames to a
packet port (a unix datagram socket carrying one frame per datagram) and check
the guest's answers byte for byte. Standard library only.

The port is either QEMU's own `-netdev dgram,local.type=unix,local.path=PORT,
remote.type=unix,remote.path=BIND` (the reference) or the `--socket-port PORT`
of vhost-dirtylog-net, with `--socket-peer BIND`. The guest is
contrib/qemu/guest/net-init.c; the frame layout is documented there and in
guest/net-pattern.h (keep this file in step with both).

Modes:
  echo    (default) K echo requests, frame sizes 60..1514 bytes (60 and 1514
          first, then 60 + (i * 677) mod 1455, which visits every size in
          between), at most --window in flight. Each answer must equal the
          request with the MACs swapped, kind 2, flags 1 (the guest found the
          body intact), guest_seq = the guest's echo count (consecutive) and the
          CRC-32 of the body: any other byte fails. --corrupt-every M corrupts
          one body byte of every M-th request: the guest must flag exactly
          those (flags 0) and count them as bad (a check that the guest's own
          verification works).
  stream  K stream frames (no answers), then a stats query: the guest must
          have received all K in order (no gap, no dup, no bad frame). Every
          --sync-every frames (64) it waits, asking the guest's counters,
          until the guest has them all: flow control for ports that drop
          frames the guest has no room for (a TAP, DPDK's AF_PACKET port);
          a unix datagram port blocks the sender instead.
Both modes ask the guest for its counters before and after (kind 4 / 5) and
print the differences.

--unordered (for a guest with several workers, one per queue pair, whose
answers may leave in any order): the guest's sequence numbers of the echo
answers must be exactly base+1..base+K in any order, the rest of each answer is
still compared byte for byte; a stream must arrive complete and intact, its
order is not checked (the guest's gap/dup counters are printed only). Without
it, a stream over several pairs is checked per pair (stream id = pair in the
flags byte, stride = pairs in the guest_seq field): each pair must deliver its
frames in order.

--pairs N (vhost-dirtylog-net with --queues N): queue pair k > 0 has its own
port PORT.k and peer socket BIND.k; requests go round-robin over the pairs
(the answers are then unordered), and the summary shows which pair each
answer came back on.

--iface IFNAME talks through an AF_PACKET socket on a network interface (a TAP
in a test network namespace, root needed) instead of a unix datagram port.

Exit: 0 every check passed, 1 a check failed (lost, wrong or unexpected
answer), 2 bad arguments or the port is unusable.

    netpeer.py --port /tmp/p/qemu.sock --bind /tmp/p/peer.sock --frames 500
    netpeer.py --self-test     # the checker against a correct and broken fakes
"""
import argparse
import json
import os
import select
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib

ETHERTYPE = 0x88B5
MAGIC = b"VDLN"
HDR = 34
ECHO_REQ, ECHO_REPLY, STREAM, STATS_REQ, STATS_REPLY = 1, 2, 3, 4, 5
STATS_FIELDS = ("rx", "tx", "bad", "gap", "dup", "stream_rx", "last_stream_seq")
STATS_LEN = 128  # >= HDR + 7 * 8
MIN_FRAME, MAX_FRAME = 60, 1514


def _mix32(x):
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    return x


# net-pattern.h: vdl_net_table, vdl_net_body_ok
TABLE = bytes(_mix32(j) & 0xFF for j in range(65536 + 2048))
XOR = [bytes(b ^ k for b in range(256)) for k in range(256)]


def pattern(seq, n):
    """Body bytes 0..n-1 (n <= 2048) of frame seq."""
    off = ((seq * 0x9E3779B1) & 0xFFFFFFFF) >> 16
    return TABLE[off:off + n].translate(XOR[seq & 0xFF])


def frame_size(i):
    if i == 0:
        return MIN_FRAME
    if i == 1:
        return MAX_FRAME
    return MIN_FRAME + (i * 677) % (MAX_FRAME - MIN_FRAME + 1)


def parse_mac(s):
    parts = s.split(":")
    if len(parts) != 6:
        raise argparse.ArgumentTypeError(f"bad MAC {s!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad MAC {s!r}") from None


def mac_str(b):
    return ":".join(f"{x:02x}" for x in b)


def build(dst, src, kind, seq, size, body=True):
    f = bytearray(size)
    f[0:6], f[6:12] = dst, src
    struct.pack_into(">H4sBBHIII", f, 12, ETHERTYPE, MAGIC, kind, 0, size, seq, 0, 0)
    if body:
        f[HDR:] = pattern(seq, size - HDR)
    return f


def pair_path(path, k):
    """Queue pair k's socket: PATH for pair 0, PATH.k after (vhost-dirtylog-net)."""
    return path if k == 0 else f"{path}.{k}"


class Peer:
    """Our end of the packet port(s): one socket per queue pair."""

    def __init__(self, port, bind, mac, guest_mac, timeout, iface=None, pairs=1):
        self.port, self.bind_path, self.mac, self.guest_mac = port, bind, mac, guest_mac
        self.timeout, self.pairs = timeout, pairs
        self.other = 0  # frames that are not answers to us
        self.socks = []
        if iface:
            self.bind_path = None
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
            s.bind((iface, ETHERTYPE))
            self.socks.append(s)
            self.pairs = 1
        else:
            for k in range(pairs):
                path = pair_path(bind, k)
                if os.path.exists(path):
                    os.unlink(path)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.socks.append(s)
                s.bind(path)
        for s in self.socks:
            s.settimeout(timeout)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def close(self):
        for s in self.socks:
            s.close()
        if self.bind_path:
            for k in range(self.pairs):
                try:
                    os.unlink(pair_path(self.bind_path, k))
                except OSError:
                    pass

    def send(self, f, k=0):
        """Send frame f into queue pair k (its own port and socket)."""
        if self.bind_path is None:
            self.socks[0].send(bytes(f))
        else:
            self.socks[k].sendto(bytes(f), pair_path(self.port, k))

    def recv(self, timeout):
        """(frame, pair) of ours (EtherType and dst MAC), or (None, None) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, None
            r, _, _ = select.select(self.socks, [], [], left)
            if not r:
                return None, None
            for s in r:
                f = s.recv(65536)
                if (len(f) >= HDR and f[0:6] == self.mac and f[12:14] == b"\x88\xb5"
                        and f[14:18] == MAGIC):
                    return f, self.socks.index(s)
                self.other += 1

    def stats(self, seq, tries=5):
        """Ask the guest for its counters (kind 4); None if it never answers."""
        for _ in range(tries):
            self.send(build(self.guest_mac, self.mac, STATS_REQ, seq, STATS_LEN))
            deadline = time.monotonic() + self.timeout / tries
            while time.monotonic() < deadline:
                f, _ = self.recv(deadline - time.monotonic())
                if f is None:
                    break
                if f[18] == STATS_REPLY and struct.unpack_from(">I", f, 22)[0] == seq:
                    return dict(zip(STATS_FIELDS, struct.unpack_from(">7Q", f, HDR)))
                self.other += 1
        return None


def run_echo(p, a, res):
    frames, window, corrupt = a.frames, a.window, a.corrupt_every
    outstanding = {}  # seq -> (k, request bytes as sent, expected flags)
    base = None  # guest echo count before our first request
    gseqs = set()  # --unordered: the guest sequence numbers seen
    ok = wrong = unexpected = corrupted = flagged = 0
    first_wrong = None
    k = 0  # echo requests sent
    pairs = p.pairs
    # several queue pairs (and several guest workers) answer in any order
    unordered = a.unordered or pairs > 1
    sent_on, answered_on, same_pair = [0] * pairs, [0] * pairs, 0
    last_progress = time.monotonic()
    t0 = time.monotonic()
    while k < frames or outstanding:
        while k < frames and len(outstanding) < window:
            seq = a.seq_start + k
            f = build(p.guest_mac, p.mac, ECHO_REQ, seq, frame_size(k))
            flags = 1
            if corrupt and (k + 1) % corrupt == 0:
                f[HDR + (k % (len(f) - HDR))] ^= 0x5A
                flags = 0
                corrupted += 1
            k += 1
            pair = (k - 1) % pairs
            outstanding[seq] = (k, bytes(f), flags, pair)
            sent_on[pair] += 1
            p.send(f, pair)
        f, got_pair = p.recv(0.2)
        if f is None:
            if time.monotonic() - last_progress > a.timeout:
                break
            continue
        if f[18] != ECHO_REPLY:
            unexpected += 1
            continue
        seq = struct.unpack_from(">I", f, 22)[0]
        if seq not in outstanding:
            unexpected += 1
            continue
        last_progress = time.monotonic()
        kk, req, flags, pair = outstanding.pop(seq)
        answered_on[got_pair] += 1
        same_pair += got_pair == pair
        gseq = struct.unpack_from(">I", f, 26)[0]
        if base is None:
            base = gseq - kk
        exp = bytearray(req)
        exp[0:6], exp[6:12] = p.mac, p.guest_mac
        exp[18], exp[19] = ECHO_REPLY, flags
        want_gseq = (base + kk) & 0xFFFFFFFF
        if unordered:
            want_gseq = gseq if gseq not in gseqs else None
            gseqs.add(gseq)
        struct.pack_into(">II", exp, 26, 0 if want_gseq is None else want_gseq,
                         zlib.crc32(req[HDR:]))
        if f == exp:
            ok += 1
            flagged += flags == 0
        else:
            wrong += 1
            if first_wrong is None:
                if len(f) != len(exp):
                    first_wrong = f"seq {seq}: length {len(f)}, expected {len(exp)}"
                else:
                    off = next(i for i in range(len(f)) if f[i] != exp[i])
                    first_wrong = (f"seq {seq} ({len(f)} bytes): byte {off} is 0x{f[off]:02x}, "
                                   f"expected 0x{exp[off]:02x}")
    secs = time.monotonic() - t0
    if unordered and ok == frames and not outstanding:
        # K distinct guest sequence numbers: they must be consecutive
        lo = min(gseqs)
        if max(gseqs) - lo != frames - 1:
            wrong += 1
            first_wrong = (f"guest sequence numbers {lo}..{max(gseqs)} are not "
                           f"{frames} consecutive numbers")
    if pairs > 1:
        res.update(pairs_sent="/".join(map(str, sent_on)),
                   pairs_answered="/".join(map(str, answered_on)), same_pair=same_pair)
    res.update(sent=k, ok=ok, wrong=wrong, lost=len(outstanding), unexpected=unexpected,
               corrupted=corrupted, flagged=flagged, seconds=round(secs, 3),
               frames_per_s=round(ok / secs, 1) if secs > 0 else 0)
    if first_wrong:
        res["first_wrong"] = first_wrong
    if outstanding:
        res["first_lost_seq"] = min(outstanding)
    good = ok == frames and wrong == 0 and not outstanding and unexpected == 0
    return good


def wait_stream(p, base, want, query_seq):
    """Ask the guest's counters until it has received `want` stream frames
    since `base`, or its count stops moving for a second; returns the count."""
    got, last_move, last = 0, time.monotonic(), -1
    while time.monotonic() - last_move < 1.0:
        st = p.stats(query_seq)
        if st is None:
            return got
        got = st["stream_rx"] - base["stream_rx"]
        if got >= want:
            return got
        if got != last:
            last, last_move = got, time.monotonic()
        time.sleep(0.01)
    return got


def run_stream(p, a, res, before):
    t0 = time.monotonic()
    gap = 1.0 / a.rate if a.rate else 0
    syncs = 0
    for k in range(a.frames):
        if a.sync_every and k and k % a.sync_every == 0:
            # flow control: a port that drops when the guest's ring is full
            # (a TAP, DPDK's AF_PACKET port) would otherwise lose frames
            wait_stream(p, before, k, 0xFFFE0000 + syncs % 0xFFFF)
            syncs += 1
        # frame k goes to pair k % pairs as part of stream (pair), stride pairs:
        # each pair's frames stay in order through the device, so the guest's
        # gap/dup counters must stay 0 with several pairs too
        f = build(p.guest_mac, p.mac, STREAM, a.seq_start + k, frame_size(k))
        f[19] = k % p.pairs
        struct.pack_into(">I", f, 26, p.pairs)
        p.send(f, k % p.pairs)
        if gap:
            time.sleep(gap)
    res.update(sent=a.frames, seconds=round(time.monotonic() - t0, 3), syncs=syncs)
    return True


def run(a):
    """One run; returns (passed, result dict)."""
    res = {"mode": a.mode, "frames": a.frames, "port": a.port}
    try:
        p = Peer(a.port, a.bind, a.mac, a.guest_mac, a.timeout, a.iface, a.pairs)
    except OSError as e:
        res["error"] = f"cannot bind {a.iface or a.bind}: {e}"
        return None, res
    try:
        before = p.stats(0xFFFF0000)
        if before is None:
            res["error"] = "the guest does not answer stats queries"
            return False, res
        if a.mode == "echo":
            good = run_echo(p, a, res)
        else:
            good = run_stream(p, a, res, before)
        # Stream frames may still be in flight to the guest; ask until the
        # count is complete or stops moving.
        after, t_end = None, time.monotonic() + a.timeout
        while time.monotonic() < t_end:
            after = p.stats(0xFFFF0001)
            if after is None or a.mode != "stream":
                break
            if after["stream_rx"] - before["stream_rx"] >= a.frames:
                break
            time.sleep(0.2)
        if after is None:
            res["error"] = "the guest stopped answering stats queries"
            return False, res
        d = {k: after[k] - before[k] for k in STATS_FIELDS if k != "last_stream_seq"}
        res["guest_delta"] = d
        if a.mode == "echo":
            good = good and d["bad"] == res["corrupted"] == res["flagged"]
        else:
            good = (d["stream_rx"] == a.frames and d["bad"] == 0
                    and after["last_stream_seq"] == a.seq_start + a.frames - 1
                    and (a.unordered or (d["gap"] == 0 and d["dup"] == 0)))
            res["last_stream_seq"] = after["last_stream_seq"]
        res["other_frames"] = p.other
        return good, res
    except OSError as e:
        res["error"] = f"port {a.port}: {e}"
        return None, res
    finally:
        p.close()


def summary(good, res):
    head = "PASS" if good else "FAIL"
    if res.get("error"):
        return f"netpeer: {head}: {res['error']}"
    g = res.get("guest_delta", {})
    gs = " ".join(f"{k} {v}" for k, v in g.items())
    if res["mode"] == "echo":
        s = (f"netpeer: {head}: echo {res['sent']} sent, {res['ok']} answered byte for byte, "
             f"{res['wrong']} wrong, {res['lost']} lost, {res['unexpected']} unexpected; "
             f"corrupted {res['corrupted']} / flagged by guest {res['flagged']}; "
             f"{res['frames_per_s']} frames/s; guest: {gs}")
        if "pairs_sent" in res:
            s += (f"; queue pairs: sent {res['pairs_sent']}, answers on {res['pairs_answered']}, "
                  f"{res['same_pair']} on the pair of their request")
    else:
        s = (f"netpeer: {head}: stream {res['sent']} sent in {res['seconds']} s "
             f"({res.get('syncs', 0)} syncs); guest: {gs}; "
             f"last seq {res.get('last_stream_seq')}")
    if res.get("first_wrong"):
        s += f"\nnetpeer: first wrong answer: {res['first_wrong']}"
    if "first_lost_seq" in res:
        s += f"\nnetpeer: first unanswered seq {res['first_lost_seq']}"
    return s


# ---------------------------------------------------------------- self-test

class FakeGuest(threading.Thread):
    """The guest's logic (net-init.c: handle()) in Python, with optional faults."""

    def __init__(self, path, mac, fault=None, pairs=1):
        super().__init__(daemon=True)
        self.socks = []
        for k in range(pairs):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(pair_path(path, k))
            self.socks.append(s)
        self.mac, self.fault, self.stop = mac, fault, False
        self.c = dict.fromkeys(STATS_FIELDS, 0)
        self.echo = 0
        self.streams = {}  # stream id -> last seq

    def run(self):
        c = self.c
        while not self.stop:
            r, _, _ = select.select(self.socks, [], [], 0.2)
            if not r:
                continue
            sock = r[0]
            f, addr = sock.recvfrom(65536)
            if self.fault == "cross" and len(self.socks) > 1:  # answer on the other pair
                sock = self.socks[(self.socks.index(sock) + 1) % len(self.socks)]
                addr = addr[:-2] if addr.endswith(".1") else addr + ".1"
            f = bytearray(f)
            c["rx"] += 1
            kind = f[18]
            flen, seq = struct.unpack_from(">HI", f, 20)
            ok = flen == len(f) and f[HDR:] == pattern(seq, len(f) - HDR)
            c["bad"] += not ok
            f[0:6], f[6:12] = f[6:12], self.mac
            if kind == ECHO_REQ:
                self.echo += 1
                if self.fault == "drop" and self.echo == 7:
                    continue
                f[18], f[19] = ECHO_REPLY, int(ok)
                if self.fault == "noflag":
                    f[19] = 1
                gseq = self.echo
                if self.fault == "unordered":  # swap the numbers of pairs
                    gseq = self.echo + 1 if self.echo % 2 else self.echo - 1
                if self.fault == "unordered-dup" and self.echo == 9:
                    gseq = 8
                struct.pack_into(">II", f, 26, gseq, zlib.crc32(f[HDR:]))
                if self.fault == "flip" and self.echo == 5:
                    f[-1] ^= 1
                if self.fault == "crc" and self.echo == 3:
                    f[30] ^= 0x80
                sock.sendto(bytes(f), addr)
                c["tx"] += 1
                if self.fault == "dup" and self.echo == 4:
                    sock.sendto(bytes(f), addr)
            elif kind == STREAM:
                if self.fault in ("drop", "pairs-drop") and seq % 10 == 3:
                    continue
                if ok:
                    sid, stride = f[19] & 15, struct.unpack_from(">I", f, 26)[0] or 1
                    if sid in self.streams:
                        nxt = self.streams[sid] + stride
                        if seq > nxt:
                            c["gap"] += (seq - nxt + stride - 1) // stride
                        elif seq < nxt:
                            c["dup"] += 1
                    self.streams[sid] = max(seq, self.streams.get(sid, seq))
                    c["last_stream_seq"] = max(seq, c["last_stream_seq"])
                    c["stream_rx"] += 1
            elif kind == STATS_REQ:
                f[18], f[19] = STATS_REPLY, 1
                c["tx"] += 1
                struct.pack_into(">7Q", f, HDR, *(c[k] for k in STATS_FIELDS))
                sock.sendto(bytes(f), addr)


def self_test(a):
    """The checker must pass a correct guest and fail every broken one."""
    cases = [
        ("echo", None, 0, True), ("echo", None, 5, True), ("echo", "flip", 0, False),
        ("echo", "crc", 0, False), ("echo", "drop", 0, False), ("echo", "dup", 0, False),
        ("echo", "noflag", 4, False), ("stream", None, 0, True), ("stream", "drop", 0, False),
        ("echo", "unordered", 0, True), ("echo", "unordered-dup", 0, False),
        ("echo", "pairs", 0, True), ("echo", "cross", 0, True), ("stream", "pairs", 0, True),
        ("stream", "pairs-drop", 0, False),
    ]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="vdl-netpeer-") as d:
        for i, (mode, fault, corrupt, want) in enumerate(cases):
            port, bind = os.path.join(d, f"g{i}.sock"), os.path.join(d, f"p{i}.sock")
            pairs = 2 if fault in ("pairs", "cross", "pairs-drop") else 1
            g = FakeGuest(port, a.guest_mac, fault, pairs)
            g.start()
            ca = argparse.Namespace(**vars(a))
            ca.port, ca.bind, ca.mode, ca.corrupt_every = port, bind, mode, corrupt
            ca.unordered = fault is not None and fault.startswith("unordered")
            ca.pairs = pairs
            ca.frames, ca.timeout = 60, 1.0
            good, res = run(ca)
            g.stop = True
            g.join()
            verdict = "ok" if bool(good) == want else "WRONG"
            failures += verdict != "ok"
            print(summary(bool(good), res).replace("netpeer:", "   "))
            print(f"self-test {mode:6} fault={fault or '-':7} corrupt_every={corrupt}: "
                  f"checker says {'PASS' if good else 'FAIL'}, expected "
                  f"{'PASS' if want else 'FAIL'}: {verdict}")
    print(f"netpeer self-test: {len(cases) - failures} passed, {failures} failed")
    return 0 if failures == 0 else 1


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--port", help="the backend's packet port (unix datagram socket) to send to")
    ap.add_argument("--bind", help="our own socket path (the backend sends the answers here)")
    ap.add_argument("--mode", choices=("echo", "stream"), default="echo")
    ap.add_argument("--frames", type=int, default=200, help="frames to send (default 200)")
    ap.add_argument("--window", type=int, default=16, help="echo requests in flight (default 16)")
    ap.add_argument("--rate", type=float, default=0,
                    help="stream: frames per second (default 0: as fast as the port takes them)")
    ap.add_argument("--sync-every", type=int, default=64, metavar="N",
                    help="stream: after every N frames, wait (stats queries) until the guest "
                         "has them all, so a port that drops on overrun loses none "
                         "(default 64; 0: never)")
    ap.add_argument("--corrupt-every", type=int, default=0, metavar="M",
                    help="echo: corrupt the body of every M-th request (default 0: none)")
    ap.add_argument("--seq-start", type=int, default=1, help="first sequence number (default 1)")
    ap.add_argument("--mac", type=parse_mac, default=parse_mac("02:76:64:6c:00:01"),
                    help="our MAC (default 02:76:64:6c:00:01, locally administered)")
    ap.add_argument("--guest-mac", type=parse_mac, default=parse_mac("52:54:00:12:34:56"),
                    help="the guest's MAC (default 52:54:00:12:34:56)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds without an answer before giving up (default 10)")
    ap.add_argument("--unordered", action="store_true",
                    help="answers may come in any order (a guest with several workers)")
    ap.add_argument("--iface", help="use an AF_PACKET socket on this interface instead of --port/--bind")
    ap.add_argument("--pairs", type=int, default=1,
                    help="queue pairs of a vhost-dirtylog-net socket port: pair k > 0 is PORT.k "
                         "and BIND.k; frames go round-robin over the pairs (default 1)")
    ap.add_argument("--json", help="write the result as JSON here")
    ap.add_argument("--self-test", action="store_true",
                    help="run the checker against an in-process fake guest, correct and broken")
    a = ap.parse_args()
    if a.self_test:
        return self_test(a)
    if not a.iface and (not a.port or not a.bind):
        ap.error("--port and --bind (or --iface) are required")
    if (a.frames < 1 or a.window < 1 or a.corrupt_every < 0 or a.rate < 0 or a.pairs < 1
            or a.sync_every < 0):
        ap.error("--frames and --window must be >= 1, --corrupt-every and --rate >= 0")
    if a.mode == "stream" and a.corrupt_every:
        ap.error("--corrupt-every is for --mode echo")
    if not 0 <= a.seq_start <= 0xFFFF0000 - a.frames:
        ap.error("--seq-start out of range")
    good, res = run(a)
    print(summary(bool(good), res))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(res, passed=bool(good)), fh, indent=1)
    if good is None:
        return 2
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
