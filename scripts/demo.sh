#!/usr/bin/env bash
# The offline pipeline, step by step (the main job is `meswitch serve`): build the synthetic demo family (a small
# Mistral-architecture base + 16 fine-tune-like experts; synthetic, deterministic),
# compress every expert to INT2 with 1% salient channels, inspect one, and check one
# by decompressing it, then generate with it. Runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/demo}
experts=${MESWITCH_DEMO_EXPERTS:-16}
cargo build --release -q -p meswitch-server
bin=${CARGO_TARGET_DIR:-target}/release/meswitch
rm -rf "$out"
"$bin" synth -o "$out/family" --experts "$experts"
mkdir -p "$out/compressed"
for dir in "$out"/family/experts/*/; do
  name=$(basename "$dir")
  "$bin" compress --base "$out/family/base" --expert "$dir" --bits 2 --group 128 --salient 1% \
    -o "$out/compressed/$name.safetensors"
done
first=$(ls "$out"/compressed/*.safetensors | head -n 1)
"$bin" inspect "$first"
"$bin" decompress --base "$out/family/base" --delta "$first" -o "$out/decompressed"
# Generate on the CPU with the base plus one compressed expert (synthetic weights: the text is noise;
# what it shows is the runtime applying a compressed delta).
"$bin" generate --model "$out/family/base" --expert "$first" --prompt "Hello" --max-tokens 16
echo
echo "demo family: $out/family; compressed experts: $out/compressed; reconstructed expert: $out/decompressed"
