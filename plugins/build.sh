#!/usr/bin/env bash
# Builds every guest plugin to a wasm32-wasip2 component and copies the results to
# plugins/dist/<crate-name>.wasm (dashes, e.g. dist/default-ordering.wasm).
#
# Idempotent and quick when nothing changed (cargo's own freshness check; files in dist/ are
# only replaced when their content changed, so watchers and mtimes stay quiet).
# Env: PLUGINS_DIST=/dir to copy elsewhere; MC_PLUGINS_TARGET_DIR=/dir for the guests' build
# cache (default ~/.cache/module-controller/plugins-target, outside the repo so a fresh clone
# reuses it). CARGO_TARGET_DIR is ignored on purpose: it is the host build's.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dist="${PLUGINS_DIST:-$here/dist}"
log() { printf '[plugins/build.sh] %s\n' "$*" >&2; }

if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    log "adding Rust target wasm32-wasip2"
    rustup target add wasm32-wasip2 >/dev/null
  fi
fi

cd "$here"
target_dir="${MC_PLUGINS_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/module-controller/plugins-target}"
unset CARGO_TARGET_DIR
cargo build --release --quiet --target wasm32-wasip2 --target-dir "$target_dir"

mkdir -p "$dist"
out="$target_dir/wasm32-wasip2/release"
count=0
for wasm in "$out"/*.wasm; do
  name="$(basename "$wasm" .wasm)"
  dest="$dist/${name//_/-}.wasm"
  if ! cmp -s "$wasm" "$dest"; then
    # A private temp name and rename: concurrent runs (parallel test binaries) never expose
    # a half-copied file.
    tmp="$(mktemp "$dist/.${name}.XXXXXX")"
    cp "$wasm" "$tmp"
    mv -f "$tmp" "$dest"
  fi
  count=$((count + 1))
done
log "$count plugin components in $dist"
