#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Markdown tables from a check-testpmd.sh output directory (runs.tsv + one JSON per run).

Usage: table.py DIR  (prints markdown on stdout)
"""
import csv
import json
import os
import statistics
import sys

NAMES = {
    "dpdk-txonly": "DPDK testpmd txonly",
    "dpdk-tap": "DPDK testpmd io + TAP",
    "ours": "vhost-dirtylog-net (socket port)",
    "ours-tap": "vhost-dirtylog-net (TAP)",
}
EXIT = {
    "0": "pass",
    "1": "lost pages",
    "2": "protocol error / hang / in flight at stop",
    "3": "no dirty logging",
    "4": "damaged frames",
    "64": "invalid options",
    "124": "timed out",
    "setup": "backend did not start",
}
KINDS = [
    ("lost_rx_buffer", "RX buffer"),
    ("lost_rx_used_ring", "RX used ring"),
    ("lost_tx_used_ring", "TX used ring"),
    ("lost_other", "other"),
]


def load(d, row):
    if not row["json"]:
        return None
    try:
        with open(os.path.join(d, row["json"])) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def last_line(d, name):
    try:
        with open(os.path.join(d, name)) as f:
            lines = [x.strip() for x in f if x.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""


def lost_kinds(j):
    parts = ["%d %s" % (j.get(k, 0), n) for k, n in KINDS if j.get(k, 0)]
    if j.get("lost_late"):
        parts.append("%d written after the stop" % j["lost_late"])
    return ", ".join(parts)


def cell(runs):
    """'0 · 0 · 0' (lost pages per run), with exit codes that are not 0."""
    out = []
    for row, j in runs:
        if j is None or "lost_pages" not in j:
            out.append("— (exit %s)" % row["exit"])
            continue
        s = str(j["lost_pages"])
        if row["exit"] != "0":
            s += " (exit %s)" % row["exit"]
        out.append(s)
    return " · ".join(out)


def check_tables(d, rows):
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    styles = list(dict.fromkeys(r["style"] for r in rows))
    faults = list(dict.fromkeys(r["fault"] for r in rows))
    data = {}
    for r in rows:
        data.setdefault((r["backend"], r["style"], r["fault"]), []).append((r, load(d, r)))
    out = []
    for style in styles:
        out.append("")
        out.append(
            "Lost pages per run (`vhost-dirtylog-check --device net --vmm-style %s`; exit code if not 0):"
            % style
        )
        out.append("")
        out.append("| fault mode | " + " | ".join(NAMES.get(b, b) for b in backends) + " |")
        out.append("|---|" + "---|" * len(backends))
        for f in faults:
            out.append(
                "| %s | " % f
                + " | ".join(cell(data.get((b, style, f), [])) for b in backends)
                + " |"
            )
    out.append("")
    out.append("Frames into the guest per run (all styles and fault modes; mean over runs):")
    out.append("")
    out.append(
        "| backend | traffic | runs | RX frames/s | RX frames | spread over several buffers | TX frames sent by the guest | exit codes |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for b in backends:
        rs = [(r, j) for r in rows if r["backend"] == b for j in [load(d, r)] if j and j.get("net")]
        codes = {}
        for r in rows:
            if r["backend"] == b:
                codes[r["exit"]] = codes.get(r["exit"], 0) + 1
        if not rs:
            out.append("| %s | | 0 | | | | | %s |" % (NAMES.get(b, b), codes))
            continue
        n = [j["net"] for _, j in rs]
        fps = statistics.mean(x["rx_fps"] for x in n)
        rx = statistics.mean(x["rx_frames"] for x in n)
        merged = sum(x["rx_merged"] for x in n) * 100.0 / max(1, sum(x["rx_frames"] for x in n))
        tx = statistics.mean(x["tx_frames"] for x in n)
        out.append(
            "| %s | %s | %d | %.0f | %.0f | %.0f%% | %.0f | %s |"
            % (
                NAMES.get(b, b),
                n[0]["traffic"].split(":")[0],
                len(rs),
                fps,
                rx,
                merged,
                tx,
                ", ".join("%s× %s" % (v, k) for k, v in sorted(codes.items())),
            )
        )
    # Findings: every run that did not pass.
    bad = [(r, j) for r in rows for j in [load(d, r)] if r["exit"] != "0"]
    out.append("")
    if not bad:
        out.append("Every run passed (exit 0): no lost page, every frame checked was intact.")
        return out
    out.append("Runs that did not pass (%d of %d):" % (len(bad), len(rows)))
    out.append("")
    for r, j in bad:
        head = "- **%s, %s, fault %s, run %s**: exit %s (%s)" % (
            NAMES.get(r["backend"], r["backend"]),
            r["style"],
            r["fault"],
            r["run"],
            r["exit"],
            EXIT.get(r["exit"], "?"),
        )
        if j is None:
            out.append(head + ": " + (last_line(d, r["stderr"]) if r["stderr"] else "no output"))
            continue
        out.append(head + ": " + j.get("verdict", ""))
        if j.get("lost_pages"):
            out.append(
                "  - lost %d pages (%d never marked, %d marked too late): %s"
                % (j["lost_pages"], j.get("lost_unmarked", 0), j.get("lost_late", 0), lost_kinds(j))
            )
        for s in (j.get("lost_samples") or [])[:4]:
            out.append("  - sample: %s" % s)
        st = j.get("stop") or {}
        if st:
            out.append(
                "  - stop %s: %s in flight at the reply, %s completed after it, %s taken after it%s"
                % (
                    st.get("message"),
                    st.get("inflight_at_stop"),
                    st.get("completed_after_stop"),
                    st.get("processed_after_stop"),
                    "; error: %s" % st["error"] if st.get("error") else "",
                )
            )
        for fl in j.get("fault_log") or []:
            out.append("  - fault %s at %.2f s (round %s): %s" % (fl["fault"], fl["at_s"], fl["round"], fl["detail"]))
        for s in (j.get("samples") or [])[:4]:
            out.append("  - %s" % s)
    return out


def bench_tables(d, rows):
    out = [
        "",
        "Frames per second into the guest's RX ring (`vhost-dirtylog-check --device net --bench`, no TX, LOG_ALL off/on in alternating phases):",
        "",
        "| backend | frames | off (frames/s) | on (frames/s) | on/off | overhead (median of groups) | merged | pages marked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    res = {}
    for r in rows:
        j = load(d, r)
        if not j or "sizes" not in j:
            out.append("| %s | — exit %s: %s | | | | | | |" % (NAMES.get(r["backend"], r["backend"]), r["exit"], last_line(d, r["stderr"])))
            continue
        for z in j["sizes"]:
            label = "%d B" % z["frame"] if z["frame"] else r.get("frame_label") or "testpmd's"
            res[(r["backend"], label)] = z
            out.append(
                "| %s | %s | %.0f | %.0f | %.3f | %+.1f%% (%+.1f%%) | %.0f%% | %d |"
                % (
                    NAMES.get(r["backend"], r["backend"]),
                    label,
                    z["fps_off"],
                    z["fps_on"],
                    z["ratio"],
                    z["overhead_pct"],
                    z["overhead_median_pct"],
                    z["merged_pct"],
                    z["pages_marked"],
                )
            )
    ours = {lab: z for (b, lab), z in res.items() if b == "ours"}
    others = [(b, lab, z) for (b, lab), z in res.items() if b != "ours" and lab in ours]
    if ours and others:
        out += [
            "",
            "Ratios to vhost-dirtylog-net (socket port), same frame size (>1: the other backend delivers more frames/s):",
            "",
            "| backend | frames | off: other/ours | on: other/ours |",
            "|---|---|---|---|",
        ]
        for b, lab, z in others:
            o = ours[lab]
            out.append(
                "| %s | %s | %.2f | %.2f |"
                % (
                    NAMES.get(b, b),
                    lab,
                    z["fps_off"] / o["fps_off"] if o["fps_off"] else 0,
                    z["fps_on"] / o["fps_on"] if o["fps_on"] else 0,
                )
            )
    return out


def one(path):
    """One line about one run's JSON (for the progress log)."""
    try:
        with open(path) as f:
            j = json.load(f)
    except (OSError, ValueError):
        return "(no JSON)"
    if "sizes" in j:
        return "; ".join(
            "%s: off %.0f, on %.0f frames/s" % ("%d B" % z["frame"] if z["frame"] else "own frames", z["fps_off"], z["fps_on"])
            for z in j["sizes"]
        )
    n = j.get("net") or {}
    s = "lost %s, RX %s frames, TX %s" % (j.get("lost_pages"), n.get("rx_frames"), n.get("tx_frames"))
    if j.get("lost_pages"):
        s += " (%s)" % lost_kinds(j)
    return s


def main():
    if sys.argv[1] == "--one":
        print(one(sys.argv[2]))
        return
    d = sys.argv[1]
    with open(os.path.join(d, "runs.tsv")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = ["# vhost-dirtylog-check --device net: DPDK testpmd and vhost-dirtylog-net", ""]
    try:
        with open(os.path.join(d, "env.txt")) as f:
            out += ["    " + x.rstrip() for x in f]
    except OSError:
        pass
    if rows and rows[0]["fault"] == "bench":
        out += bench_tables(d, rows)
    else:
        out += check_tables(d, rows)
    print("\n".join(out))


if __name__ == "__main__":
    main()
