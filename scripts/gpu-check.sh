#!/usr/bin/env bash
# Runs on a GPU machine (no Rust toolchain needed) what scripts/build-cuda.sh --tests built here:
# the `cuda` unit tests (parity with transformers in f32/bf16, gradients, AdamW, CPU-vs-GPU loss
# curve) and the tiny recipe on the GPU. Needs the NVIDIA driver and cuBLAS/cuRAND: a PyTorch
# install's nvidia/cu13/lib is found through LD_LIBRARY_PATH (TORCH_VENV, default /opt/torch/.venv).
#
#   scripts/gpu-check.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target-cuda/release
for f in phigen phigen-tests; do
  if [ -f "$BIN/$f.gz" ] && [ ! -x "$BIN/$f" ]; then gunzip -kf "$BIN/$f.gz"; chmod +x "$BIN/$f"; fi
done
VENV="${TORCH_VENV:-/opt/torch/.venv}"
LIB="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1 || true)"
export LD_LIBRARY_PATH="${LIB:+$LIB:}${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The tests read their fixtures below the directory they were compiled in.
DIR="$(cat "$BIN/phigen-tests.manifest-dir")"
if [ ! -e "$DIR" ]; then mkdir -p "$(dirname "$DIR")"; ln -s "$PWD" "$DIR"; fi
"$BIN/phigen-tests" cuda --test-threads 1
