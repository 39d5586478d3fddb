#!/usr/bin/env bash
# GPU leg, part 1: kernels vs native on the device, engine vs transformers, then the
# batch-latency benchmarks of the Llama-3.1-8B shape (random weights, bf16).
source ci/gpu/setup.sh || exit 1
set -o pipefail
PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/triton tests/gpu -rA 2>&1 | tail -40 | tee $OUT/tests.log
python3 -m portaserve.bench.one_batch --model-path /tmp/llama8b --load-format dummy --dtype bfloat16 \
  --context-length 8192 --batch-size 1 32 128 --input-len 128 --output-len 32 --compare-hf \
  --output-file $OUT/one_batch.json 2>&1 | grep -v "^\[" | tee $OUT/one_batch.log
python3 -m portaserve.bench.one_batch --model-path /tmp/llama8b --load-format dummy --dtype bfloat16 \
  --context-length 8192 --batch-size 1 128 --input-len 128 --output-len 32 --disable-cuda-graph \
  2>&1 | grep "bs=" | sed 's/^/[no graphs] /' | tee -a $OUT/one_batch.log
