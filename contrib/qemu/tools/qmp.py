#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Minimal QMP client (standard library only) and the migration steps of
run-e2e.sh.

    qmp.py SOCK wait [--timeout S]                 connect (retrying), print version
    qmp.py SOCK cmd NAME [JSON_ARGS]               run one command, print its return
    qmp.py SOCK status [--want ST] [--timeout S]   print run state; wait for ST
    qmp.py SOCK prepare [--max-bandwidth B] [--downtime-limit MS]
                                                   migration capabilities + parameters
    qmp.py SOCK incoming URI                       migrate-incoming (dest. with -incoming defer)
    qmp.py SOCK migrate URI --out FILE [--timeout S] [--escalate-after S]
                                                   migrate, poll query-migrate to the end,
                                                   write status + statistics as JSON
    qmp.py SOCK quit [--timeout S]                 ask QEMU to exit

Exit status: 0 ok, 1 QMP error / migration failed, 3 timeout.
"""
import argparse
import json
import socket
import sys
import time


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout=10.0):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(max(0.5, deadline - time.monotonic()))
                self.sock.connect(path)
                break
            except OSError as e:
                last = e
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"cannot connect to QMP socket {path}: {last}")
                time.sleep(0.1)
        self.rfile = self.sock.makefile("rb")
        self.events = []
        self.next_id = 1
        self.greeting = self._read(timeout=max(1.0, deadline - time.monotonic()))
        if "QMP" not in self.greeting:
            raise QMPError(f"not a QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities")

    def _read(self, timeout):
        self.sock.settimeout(timeout)
        line = self.rfile.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def execute(self, cmd, args=None, timeout=30.0):
        msg_id = self.next_id
        self.next_id += 1
        msg = {"execute": cmd, "id": msg_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {cmd} within {timeout}s")
            resp = self._read(left)
            if "event" in resp:
                resp["_t"] = time.monotonic()
                self.events.append(resp)
                continue
            if resp.get("id") != msg_id:
                continue
            if "error" in resp:
                raise QMPError(f"{cmd}: {resp['error'].get('class')}: {resp['error'].get('desc')}")
            return resp.get("return")

    def close(self):
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


def cmd_wait(q, a):
    v = q.greeting["QMP"]["version"]["qemu"]
    print(f"{v['major']}.{v['minor']}.{v['micro']}")
    return 0


def cmd_cmd(q, a):
    args = json.loads(a.args) if a.args else None
    print(json.dumps(q.execute(a.name, args)))
    return 0


def cmd_status(q, a):
    deadline = time.monotonic() + a.timeout
    while True:
        st = q.execute("query-status")["status"]
        if not a.want or st == a.want:
            print(st)
            return 0
        if time.monotonic() >= deadline:
            print(st)
            print(f"qmp.py: status is '{st}', wanted '{a.want}' within {a.timeout}s", file=sys.stderr)
            return 3
        time.sleep(0.1)


def cmd_prepare(q, a):
    caps = [{"capability": c, "state": True} for c in a.caps.split(",") if c]
    if caps:
        q.execute("migrate-set-capabilities", {"capabilities": caps})
    params = {}
    if a.max_bandwidth is not None:
        params["max-bandwidth"] = a.max_bandwidth
    if a.downtime_limit is not None:
        params["downtime-limit"] = a.downtime_limit
    if params:
        q.execute("migrate-set-parameters", params)
    return 0


def cmd_incoming(q, a):
    q.execute("migrate-incoming", {"uri": a.uri})
    return 0


def cmd_migrate(q, a):
    t0 = time.monotonic()
    wall0 = time.time()
    try:
        q.execute("migrate", {"uri": a.uri})
    except QMPError as e:
        # e.g. a migration blocker: "vhost-user backend lacks
        # VHOST_USER_PROTOCOL_F_LOG_SHMFD feature" / "vhost lacks VHOST_F_LOG_ALL"
        if a.out:
            with open(a.out, "w") as fh:
                json.dump({"uri": a.uri, "result": "refused", "error": str(e),
                           "query_migrate": {"error-desc": str(e)}}, fh, indent=2)
        print(f"migration REFUSED by QEMU: {e}")
        return 1
    last = {}
    timeline = []
    rc = 3
    polls = 0
    max_remaining_after_first_pass = 0
    syncs = []  # one sample per dirty-sync-count seen: RAM counters at that point
    escalated = None
    while time.monotonic() - t0 < a.timeout:
        if a.escalate_after and escalated is None and time.monotonic() - t0 >= a.escalate_after:
            # Not converging (a slow host, a guest dirtying faster than the link):
            # allow a longer stop-and-copy rather than fail on time.
            escalated = round(time.monotonic() - t0, 3)
            q.execute("migrate-set-parameters", {"downtime-limit": a.escalate_downtime})
            print(f"qmp.py: not converged after {a.escalate_after}s: downtime-limit -> "
                  f"{a.escalate_downtime} ms", file=sys.stderr)
        last = q.execute("query-migrate")
        polls += 1
        st = last.get("status", "?")
        ram = last.get("ram") or {}
        n = ram.get("dirty-sync-count")
        if n is not None and (not syncs or syncs[-1]["dirty_sync_count"] != n):
            syncs.append(
                {
                    "t": round(time.monotonic() - t0, 3),
                    "dirty_sync_count": n,
                    "normal_pages": ram.get("normal"),
                    "transferred": ram.get("transferred"),
                    "remaining": ram.get("remaining"),
                    "status": st,
                }
            )
        if not timeline or timeline[-1][1] != st:
            timeline.append((round(time.monotonic() - t0, 3), st))
        if st == "completed":
            rc = 0
            break
        if st in ("failed", "cancelled"):
            rc = 1
            break
        time.sleep(a.poll)
    if rc == 3:
        try:
            q.execute("migrate_cancel")
        except (QMPError, TimeoutError):
            pass
    # Drain pending events (MIGRATION / MIGRATION_PASS) for a moment.
    try:
        q.execute("query-status")
    except (QMPError, TimeoutError):
        pass
    passes = [
        {"t": round(e["_t"] - t0, 3), "pass": e["data"].get("pass")}
        for e in q.events
        if e.get("event") == "MIGRATION_PASS"
    ]
    status_events = [
        {"t": round(e["_t"] - t0, 3), "status": e["data"].get("status")}
        for e in q.events
        if e.get("event") == "MIGRATION"
    ]
    # Pages sent after the first full pass: pages dirtied (by the guest CPU or,
    # through the vhost-user log, by the backend) while migration ran.
    # Only a sample taken while still in pre-copy counts: when the first pass
    # goes straight to stop-and-copy, the next answer comes after completion.
    first = next((x for x in syncs if x["dirty_sync_count"] >= 2 and x["status"] == "active"), None)
    final_ram = last.get("ram") or {}
    resent = None
    if first and first.get("normal_pages") is not None and final_ram.get("normal") is not None:
        resent = final_ram["normal"] - first["normal_pages"]
    result = {
        "uri": a.uri,
        "sync_samples": syncs,
        "downtime_limit_escalated_at": escalated,
        "pages_sent_after_first_pass": resent,
        "started_at": wall0,
        "result": {0: "completed", 1: last.get("status", "failed"), 3: "timeout"}[rc],
        "wall_seconds": round(time.monotonic() - t0, 3),
        "polls": polls,
        "status_timeline": timeline,
        "migration_events": status_events,
        "pass_events": passes,
        "query_migrate": last,
    }
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    ram = last.get("ram", {})
    print(
        f"migration {result['result']}: total {last.get('total-time', '?')} ms, "
        f"downtime {last.get('downtime', '?')} ms, transferred {ram.get('transferred', '?')} B, "
        f"dirty-sync-count {ram.get('dirty-sync-count', '?')}, "
        f"pages re-sent after pass 1 {resent if resent is not None else '?'}"
        + (f", error: {last.get('error-desc')}" if last.get("error-desc") else "")
    )
    return rc


def cmd_quit(q, a):
    try:
        q.execute("quit", timeout=a.timeout)
    except QMPError:
        pass  # the connection may close before the reply
    return 0


def main():
    ap = argparse.ArgumentParser(description="minimal QMP client")
    ap.add_argument("sock")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    sub = ap.add_subparsers(dest="op", required=True)
    p = sub.add_parser("wait")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(fn=cmd_wait)
    p = sub.add_parser("cmd")
    p.add_argument("name")
    p.add_argument("args", nargs="?")
    p.set_defaults(fn=cmd_cmd)
    p = sub.add_parser("status")
    p.add_argument("--want")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("prepare")
    p.add_argument("--caps", default="events")
    p.add_argument("--max-bandwidth", type=int)
    p.add_argument("--downtime-limit", type=int)
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("incoming")
    p.add_argument("uri")
    p.set_defaults(fn=cmd_incoming)
    p = sub.add_parser("migrate")
    p.add_argument("uri")
    p.add_argument("--out")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--poll", type=float, default=0.02)
    p.add_argument("--escalate-after", type=float, default=30.0,
                   help="raise downtime-limit if not completed after this many seconds (0: never)")
    p.add_argument("--escalate-downtime", type=int, default=5000)
    p.set_defaults(fn=cmd_migrate)
    p = sub.add_parser("quit")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(fn=cmd_quit)
    a = ap.parse_args()

    timeout = a.timeout if a.op == "wait" else a.connect_timeout
    try:
        q = QMP(a.sock, timeout=timeout)
    except TimeoutError as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        return 3
    except (OSError, QMPError) as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        return 1
    try:
        return a.fn(q, a)
    except TimeoutError as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        return 3
    except (OSError, QMPError) as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        return 1
    finally:
        q.close()


if __name__ == "__main__":
    sys.exit(main())
