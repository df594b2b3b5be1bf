#!/usr/bin/env bash
# Prepares a GPU verification run. The GPU machine has no Rust toolchain, so the GPU test and
# bench executables are built HERE (no GPU needed) and staged in the git-ignored .device/ folder
# with a driver script, .device/run_on_gpu.sh, that runs there:
#   1. every tests/gpu_*.rs binary with MESWITCH_REQUIRE_GPU=1 (a missing device fails, not skips);
#   2. compute-sanitizer memcheck on named_edge_cases (every GEMV kernel family and bit width) and
#      named_layer_edge_cases (every layer kernel, tests/gpu_layers.rs);
#   2b. the CUDA model runtime against the CPU one (server-mini/tests/cuda_backend.rs, in stage tests);
#   3. the gemv bench (criterion + CSV/JSON/PNG), sweep from MESWITCH_BENCH_* (see benches/gemv.rs).
#   4. (stage decode only, not in all) the model runtime's decode bench, benches/decode.rs.
# Everything it writes goes under $OUT (the device tool's output folder).
#
# Usage: scripts/gpu_session.sh        (then run the printed command on the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
stage=.device
rm -rf "$stage"
mkdir -p "$stage"

# Prints the executable paths of the artifacts cargo just built (JSON messages on stdout).
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}

# Every binary is staged stripped (debug info only makes it larger) and gzipped under
# packed/<folder>/ (the device tool's transfer limit is 64 MiB, and each binary embeds all the
# PTX); run_on_gpu.sh unpacks them into <folder>/.
mkdir -p "$stage/packed/tests" "$stage/packed/benches" "$stage/packed/decode"
pack() {  # pack <exe> <dest.gz>
  objcopy --strip-debug "$1" "$stage/packed/tmp" && gzip -9 -c "$stage/packed/tmp" > "$2" && rm "$stage/packed/tmp"
}
test_args=()
for t in tests/gpu_*.rs; do test_args+=(--test "$(basename "$t" .rs)"); done
cargo test --no-run "${test_args[@]}" --message-format=json | executables | while read -r name exe; do
  pack "$exe" "$stage/packed/tests/$name.gz"
done
cargo bench --no-run --bench gemv --message-format=json | executables | while read -r name exe; do
  pack "$exe" "$stage/packed/benches/$name.gz"
done
# The CUDA model runtime: its test runs with the other tests; the decode bench (a 7B-shaped model,
# minutes of setup) is a stage of its own. Building a server-mini integration test also builds the
# `meswitch` binary: only the test is staged.
cargo test --no-run -p meswitch-server --test cuda_backend --message-format=json | executables | while read -r name exe; do
  [ "$name" = cuda_backend ] || continue
  pack "$exe" "$stage/packed/tests/$name.gz"
done
cargo bench --no-run --bench decode --message-format=json | executables | while read -r name exe; do
  pack "$exe" "$stage/packed/decode/$name.gz"
done

# The real model for the CPU-vs-CUDA check (cuda_backend's smollm2 test): the full SmolLM2 GGUF
# (94 MiB, incompressible) does not fit the 64 MiB transfer, so its first 3 layers with the
# embedding requantized to Q4_1 go instead (scripts/cut_gguf.py; 23 MiB gzipped).
gguf_full=${MESWITCH_SMOLLM2_GGUF:-.data/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ -f "$gguf_full" ]; then
  [ -x .gguf-venv/bin/python ] || { python3 -m venv .gguf-venv && .gguf-venv/bin/pip install -q gguf==0.19.0; }
  mkdir -p "$stage/packed/data"
  .gguf-venv/bin/python scripts/cut_gguf.py "$gguf_full" "$stage/packed/smollm2-cut.gguf" 3 --embedding-type Q4_1
  gzip -9 -c "$stage/packed/smollm2-cut.gguf" > "$stage/packed/data/smollm2-cut.gguf.gz"
  rm "$stage/packed/smollm2-cut.gguf"
else
  echo "no SmolLM2 GGUF at $gguf_full: the real-model CPU-vs-CUDA test will skip on the device" >&2
fi

