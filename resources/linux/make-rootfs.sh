#!/bin/bash
# Builds an ext4 root file system image for the Linux guest's slow-lane
# block tests: busybox-static, /sbin/init (the same script as the
# initramfs's /init: it runs `outboard.cmd=` and powers down), and the files
# of an optional directory copied to the root.
#
#   make-rootfs.sh OUT.img SIZE_MIB [EXTRA_DIR]
#
# Needs busybox-static and e2fsprogs (mkfs.ext4 -d); .ci/run installs them.
# Takes about a second; images are not cached.
set -euo pipefail

die() { echo "make-rootfs: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: make-rootfs.sh OUT.img SIZE_MIB [EXTRA_DIR]"
out=$1 size=$2 extra=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found: apt-get install e2fsprogs"
busybox=$(dpkg-query -L busybox-static 2>/dev/null | grep -E '/bin/busybox$' | head -n1 || true)
[ -x "$busybox" ] || die "busybox-static not installed: apt-get install busybox-static"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
install -m 0755 "$busybox" "$root/bin/busybox"
"$busybox" --list-full | while IFS= read -r app; do
	[ "$app" = bin/busybox ] && continue
	[ -e "$root/$app" ] || ln -s /bin/busybox "$root/$app"
done
install -m 0755 "$here/init" "$root/sbin/init"
if [ -n "$extra" ]; then
	cp -a "$extra"/. "$root"/
fi
rm -f "$out"
mkfs.ext4 -q -F -L outboard-root -d "$root" "$out" "${size}M" >&2 \
	|| die "mkfs.ext4 failed for $out"
echo "$out"
