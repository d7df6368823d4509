#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Compare two guest RAM files page by page: the source's and the destination's
memory-backend-file of a completed live migration (run-e2e.sh). Standard library
only.

With the source stopped (QEMU run state postmigrate: its vhost-user backend
answered GET_VRING_BASE, no device writes any more) and the destination still
paused (-incoming with -S, before `cont`), the two files must be identical: the
migration stream is the only thing that wrote the destination's RAM. Any page
that differs is a page the source changed after its last transfer without
QEMU learning of it, typically a vhost-user backend write missing from the
dirty log: a lost page, whatever the guest did or will do with it.

The file offset of a page is its offset in the RAM block; --machine q35 (or pc)
with the RAM size turns it into the guest-physical address (GPA) QEMU maps it
at: RAM below the 32-bit PCI hole at 0, the rest at 4 GiB (hw/i386/pc_q35.c
pc_q35_init: lowmem 2 GiB if RAM >= 0xb0000000 bytes, else 0xb0000000;
hw/i386/pc_piix.c: 0xe0000000 or 0xc0000000). --machine none prints offsets.

Output: one line "ramcmp: N pages of 4096 bytes compared, D differ ..." and up to
--max-list differing pages (GPA, bytes that differ, whether the destination's
page is all zero: never transferred, or zeroed). --json writes the same.

Exit: 0 identical, 1 pages differ, 2 usage or I/O error (files of different
sizes included).

    ramcmp.py /dev/shm/vdl-e2e.X/ram-0 /dev/shm/vdl-e2e.X/ram-1 --machine q35
    ramcmp.py --self-test
