#!/usr/bin/env bash
# CI gate for the kernels (called by .ci/run): the committed PTX and ptxas
# report match a fresh NVRTC/ptxas build (spills are errors), and
# ptx/src/abi.rs matches a fresh bindgen run over ptx/include/meswitch_abi.h.
set -euo pipefail
cd "$(dirname "$0")/.."

# bindgen needs libclang; Debian/Ubuntu CI images install it on demand.
if ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; then
  if command -v apt-get >/dev/null; then
    # A fresh machine has no package lists until the first update.
    apt-get update -q >/dev/null && apt-get install -y -q libclang-dev >/dev/null
  else
    echo "libclang not found: install libclang-dev (needed by scripts/check_abi.sh)" >&2
    exit 1
  fi
fi

bash scripts/build_ptx.sh --check
bash scripts/check_abi.sh