cat > "$stage/run_on_gpu.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root:
#   bash .device/run_on_gpu.sh [all|tests|memcheck|bench|decode|session]     (default all)
# `session` is the one-call verification (tests, decode bench, memcheck under deadlines).
# One stage per call fits a 10-minute command limit; the bench sweep is set by MESWITCH_BENCH_*.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
stage=${1:-all}
OUT=${OUT:-$here/out}
# Binaries staged gzipped (packed/<folder>/<name>.gz): unpack each into <folder>/ once.
for gz in "$here"/packed/*/*.gz; do
  [ -e "$gz" ] || continue
  dir="$here/$(basename "$(dirname "$gz")")"
  bin="$dir/$(basename "$gz" .gz)"
  mkdir -p "$dir"
  [ -x "$bin" ] || { gunzip -c "$gz" > "$bin" && chmod +x "$bin"; }
done
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session-$stage.log") 2>&1

# cudarc opens libcublas by name (libcublas.so, .so.12, ...): collect the toolkit's and any pip
# wheel's copy, and link an unversioned name to whatever major version is there.
libdir="$here/lib"
mkdir -p "$libdir"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cublas", "lib") for p in nvidia.__path__))' 2>/dev/null); do
  [ -d "$d" ] || continue
  LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  if [ ! -e "$libdir/libcublas.so" ]; then
    found=$(ls "$d"/libcublas.so* 2>/dev/null | head -n1 || true)
    [ -n "$found" ] && ln -sf "$found" "$libdir/libcublas.so"
  fi
done
export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
export MESWITCH_REQUIRE_GPU=1
# Test binaries look for the SmolLM2 GGUF under their build machine's repository path; point them
# at a copy carried to this machine (.data/ of the repository root), if there is one.
repo=$(cd "$here/.." && pwd)
if [ -z "${MESWITCH_SMOLLM2_GGUF:-}" ] && [ -f "$repo/.data/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  export MESWITCH_SMOLLM2_GGUF="$repo/.data/SmolLM2-135M-Instruct.Q4_1.gguf"
elif [ -z "${MESWITCH_SMOLLM2_GGUF:-}" ] && [ -f "$here/data/smollm2-cut.gguf" ]; then
  # The staged 3-layer cut (gpu_session.sh): a real model small enough to carry.
  export MESWITCH_SMOLLM2_GGUF="$here/data/smollm2-cut.gguf"
fi
PATH="$PATH:/usr/local/cuda/bin"

date -u
nvidia-smi || true
status=0
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  for t in "$here"/tests/*; do
    echo "== $(basename "$t")"
    "$t" --test-threads=1 || status=1
  done
fi

if [ "$stage" = all ] || [ "$stage" = memcheck ]; then
  echo "== compute-sanitizer memcheck"
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 99 \
      "$here/tests/gpu_kernels" named_edge_cases --exact --test-threads=1 || status=1
    # The layer kernels' named cases (every layer kernel, a grown cache, rejected inputs).
    compute-sanitizer --tool memcheck --error-exitcode 99 \
      "$here/tests/gpu_layers" named_layer_edge_cases --exact --test-threads=1 || status=1
  else
    echo "compute-sanitizer not found"; status=1
  fi
fi

if [ "$stage" = all ] || [ "$stage" = bench ]; then
  echo "== bench"
  for b in "$here"/benches/*; do
    # criterion's own files stay off $OUT (the device tool returns at most 8 files).
    MESWITCH_BENCH_OUT="$OUT/bench" CRITERION_HOME="${TMPDIR:-/tmp}/criterion" "$b" --bench || status=1
  done
fi
if [ "$stage" = decode ]; then
  # Not part of "all": a 32-layer run needs most of a 10-minute call by itself.
  # MESWITCH_DECODE_LAYERS=4 (etc., see benches/decode.rs) for a quick run.
  echo "== decode bench"
  for b in "$here"/decode/*; do
    CRITERION_HOME="${TMPDIR:-/tmp}/criterion" "$b" --bench || status=1
  done
fi
if [ "$stage" = session ]; then
  # The whole verification in one call that fits the device tool's 10-minute
  # command limit (a session has 15 minutes of device time, start included),
  # most valuable first: the correctness tests (the CUDA runtime against the
  # CPU one among them), the 32-layer decode bench (the issues' GPU figures),
  # then memcheck. Each part stops at its deadline and the next one runs.
  export MESWITCH_GPU_PROPTEST_CASES=${MESWITCH_GPU_PROPTEST_CASES:-16}
  deadline=$((SECONDS + ${MESWITCH_SESSION_TESTS_S:-200}))
  for t in "$here"/tests/*; do
    left=$((deadline - SECONDS))
    [ "$left" -gt 5 ] || { echo "== $(basename "$t"): skipped, test budget spent"; status=1; continue; }
    echo "== $(basename "$t") (at most ${left}s)"
    timeout "$left" "$t" --test-threads=1 || status=1
  done
  echo "== decode bench (at most ${MESWITCH_SESSION_DECODE_S:-270}s)"
  for b in "$here"/decode/*; do
    MESWITCH_DECODE_MEASURE_S=${MESWITCH_DECODE_MEASURE_S:-2} CRITERION_HOME="${TMPDIR:-/tmp}/criterion" \
      timeout "${MESWITCH_SESSION_DECODE_S:-270}" "$b" --bench || status=1
  done
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck (at most 90s)"
    timeout 60 compute-sanitizer --tool memcheck --error-exitcode 99 \
      "$here/tests/gpu_kernels" named_edge_cases --exact --test-threads=1 || status=1
    timeout 30 compute-sanitizer --tool memcheck --error-exitcode 99 \
      "$here/tests/gpu_layers" named_layer_edge_cases --exact --test-threads=1 || status=1
  fi
fi
date -u
exit $status
RUN
chmod +x "$stage/run_on_gpu.sh"
cp scripts/gpu_profile.sh "$stage/profile.sh"   # ncu profile: bash .device/profile.sh

du -sh "$stage"
echo
echo "Staged in $stage/. On the GPU machine (device tool: carry [\"$stage\"]), from the repo root,"
echo "the whole verification in one call (timeout_s 600; fits a 15-minute device budget):"
echo "  bash $stage/run_on_gpu.sh session"
echo "or one stage per call (each fits a 10-minute limit):"
echo "  bash $stage/run_on_gpu.sh tests      # MESWITCH_GPU_PROPTEST_CASES=N to change the 64 cases"
echo "  bash $stage/run_on_gpu.sh memcheck"
echo "  bash $stage/run_on_gpu.sh decode     # model decode bench; MESWITCH_DECODE_LAYERS=4 for a quick run"
echo "  bash $stage/run_on_gpu.sh bench      # the full sweep may not fit one call; a subset, e.g.:"
echo "  MESWITCH_BENCH_SHAPES=4096x4096,14336x4096 MESWITCH_BENCH_BITS=2 bash $stage/run_on_gpu.sh bench"
