#!/usr/bin/env bash
# Fails when ptx/src/abi.rs is not what bindgen generates from
# ptx/include/meswitch_abi.h (someone edited one without the other).
# Needs libclang (Debian: apt-get install -y libclang-dev).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TMP="$(mktemp)"
trap 'rm -f "$TMP"' EXIT
cd "$ROOT"
cargo run -q -p meswitch-ptx --features gen-abi --bin gen_abi -- "$TMP"
if ! diff -u ptx/src/abi.rs "$TMP"; then
  echo "ptx/src/abi.rs is stale: cargo run -p meswitch-ptx --features gen-abi --bin gen_abi" >&2
  exit 1
fi
echo "ptx/src/abi.rs matches include/meswitch_abi.h"
