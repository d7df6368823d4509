#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Checks that Cargo.toml's `rust-version` equals what the dependency tree needs.

Only one toolchain is installed on CI, so instead of building with the declared version this
reads `cargo metadata` for the host platform (`--filter-platform`, so Windows-only crates and
`cfg(loom)` dependencies are left out), walks the normal and build dependencies of the library
and binaries with all default features (dev-dependencies are not part of what users build),
and compares the highest `rust-version` any of them declares with ours.

Exit 0 when they are equal; 1 (with the crates that set the floor) otherwise.
Usage: contrib/ci/check-msrv.py [--print]
"""
import json
import subprocess
import sys


def main() -> int:
    host = next(
        line.split(": ", 1)[1]
        for line in subprocess.run(
            ["rustc", "-vV"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line.startswith("host: ")
    )
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    seen, stack = set(), [root]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for dep in nodes[i]["deps"]:
            if any(k["kind"] in (None, "build") for k in dep["dep_kinds"]):
                stack.append(dep["pkg"])

    def ver(s):
        return tuple(int(x) for x in (s or "0").split("."))[:2]

    ours = ver(packages[root].get("rust_version"))
    deps = sorted(
        ((ver(packages[i].get("rust_version")), packages[i]["name"], packages[i]["version"])
         for i in seen if i != root),
        reverse=True,
    )
    need = deps[0][0] if deps else (0, 0)
    floor = [f"{n} {v} (rust-version {'.'.join(map(str, r))})" for r, n, v in deps if r == need]
    fmt = ".".join(map(str, need))
    if "--print" in sys.argv:
        print(fmt)
        return 0
    if ours != need:
        print(
            f"Cargo.toml declares rust-version = \"{'.'.join(map(str, ours))}\", "
            f"the dependency tree needs {fmt}: {', '.join(floor)}",
            file=sys.stderr,
        )
        return 1
    print(f"rust-version {fmt} matches the dependency tree ({', '.join(floor)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
