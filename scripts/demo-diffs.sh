#!/usr/bin/env bash
# A walk through the diff library with the diffcast CLI: a base model, three updates,
# exact and budgeted diffs, a chain applied to a device copy, a composed diff, digests.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-demo-output/diffs}
rm -rf "$OUT" && mkdir -p "$OUT"
"$BIN/python" scripts/make-demo-models.py "$OUT"
echo "== exact diffs of three consecutive fine-tunes"
for i in 1 2 3; do
  "$BIN/diffcast" diff make "$OUT/v$((i - 1)).safetensors" "$OUT/v$i.safetensors" -o "$OUT/v$((i - 1))-v$i.diff"
done
echo "== a sparse approximation of the first update at 2% of the model's size"
"$BIN/diffcast" diff make "$OUT/v0.safetensors" "$OUT/v1.safetensors" --method sparse --budget 2% -o "$OUT/v0-v1.sparse.diff"
"$BIN/diffcast" diff inspect "$OUT/v0-v1.sparse.diff"
echo "== a device at v0 applies the chain v0 -> v3"
"$BIN/diffcast" diff apply "$OUT/v0.safetensors" "$OUT/v0-v1.diff" "$OUT/v1-v2.diff" "$OUT/v2-v3.diff" -o "$OUT/device.safetensors"
echo "== one composed diff v0 -> v3, and the digests that prove it"
"$BIN/diffcast" diff compose "$OUT/v0.safetensors" "$OUT/v0-v1.diff" "$OUT/v1-v2.diff" "$OUT/v2-v3.diff" -o "$OUT/v0-v3.diff"
"$BIN/diffcast" diff verify "$OUT/v0.safetensors" "$OUT/v0-v3.diff"
"$BIN/diffcast" diff verify "$OUT/device.safetensors" --expect "$("$BIN/python" -c "import sys; from diffs.digest import file_digest; print(file_digest(sys.argv[1]))" "$OUT/v3.safetensors")"
ls -l "$OUT"/*.diff "$OUT/v0.safetensors"
