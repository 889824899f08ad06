#!/usr/bin/env bash
# A Q4_K_M SmolLM2-135M-Instruct for the K-quant benchmarks and checks, made here, never
# downloaded: the HF directory ../shared/anchors/convert_smollm2.sh writes (from the default
# model's wheel) -> llama.cpp's convert_hf_to_gguf.py (F16) -> llama-quantize Q4_K_M.
# Needs `../shared/anchors/llamacpp.sh install` (its llama.cpp tree and build folder).
#
# usage: bench/make_q4_k_m.sh [OUT]   (default /tmp/anchors/models/smollm2-135m-q4_k_m.gguf)
set -euo pipefail
ROOT=${ROOT:-/tmp/anchors}
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/models/smollm2-135m-q4_k_m.gguf}
HF=$ROOT/models/smollm2-135m-instruct-hf
LLAMA=$(ls -d "$ROOT"/src/llama_cpp_python-*/vendor/llama.cpp | tail -1)
BUILD=$ROOT/llamacpp-build
VENV=$ROOT/convert-venv
[ -s "$OUT" ] && { echo "$OUT"; exit 0; }
[ -d "$HF" ] || bash "$HERE/../shared/anchors/convert_smollm2.sh" "$HF" >&2
[ -x "$BUILD/bin/llama-quantize" ] || cmake --build "$BUILD" --target llama-quantize -j2 >&2
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 numpy sentencepiece safetensors transformers >&2
fi
"$VENV/bin/python" "$LLAMA/convert_hf_to_gguf.py" "$HF" --outtype f16 --outfile "$OUT.f16" >&2
"$BUILD/bin/llama-quantize" "$OUT.f16" "$OUT" Q4_K_M >&2
rm -f "$OUT.f16"
echo "$OUT"
