#!/usr/bin/env bash
# GPU leg, part 2: compiled-kernel tests, a decode profile, offline throughput (random).
source ci/gpu/setup.sh || exit 1
set -o pipefail
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/triton tests/gpu -rA 2>&1 | tail -25 | tee $OUT/tests.log
python3 -m portaserve.bench.one_batch $M --context-length 8192 --batch-size 1 128 --input-len 128 \
  --output-len 32 --profile 2>&1 | grep -v "^\[" | tee $OUT/one_batch.log
python3 -m portaserve.bench.offline $M --dataset random --num-prompts 500 --random-input-len 4096 \
  --random-output-len 2048 --random-range-ratio 0 --output-file $OUT/offline_random.json 2>&1 \
  | grep -v "^\[" | tail -8 | tee $OUT/offline_random.log
