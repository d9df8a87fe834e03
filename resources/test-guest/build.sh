#!/usr/bin/env bash
# Builds Outboard's test guest (a static x86-64 ELF) and caches it outside the
# repository, keyed by a hash of every input file and of `rustc -Vv`.
#
# Cache: ${OUTBOARD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outboard}/test-guest-<key16>/test-guest.elf
# The last line on stdout is the absolute path of the ELF; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target=x86_64-unknown-none

log() { printf 'test-guest: %s\n' "$*" >&2; }

cache_root="${OUTBOARD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outboard}"

# Key: relative path and sha256 of every input file (sorted, target/ excluded),
# then the compiler's full version.
key="$(
    cd "$here"
    find . -path ./target -prune -o -type f -print | LC_ALL=C sort | while IFS= read -r f; do
        printf '%s %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "$f"
    done
    rustc -Vv
)"
key="$(printf '%s' "$key" | sha256sum | cut -c1-16)"

out_dir="$cache_root/test-guest-$key"
elf="$out_dir/test-guest.elf"
if [[ -f "$elf" ]]; then
    log "cached: $elf"
    printf '%s\n' "$elf"
    exit 0
fi

if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$target"; then
        log "installing the $target Rust target"
        rustup target add "$target" >&2
    fi
fi

mkdir -p "$cache_root" "$out_dir"
export CARGO_TARGET_DIR="$cache_root/test-guest-target"
# The project's .cargo/config.toml carries the flags the image needs; flags from
# the environment would replace them.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
log "building (key $key) in $CARGO_TARGET_DIR"
(cd "$here" && cargo build --release -j2 --target "$target" >&2)

built="$CARGO_TARGET_DIR/$target/release/test-guest"
tmp="$out_dir/.test-guest.elf.tmp.$$"
cp "$built" "$tmp"
mv -f "$tmp" "$elf"
log "built: $elf"
printf '%s\n' "$elf"
