#!/usr/bin/env bash
# Compiles ptx/kernels/*.cu to PTX with NVRTC (compute_80), assembles each
# module with ptxas for sm_80/86/89/90 with spills as errors, and writes the
# register/shared-memory/spill report into docs/kernels.md.
#
#   scripts/build_ptx.sh           regenerate ptx/ptx/*.ptx and the report
#   scripts/build_ptx.sh --check   regenerate into a temp dir; fail if anything
#                                  differs from what is committed (CI)
#
# The toolchain is the pinned NVIDIA wheels in .cuda-venv (git-ignored), see
# /work/shared/TOOLCHAIN.md; nothing needs a GPU or a CUDA install.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.cuda-venv"
WHEELS=(nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86)
KERNELS=(multi_expert_gemv delta_gemv multi_expert_gemv_wide delta_gemv_wide dequantize norm rope activation attention)
ARCHS=(80 86 89 90)

check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m; [m.version(p) for p in ('nvidia-cuda-nvrtc-cu12','nvidia-cuda-runtime-cu12','nvidia-cuda-nvcc-cu12')]" 2>/dev/null; then
  "$VENV/bin/pip" install -q "${WHEELS[@]}"
fi
NV="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia"
LIBNVRTC="$NV/cuda_nvrtc/lib/libnvrtc.so.12"
PTXAS="$NV/cuda_nvcc/bin/ptxas"

if [ "$check" = 1 ]; then
  OUT="$(mktemp -d)"
  trap 'rm -rf "$OUT"' EXIT
  mkdir -p "$OUT/ptx" "$OUT/docs"
  PTX_DIR="$OUT/ptx"
  DOC="$OUT/docs/kernels.md"
  cp "$ROOT/docs/kernels.md" "$DOC"
else
  PTX_DIR="$ROOT/ptx/ptx"
  DOC="$ROOT/docs/kernels.md"
  mkdir -p "$PTX_DIR"
fi

# Relative include paths and the cwd fixed at the repository root keep the
# output independent of where the checkout lives.
cd "$ROOT"
for k in "${KERNELS[@]}"; do
  "$VENV/bin/python" scripts/nvrtc_ptx.py "$LIBNVRTC" "ptx/kernels/$k.cu" "$PTX_DIR/$k.ptx" \
    "-I$NV/cuda_runtime/include" -Iptx/include -Iptx/kernels
done

# ptxas: any spill is an error; the -v output feeds the report.
"$VENV/bin/python" scripts/ptxas_report.py "$PTXAS" "$DOC" "$PTX_DIR" "${ARCHS[*]}" "${KERNELS[@]}"

if [ "$check" = 1 ]; then
  status=0
  for k in "${KERNELS[@]}"; do
    if ! cmp -s "$PTX_DIR/$k.ptx" "ptx/ptx/$k.ptx"; then
      echo "ptx/ptx/$k.ptx is stale: run scripts/build_ptx.sh" >&2
      status=1
    fi
  done
  if ! diff -u docs/kernels.md "$DOC"; then
    echo "docs/kernels.md ptxas report is stale: run scripts/build_ptx.sh" >&2
    status=1
  fi
  [ "$status" = 0 ] && echo "PTX and ptxas report up to date"
  exit "$status"
fi
echo "wrote ${KERNELS[*]/#/ptx/ptx/} (.ptx) and the report in docs/kernels.md"
