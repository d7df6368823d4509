#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Installs the vhost-dirtylog daemons the way distributions lay out vhost-user backends:
#   $LIBEXECDIR/vhost-dirtylog-blk                        the daemon (QEMU/libvirt never run it
#                                                        from $PATH; systemd or you start it)
#   $BINDIR/vhost-dirtylog-check                          the migration checker (a user tool)
#   $DATADIR/qemu/vhost-user/50-vhost-dirtylog-blk.json    vhost-user backend descriptor
#                                                        (docs/interop/vhost-user.json)
#   $UNITDIR/vhost-dirtylog-blk@.service, @.socket          systemd units
#   $SYSUSERSDIR/vhost-dirtylog.conf                        the unprivileged user
#   $SYSCONFDIR/vhost-dirtylog/vm.conf.example              per-instance configuration
#
# Usage: contrib/install.sh [--no-build]
# Environment (defaults): DESTDIR (empty), PREFIX (/usr), LIBEXECDIR ($PREFIX/libexec),
#   BINDIR ($PREFIX/bin), DATADIR ($PREFIX/share), SYSCONFDIR (/etc),
#   UNITDIR ($SYSCONFDIR/systemd/system), SYSUSERSDIR ($PREFIX/lib/sysusers.d),
#   BUILD_DIR (target/release: where the built binaries are).
# Without --no-build it runs `cargo build --release --bins` first.
# After installing into / : systemd-sysusers; systemctl daemon-reload.
set -eu
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr}
LIBEXECDIR=${LIBEXECDIR:-$PREFIX/libexec}
BINDIR=${BINDIR:-$PREFIX/bin}
DATADIR=${DATADIR:-$PREFIX/share}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-$SYSCONFDIR/systemd/system}
SYSUSERSDIR=${SYSUSERSDIR:-$PREFIX/lib/sysusers.d}
BUILD_DIR=${BUILD_DIR:-${CARGO_TARGET_DIR:-target}/release}
DESTDIR=${DESTDIR:-}

build=1
for a in "$@"; do
	case "$a" in
	--no-build) build=0 ;;
	-h | --help) sed -n '3,22p' "$0"; exit 0 ;;
	*) echo "install.sh: unknown argument $a" >&2; exit 2 ;;
	esac
done
if [ "$build" = 1 ]; then
	cargo build --release --bins
fi
for b in vhost-dirtylog-blk vhost-dirtylog-check; do
	[ -x "$BUILD_DIR/$b" ] || { echo "install.sh: $BUILD_DIR/$b missing (cargo build --release --bins)" >&2; exit 3; }
done

# Paths baked into the descriptor and the unit name the installed daemon.
subst() { sed -e "s|/usr/libexec/vhost-dirtylog-blk|$LIBEXECDIR/vhost-dirtylog-blk|g" "$1"; }

install -d "$DESTDIR$LIBEXECDIR" "$DESTDIR$BINDIR" "$DESTDIR$DATADIR/qemu/vhost-user" \
	"$DESTDIR$UNITDIR" "$DESTDIR$SYSUSERSDIR" "$DESTDIR$SYSCONFDIR/vhost-dirtylog"
install -m 0755 "$BUILD_DIR/vhost-dirtylog-blk" "$DESTDIR$LIBEXECDIR/vhost-dirtylog-blk"
install -m 0755 "$BUILD_DIR/vhost-dirtylog-check" "$DESTDIR$BINDIR/vhost-dirtylog-check"
subst contrib/vhost-user/50-vhost-dirtylog-blk.json >"$DESTDIR$DATADIR/qemu/vhost-user/50-vhost-dirtylog-blk.json"
for u in vhost-dirtylog-blk@.service vhost-dirtylog-blk@.socket; do
	subst "contrib/systemd/$u" >"$DESTDIR$UNITDIR/$u"
done
chmod 0644 "$DESTDIR$DATADIR/qemu/vhost-user/50-vhost-dirtylog-blk.json" "$DESTDIR$UNITDIR"/vhost-dirtylog-blk@.*
install -m 0644 contrib/systemd/vhost-dirtylog.sysusers.conf "$DESTDIR$SYSUSERSDIR/vhost-dirtylog.conf"
install -m 0644 contrib/systemd/vm.conf.example "$DESTDIR$SYSCONFDIR/vhost-dirtylog/vm.conf.example"

echo "installed into ${DESTDIR:-/}: $LIBEXECDIR/vhost-dirtylog-blk, $BINDIR/vhost-dirtylog-check,"
echo "  $DATADIR/qemu/vhost-user/50-vhost-dirtylog-blk.json, $UNITDIR/vhost-dirtylog-blk@.{service,socket},"
echo "  $SYSUSERSDIR/vhost-dirtylog.conf, $SYSCONFDIR/vhost-dirtylog/vm.conf.example"
if [ -z "$DESTDIR" ]; then
	echo "next: systemd-sysusers && systemctl daemon-reload; then per disk NAME:"
	echo "  cp $SYSCONFDIR/vhost-dirtylog/vm.conf.example $SYSCONFDIR/vhost-dirtylog/NAME.conf (set IMAGE=)"
	echo "  systemctl enable --now vhost-dirtylog-blk@NAME.socket"
fi
