#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Build the test guest's initramfs (cpio "newc", uncompressed) with nothing
but the standard library.

Contents: /init (the static workload program), /dev/console, empty /proc,
/sys, /dev, and /lib/vdl-modules/NN-name.ko: the kernel modules the guest
needs for a virtio-pci disk, in dependency order, decompressed on the host
(.ko.xz, .ko.gz, .ko.zst) so the guest can hand them to finit_module(2)
without any decompressor. Modules the kernel has built in (modules.builtin)
are left out.

Dependencies come from each module's own .modinfo ELF section ("depends="),
so neither depmod nor modules.dep is needed (a kernel package extracted with
dpkg-deb has no modules.dep).

    mkinitramfs.py --init build/vdl-init --moddir /lib/modules/VER \
        --out build/initramfs.cpio virtio_pci virtio_blk
"""
import argparse
import gzip
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys


def norm(name):
    return name.replace("-", "_")


def module_files(moddir):
    """Map module name -> path for every .ko[.xz|.gz|.zst] under moddir."""
    found = {}
    for root, _dirs, files in os.walk(moddir):
        for f in files:
            for suffix in (".ko", ".ko.xz", ".ko.gz", ".ko.zst"):
                if f.endswith(suffix):
                    found.setdefault(norm(f[: -len(suffix)]), os.path.join(root, f))
                    break
    return found


def builtin_modules(moddir):
    names = set()
    path = os.path.join(moddir, "modules.builtin")
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                base = os.path.basename(line.strip())
                if base.endswith(".ko"):
                    names.add(norm(base[:-3]))
    return names


def read_module(path):
    """Return the uncompressed ELF bytes of a module file."""
    with open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        if shutil.which("zstd") is None:
            sys.exit(f"mkinitramfs: {path} is zstd-compressed; install the 'zstd' package")
        return subprocess.run(
            ["zstd", "-dc", path], check=True, stdout=subprocess.PIPE
        ).stdout
    return data


def modinfo(elf):
    """Parse the .modinfo section of an ELF64 little-endian module."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    e_shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i):
        off = e_shoff + i * e_shentsize
        name, _typ, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, off)
        return name, offset, size

    _n, stroff, _s = section(e_shstrndx)
    info = {}
    for i in range(e_shnum):
        name, offset, size = section(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name : end] == b".modinfo":
            for entry in elf[offset : offset + size].split(b"\0"):
                if b"=" in entry:
                    k, v = entry.split(b"=", 1)
                    info.setdefault(k.decode(), v.decode(errors="replace"))
    return info


def resolve(wanted, files, builtin):
    """Dependency-ordered list of (name, elf bytes) to load."""
    order, seen, cache = [], set(), {}

    def visit(name, chain):
        name = norm(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            sys.exit(f"mkinitramfs: dependency cycle: {' -> '.join(chain + [name])}")
        if name not in files:
            sys.exit(
                f"mkinitramfs: module {name} is neither built into the kernel nor found "
                f"under the modules directory"
            )
        elf = cache.setdefault(name, read_module(files[name]))
        deps = [d for d in modinfo(elf).get("depends", "").split(",") if d]
        for d in deps:
            visit(d, chain + [name])
        seen.add(name)
        order.append((name, elf))

    for w in wanted:
        visit(w, [])
    return order


class Cpio:
    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{x:08x}"
            for x in (
                self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                0, 0, rdev[0], rdev[1], len(name_b), 0,
            )
        )
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name, perm=0o755):
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name, data, perm=0o644):
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name, major, minor, perm=0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="static init binary")
    ap.add_argument("--moddir", help="/lib/modules/<version> of the guest kernel")
    ap.add_argument("--out", required=True)
    ap.add_argument("modules", nargs="*", default=["virtio_pci", "virtio_blk"])
    a = ap.parse_args()

    mods = []
    if a.moddir:
        mods = resolve(a.modules, module_files(a.moddir), builtin_modules(a.moddir))
    elif a.modules:
        print("mkinitramfs: no --moddir: assuming the modules are built in", file=sys.stderr)

    c = Cpio()
    for d in ("dev", "proc", "sys", "lib", "lib/vdl-modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    with open(a.init, "rb") as fh:
        c.file("init", fh.read(), 0o755)
    for i, (name, elf) in enumerate(mods):
        c.file(f"lib/vdl-modules/{i:02d}-{name}.ko", elf)
    tmp = a.out + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(c.finish())
    os.replace(tmp, a.out)
    print("modules: " + (" ".join(n for n, _ in mods) or "(none, built in)"))


if __name__ == "__main__":
    main()
