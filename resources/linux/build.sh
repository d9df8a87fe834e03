#!/usr/bin/env bash
# Build (or find in the cache) Outboard's Linux guest: vmlinux, bzImage and a
# busybox initramfs, from Debian's linux-source-6.1 and busybox-static.
#
#   resources/linux/build.sh        -> prints the cache directory (absolute),
#                                      holding vmlinux, bzImage, initramfs.cpio.gz
#
# initramfs.cpio is the same archive uncompressed: on a PVM host (every guest
# instruction emulated) gunzipping the 1 MB initramfs.cpio.gz takes ~110 s of
# the boot, the uncompressed one unpacks in a few seconds. Use it there.
#
# Environment:
#   OUTBOARD_CACHE_DIR  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/outboard)
#   JOBS                make -j (default 2)
#   KEEP_BUILD=1        keep the kernel work tree under the cache root
#   VERBOSE=1           stream the kernel build output to stderr
#
# The cache key is a sha256 over this script, microvm.config, patches/*.patch,
# init, the linux-source-6.1 and busybox-static package versions and the gcc
# version. Progress goes to stderr; the last stdout line is the directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JOBS=${JOBS:-2}
cache_root=${OUTBOARD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outboard}
t0=$SECONDS

log() { printf '[linux-guest %4ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- packages ---------------------------------------------------------------
# Debian packages the build needs (CI installs them too).
packages=(linux-source-6.1 busybox-static gcc make flex bison bc libelf-dev
	libssl-dev cpio xz-utils lz4 gzip patch)

ensure_packages() {
	local missing=() p
	for p in "${packages[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
			missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing missing packages: ${missing[*]}"
	local sudo=()
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || die "not root and no sudo: apt-get install ${missing[*]}"
		sudo=(sudo)
	fi
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
}
ensure_packages

src_tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tarball" ] || die "$src_tarball not found (package linux-source-6.1)"
busybox=$(dpkg-query -L busybox-static | grep -E '/bin/busybox$' | head -n1)
[ -x "$busybox" ] || die "busybox-static binary not found"

# ---- cache key --------------------------------------------------------------
shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob
key=$(
	{
		for f in "$here/build.sh" "$here/microvm.config" "$here/init" "${patches[@]}"; do
			printf '== %s\n' "${f#"$here"/}"
			cat "$f"
		done
		printf '== linux-source-6.1 %s\n' "$(dpkg-query -W -f='${Version}' linux-source-6.1)"
		printf '== busybox-static %s\n' "$(dpkg-query -W -f='${Version}' busybox-static)"
		printf '== gcc %s\n' "$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
	} | sha256sum | cut -c1-16
)
mkdir -p "$cache_root"
cache_root=$(cd "$cache_root" && pwd)
out="$cache_root/linux-$key"

complete() {
	[ -f "$1/vmlinux" ] && [ -f "$1/bzImage" ] && [ -f "$1/initramfs.cpio.gz" ] && [ -f "$1/initramfs.cpio" ]
}

if complete "$out"; then
	echo "$out"
	exit 0
fi

# One builder per key; others wait and then take the cached result.
exec 9>"$cache_root/linux-$key.lock"
if ! flock -n 9; then
	log "another build of linux-$key is running; waiting"
	flock 9
fi
if complete "$out"; then
	echo "$out"
	exit 0
fi

log "building linux-$key in $cache_root (JOBS=$JOBS)"
work="$cache_root/build-linux-$key.$$"
tmp="$cache_root/.linux-$key.tmp.$$"
buildlog="$cache_root/build-linux-$key.log"
cleanup() {
	rm -rf "$tmp"
	if [ "${KEEP_BUILD:-0}" = 1 ]; then
		[ -d "$work" ] && log "kept work tree: $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
rm -rf "$work" "$tmp"
mkdir -p "$work" "$tmp"
: >"$buildlog"

# Run a command with its output in the build log (or on stderr with VERBOSE=1);
# on failure show the log's tail.
run() {
	if [ "${VERBOSE:-0}" = 1 ]; then
		{ "$@" 2>&1 | tee -a "$buildlog" >&2; } || die "failed: $* (full log: $buildlog)"
	elif ! "$@" >>"$buildlog" 2>&1; then
		tail -n 40 "$buildlog" >&2
		die "failed: $* (full log: $buildlog)"
	fi
}

log "unpacking $src_tarball"
tar -xf "$src_tarball" -C "$work"
ksrc="$work/linux-source-6.1"
[ -f "$ksrc/Makefile" ] || die "unexpected tarball layout: no linux-source-6.1/Makefile"

for p in "${patches[@]}"; do
	log "applying ${p#"$here"/}"
	run patch -d "$ksrc" -p1 --forward --batch -i "$p"
done

export ARCH=x86_64
export KBUILD_BUILD_USER=outboard KBUILD_BUILD_HOST=outboard
export KBUILD_BUILD_TIMESTAMP="linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
kmake() { run make -C "$ksrc" "$@"; }

log "configuring: tinyconfig + microvm.config + olddefconfig"
kmake tinyconfig
run "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "$here/microvm.config"
kmake olddefconfig

# Every CONFIG_X=... and "# CONFIG_X is not set" of the fragment must survive.
lost=()
while IFS= read -r line; do
	case "$line" in
	"# CONFIG_"*" is not set")
		sym=${line#\# }
		sym=${sym%% *}
		grep -Eq "^$sym=[ym]\$" "$ksrc/.config" && lost+=("$line (have: $(grep -E "^$sym=" "$ksrc/.config"))")
		;;
	CONFIG_*=*)
		sym=${line%%=*}
		grep -qxF -- "$line" "$ksrc/.config" ||
			lost+=("$line (have: $(grep -E "^(# )?$sym[= ]" "$ksrc/.config" || echo 'absent'))")
		;;
	esac
done < <(grep -E '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set)' "$here/microvm.config")
if [ ${#lost[@]} -ne 0 ]; then
	log "microvm.config: ${#lost[@]} symbol(s) did not keep their value after olddefconfig:"
	printf '    %s\n' "${lost[@]}" >&2
	die "fix microvm.config (add the missing dependencies)"
fi

log "make -j$JOBS vmlinux bzImage (log: $buildlog)"
kmake -j"$JOBS" vmlinux bzImage
log "kernel built: vmlinux $(stat -c %s "$ksrc/vmlinux") bytes, bzImage $(stat -c %s "$ksrc/arch/x86/boot/bzImage") bytes"

log "building initramfs (busybox $(dpkg-query -W -f='${Version}' busybox-static))"
[ -x "$ksrc/usr/gen_init_cpio" ] || kmake usr/gen_init_cpio
initdir="$work/initramfs"
mkdir -p "$initdir"
install -m 0755 "$here/init" "$initdir/init"
install -m 0755 "$busybox" "$initdir/busybox"
touch -d @0 "$initdir/init" "$initdir/busybox"
list="$work/initramfs.list"
{
	for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /tmp /root /etc /mnt /run; do
		echo "dir $d 0755 0 0"
	done
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
	echo "file /init $initdir/init 0755 0 0"
	echo "file /bin/busybox $initdir/busybox 0755 0 0"
	"$busybox" --list-full | sort | while IFS= read -r app; do
		[ "$app" = bin/busybox ] && continue
		echo "slink /$app /bin/busybox 0777 0 0"
	done
} >"$list"
"$ksrc/usr/gen_init_cpio" -t 0 "$list" >"$tmp/initramfs.cpio"
gzip -9 -n -c "$tmp/initramfs.cpio" >"$tmp/initramfs.cpio.gz"

cp "$ksrc/vmlinux" "$tmp/vmlinux"
cp "$ksrc/arch/x86/boot/bzImage" "$tmp/bzImage"
cp "$ksrc/.config" "$tmp/config"
cp "$ksrc/System.map" "$tmp/System.map"
{
	echo "key $key"
	echo "linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
	echo "busybox-static $(dpkg-query -W -f='${Version}' busybox-static)"
	echo "gcc $(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
	echo "kernel $(make -s -C "$ksrc" kernelrelease 2>/dev/null)"
} >"$tmp/build-info.txt"

mv "$buildlog" "$tmp/build.log"
rm -rf "$out"
mv -T "$tmp" "$out"
log "done: $out (initramfs.cpio.gz $(stat -c %s "$out/initramfs.cpio.gz") bytes, initramfs.cpio $(stat -c %s "$out/initramfs.cpio") bytes)"
echo "$out"
