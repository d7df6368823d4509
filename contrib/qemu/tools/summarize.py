#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Summarise a run-e2e.sh output directory: per-round migration statistics
(from query-migrate) and guest progress, as a table on stdout and as
summary.json + summary.md in the directory.

    summarize.py OUT_DIR [--device blk|net] [--backend B] [--accel A] [--negative 0|1] [--verdict TEXT] [--rc N]
    summarize.py --oneline ROUND.migrate.json
"""
import argparse
import glob
import json
import os
import re

MIB = 1024 * 1024


def load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def rounds(out):
    found = {}
    for p in glob.glob(os.path.join(out, "rounds", "round-*.*.json")):
        m = re.search(r"round-(\d+)\.(migrate|guest|ram)\.json$", p)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = load(p)
    rows = []
    for r in sorted(found):
        mig = found[r].get("migrate") or {}
        guest = found[r].get("guest") or {}
        rc = found[r].get("ram") or {}
        q = mig.get("query_migrate") or {}
        ram = q.get("ram") or {}
        rows.append(
            {
                "round": r,
                "src": guest.get("src"),
                "dst": guest.get("dst"),
                "result": mig.get("result", "not run"),
                "total_time_ms": q.get("total-time"),
                "downtime_ms": q.get("downtime"),
                "setup_time_ms": q.get("setup-time"),
                "transferred_bytes": ram.get("transferred"),
                "ram_total_bytes": ram.get("total"),
                "normal_pages": ram.get("normal"),
                "zero_pages": ram.get("duplicate"),
                "precopy_bytes": ram.get("precopy-bytes"),
                "downtime_bytes": ram.get("downtime-bytes"),
                "dirty_sync_count": ram.get("dirty-sync-count"),
                "dirty_pages_rate": ram.get("dirty-pages-rate"),
                "mbps": ram.get("mbps"),
                "pass_events": len(mig.get("pass_events") or []),
                "pages_sent_after_first_pass": mig.get("pages_sent_after_first_pass"),
                "iter_at_migrate_start": guest.get("iter_at_migrate_start"),
                "src_last_iter": guest.get("src_last_iter"),
                "dst_first_iter": guest.get("dst_first_iter"),
                "dst_iter_checked": guest.get("dst_iter_checked"),
                "mismatch_words_total": guest.get("mismatch_words_total"),
                "ram_pages_compared": rc.get("pages"),
                "ram_pages_differing": rc.get("differing_pages"),
                "ram_first_differing_gpa": (rc.get("first_differing") or [{}])[0].get("gpa"),
                "frames_streamed": guest.get("frames_streamed"),
                "guest_stream_rx": guest.get("guest_stream_rx"),
                "downtime_limit_escalated_at_s": mig.get("downtime_limit_escalated_at"),
                "error": q.get("error-desc"),
            }
        )
    return rows


def fmt(v, scale=None, digits=1):
    if v is None:
        return "-"
    if scale:
        return f"{v / scale:.{digits}f}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


COLUMNS = [
    ("round", "round", None),
    ("src->dst", None, None),
    ("result", "result", None),
    ("total ms", "total_time_ms", None),
    ("downtime ms", "downtime_ms", None),
    ("sent MiB", "transferred_bytes", MIB),
    ("normal pages", "normal_pages", None),
    ("zero pages", "zero_pages", None),
    ("dirty syncs", "dirty_sync_count", None),
    ("re-sent pages", "pages_sent_after_first_pass", None),
    ("stop-copy MiB", "downtime_bytes", MIB),
    ("Mbps", "mbps", None),
    ("guest iter (start/src last/dst first/dst checked)", None, None),
    ("mismatch words", "mismatch_words_total", None),
    ("RAM pages compared", "ram_pages_compared", None),
    ("RAM pages differing", "ram_pages_differing", None),
]
NET_COLUMNS = [
    ("frames streamed (total)", "frames_streamed", None),
    ("guest stream rx (total)", "guest_stream_rx", None),
]


def table(rows, device="blk"):
    cols = COLUMNS
    if device == "net":
        # the guest's progress is its stream counter; words are not checked
        cols = [c for c in COLUMNS if c[1] != "mismatch_words_total"] + NET_COLUMNS
        cols = [("guest stream frames (start/src last/dst first/dst checked)", None, None)
                if c[0].startswith("guest iter") else c for c in cols]
    head = [c[0] for c in cols]
    body = []
    for r in rows:
        line = []
        for name, key, scale in cols:
            if name == "src->dst":
                line.append(f"{r['src']}->{r['dst']}")
            elif name.startswith("guest iter") or name.startswith("guest stream frames"):
                line.append(
                    "/".join(
                        fmt(r[k])
                        for k in ("iter_at_migrate_start", "src_last_iter", "dst_first_iter", "dst_iter_checked")
                    )
                )
            else:
                line.append(fmt(r[key], scale))
        body.append(line)
    return head, body


def oneline(path):
    rec = load(path) or {}
    q = rec.get("query_migrate") or {}
    ram = q.get("ram") or {}
    resent = rec.get("pages_sent_after_first_pass")
    resent = "unknown" if resent is None else resent
    print(
        f"total {q.get('total-time')} ms, downtime {q.get('downtime')} ms, "
        f"{(ram.get('transferred') or 0) / MIB:.1f} MiB sent, "
        f"dirty-sync-count {ram.get('dirty-sync-count')}, "
        f"{resent} pages re-sent after pass 1, "
        f"{(ram.get('downtime-bytes') or 0) / MIB:.1f} MiB sent while stopped"
    )


def main():
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--oneline":
        return oneline(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--backend", default="?")
    ap.add_argument("--accel", default="?")
    ap.add_argument("--negative", default="0")
    ap.add_argument("--verdict", default="")
    ap.add_argument("--rc", type=int, default=None)
    ap.add_argument("--device", default="blk", choices=("blk", "net"))
    a = ap.parse_args()

    rows = rounds(a.out)
    config = load(os.path.join(a.out, "config.json")) or {}
    summary = {
        "verdict": a.verdict,
        "exit_code": a.rc,
        "device": a.device,
        "backend": a.backend,
        "accel": a.accel,
        "negative_control": a.negative == "1",
        "config": config,
        "rounds": rows,
    }
    with open(os.path.join(a.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)

    head, body = table(rows, a.device)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    text = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    text += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    print("\n".join(text))

    what = ("vhost-user-net live migration under streamed frames" if a.device == "net"
            else "vhost-user-blk live migration under guest I/O")
    md = [f"# {what}: {a.verdict}", ""]
    md.append(
        f"backend `{a.backend}`, accelerator `{a.accel}`, QEMU `{config.get('qemu', '?')}`, "
        f"guest kernel `{config.get('kernel', '?')}`, guest RAM {config.get('mem_mib', '?')} MiB, "
        + (f"buffers {config.get('buf_mib', '?')} MiB, disk {config.get('disk_mib', '?')} MiB, "
           if a.device == "blk" else "")
        + f"RAM compared page by page: {'yes' if config.get('ram_check') else 'no'}, "
        f"max-bandwidth {config.get('max_bandwidth_mib_s', '?')} MiB/s, "
        f"downtime-limit {config.get('downtime_limit_ms', '?')} ms"
        + (", **negative control** (marks dropped)" if a.negative == "1" else "")
    )
    md.append("")
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "|".join("---:" for _ in head) + "|")
    for b in body:
        md.append("| " + " | ".join(b) + " |")
    errors = [f"- round {r['round']}: {r['error']}" for r in rows if r.get("error")]
    errors += [
        f"- round {r['round']}: did not converge in {r['downtime_limit_escalated_at_s']} s, "
        "downtime-limit was raised"
        for r in rows
        if r.get("downtime_limit_escalated_at_s") is not None
    ]
    if errors:
        md += ["", "Notes:"] + errors
    with open(os.path.join(a.out, "summary.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
