#!/usr/bin/env bash
# Builds phigen with `--features cuda` on a machine without a GPU (and without a CUDA install):
# nvcc and the CUDA headers come from PyPI, pinned to one CUDA release (13.0); the result is one
# stripped binary for H100/H200 (compute capability 9.0) that needs, where it runs, only the
# NVIDIA driver (libcuda.so.1) and cuBLAS / cuRAND (e.g. a PyTorch install's nvidia/cu13/lib on
# LD_LIBRARY_PATH). The recipe and its reasons: ../shared/cuda-build.md.
#
#   scripts/build-cuda.sh            # → target-cuda/release/phigen (stripped)
#   scripts/build-cuda.sh --tests    # also → target-cuda/release/phigen-tests, the library's unit
#                                    #   tests with the `cuda` ones (run it with `cuda` as filter)
#   scripts/build-cuda.sh --check    # only type-checks the CUDA build (NCCL backend included)
#
# Env: CUDA_VENV (default .cuda-venv, git-ignored), CUDA_COMPUTE_CAP (90), CUDAFORGE_THREADS (2),
# CARGO_TARGET_DIR (default: $HOME/.cache/phigen-target, shared with the CPU release build so only
# candle, its kernels and phigen are rebuilt). Takes 15-25 minutes on 2 cores the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CUDA_VENV:-.cuda-venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/phigen-target}"
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
CU="$(cd "$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)" && pwd)"
export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
export PHIGEN_CUDART_STATIC="$CU/lib/libcudart_static.a"
nvcc --version | tail -2

# candle-core 0.11.1 links the CUDA libraries at build time (cudarc `dynamic-linking`), which a
# machine without a GPU does not have: build against a copy that loads them at run time instead.
SRC="$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-0.11.1 2>/dev/null | head -1)"
if [ -z "$SRC" ]; then
  cargo fetch --locked
  SRC="$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-0.11.1 | head -1)"
fi
mkdir -p "$CARGO_TARGET_DIR"
PATCHED="$CARGO_TARGET_DIR/candle-core-0.11.1-dynamic-loading"
if [ ! -d "$PATCHED" ]; then
  cp -r "$SRC" "$PATCHED.tmp"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$PATCHED.tmp/Cargo.toml"
  mv "$PATCHED.tmp" "$PATCHED"
fi
grep -q '"dynamic-loading"' "$PATCHED/Cargo.toml"

# The patch rewrites Cargo.lock's entry for candle-core, so the build runs on a copy of the working
# tree: the repository (and its committed lock file) is never touched.
COPY="$CARGO_TARGET_DIR/phigen-cuda-src"
rm -rf "$COPY"
mkdir -p "$COPY"
tar -cf - --exclude=./target --exclude=./.git --exclude=./.cuda-venv --exclude=./target-cuda \
  --exclude=./data --exclude=./runs . | tar -xf - -C "$COPY"
if [ "${1:-}" = "--check" ]; then
  # Type-check the CUDA build (the NCCL backend included) without building the binary.
  (cd "$COPY" && cargo check --release --features cuda --lib --bins \
    --config "patch.crates-io.candle-core.path=\"$PATCHED\"")
  echo "the CUDA build type-checks"
  exit 0
fi
(cd "$COPY" && cargo build --release --features cuda \
  --config "patch.crates-io.candle-core.path=\"$PATCHED\"")
mkdir -p target-cuda/release
cp "$CARGO_TARGET_DIR/release/phigen" target-cuda/release/phigen
strip target-cuda/release/phigen
if [ "${1:-}" = "--tests" ]; then
  # The tests find their fixtures under the path they were compiled in ($COPY): where they run,
  # link that path to a checkout (scripts/gpu-check.sh does).
  TESTS="$(cd "$COPY" && cargo test --release --features cuda --lib --no-run --message-format=json \
    --config "patch.crates-io.candle-core.path=\"$PATCHED\"" \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "phigen":
        print(m["executable"])')"
  cp "$TESTS" target-cuda/release/phigen-tests
  strip target-cuda/release/phigen-tests
  echo "$COPY" > target-cuda/release/phigen-tests.manifest-dir
fi
ls -la target-cuda/release/phigen
echo "built target-cuda/release/phigen (sm_${CUDA_COMPUTE_CAP}); run it where libcuda.so.1 and cuBLAS are found"