"""
import argparse
import json
import mmap
import os
import sys
import tempfile

PAGE = 4096
CHUNK = 256 * PAGE  # compared at once; pages only inside differing chunks
GIB = 1 << 30


def lowmem(machine, size):
    """Bytes of the RAM block mapped below 4 GiB (the rest is at 4 GiB)."""
    if machine == "q35":
        lm = 0x80000000 if size >= 0xB0000000 else 0xB0000000
    elif machine == "pc":
        lm = 0xC0000000 if size >= 0xE0000000 else 0xE0000000
    else:
        return size
    return min(size, lm)


def gpa(offset, low):
    return offset if offset < low else 4 * GIB + (offset - low)


def compare(path_a, path_b, machine="none", max_list=16):
    """Returns the result dict; raises OSError / ValueError on unusable files."""
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        sa, sb = os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size
        if sa != sb:
            raise ValueError(f"sizes differ: {path_a} {sa} bytes, {path_b} {sb} bytes")
        if sa == 0 or sa % PAGE:
            raise ValueError(f"size {sa} bytes is not a positive multiple of {PAGE}")
        low = lowmem(machine, sa)
        ma = mmap.mmap(fa.fileno(), sa, prot=mmap.PROT_READ)
        mb = mmap.mmap(fb.fileno(), sb, prot=mmap.PROT_READ)
        zero = bytes(PAGE)
        differ, dst_zero, diff_bytes, listed = 0, 0, 0, []
        try:
            for c in range(0, sa, CHUNK):
                end = min(sa, c + CHUNK)
                if ma[c:end] == mb[c:end]:
                    continue
                for off in range(c, end, PAGE):
                    pa, pb = ma[off:off + PAGE], mb[off:off + PAGE]
                    if pa == pb:
                        continue
                    differ += 1
                    nb = sum(x != y for x, y in zip(pa, pb))
                    diff_bytes += nb
                    z = pb == zero
                    dst_zero += z
                    if len(listed) < max_list:
                        listed.append({"gpa": f"0x{gpa(off, low):x}", "offset": off,
                                       "bytes_differ": nb, "dst_zero": z,
                                       "src_zero": pa == zero})
        finally:
            ma.close()
            mb.close()
    return {"src": path_a, "dst": path_b, "bytes": sa, "page_size": PAGE,
            "pages": sa // PAGE, "differing_pages": differ, "differing_bytes": diff_bytes,
            "differing_pages_dst_zero": dst_zero, "machine": machine,
            "first_differing": listed}


def line(r):
    s = (f"ramcmp: {r['pages']} pages of {r['page_size']} bytes compared, "
         f"{r['differing_pages']} differ")
    if r["differing_pages"]:
        s += (f" ({r['differing_bytes']} bytes; {r['differing_pages_dst_zero']} of those pages "
              f"all zero on the destination); first GPAs: "
              + ", ".join(d["gpa"] for d in r["first_differing"][:8]))
    return s


def self_test():
    """The comparison must find planted differences, and only those."""
    fails = 0
    with tempfile.TemporaryDirectory(prefix="vdl-ramcmp-") as d:
        a, b = os.path.join(d, "a"), os.path.join(d, "b")
        size = 3 * CHUNK + 5 * PAGE
        data = bytearray(os.urandom(size))
        with open(a, "wb") as f:
            f.write(data)
        cases = [([], 0), ([0], 1), ([size - 1], 1), ([CHUNK, CHUNK + 1, CHUNK + PAGE], 2),
                 ([PAGE * 7 + 100, PAGE * 300, 2 * CHUNK + 3], 3)]
        for flips, want in cases:
            bb = bytearray(data)
            for o in flips:
                bb[o] ^= 0x01
            with open(b, "wb") as f:
                f.write(bb)
            r = compare(a, b)
            got_offs = sorted({o - o % PAGE for o in flips})
            ok = (r["differing_pages"] == want and r["differing_bytes"] == len(flips)
                  and [x["offset"] for x in r["first_differing"]] == got_offs)
            fails += not ok
            print(f"self-test flips at {flips}: {r['differing_pages']} pages differ, "
                  f"expected {want}: {'ok' if ok else 'WRONG'}")
        # a destination page that was never sent (all zero)
        bb = bytearray(data)
        bb[PAGE:2 * PAGE] = bytes(PAGE)
        with open(b, "wb") as f:
            f.write(bb)
        r = compare(a, b)
        ok = r["differing_pages"] == 1 and r["differing_pages_dst_zero"] == 1
        fails += not ok
        print(f"self-test zeroed page: {line(r)}: {'ok' if ok else 'WRONG'}")
        # GPAs above the q35 32-bit hole
        ok = gpa(0x80000000, lowmem("q35", 4 * GIB)) == 4 * GIB and gpa(0x1000, lowmem("q35", GIB)) == 0x1000
        fails += not ok
        print(f"self-test q35 GPA mapping: {'ok' if ok else 'WRONG'}")
        with open(b, "wb") as f:
            f.write(data[:-PAGE])
        try:
            compare(a, b)
            ok = False
        except ValueError:
            ok = True
        fails += not ok
        print(f"self-test size mismatch refused: {'ok' if ok else 'WRONG'}")
    total = len(cases) + 3
    print(f"ramcmp self-test: {total - fails} passed, {fails} failed")
    return 0 if fails == 0 else 1


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("src", nargs="?", help="the source's RAM file")
    ap.add_argument("dst", nargs="?", help="the destination's RAM file")
    ap.add_argument("--machine", choices=("q35", "pc", "none"), default="none",
                    help="map file offsets to GPAs as this QEMU machine does (default none)")
    ap.add_argument("--max-list", type=int, default=16, help="differing pages listed (default 16)")
    ap.add_argument("--json", help="write the result as JSON here")
    ap.add_argument("--self-test", action="store_true", help="check this tool on planted differences")
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    if not a.src or not a.dst:
        ap.error("SRC and DST are required")
    try:
        r = compare(a.src, a.dst, a.machine, a.max_list)
    except (OSError, ValueError) as e:
        print(f"ramcmp: ERROR: {e}", file=sys.stderr)
        return 2
    print(line(r))
    for x in r["first_differing"]:
        print(f"  gpa {x['gpa']}: {x['bytes_differ']} bytes differ"
              f"{' (destination page all zero)' if x['dst_zero'] else ''}"
              f"{' (source page all zero)' if x['src_zero'] else ''}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(r, fh, indent=1)
    return 1 if r["differing_pages"] else 0


if __name__ == "__main__":
    sys.exit(main())
