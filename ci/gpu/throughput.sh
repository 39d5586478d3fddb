#!/usr/bin/env bash
# GPU leg, part 2: decode latency with and without overlap, offline throughput on the
# random and generated-shared-prefix datasets (Llama-3.1-8B shape, random weights, bf16).
source ci/gpu/setup.sh || exit 1
set -o pipefail
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
python3 -m portaserve.bench.one_batch $M --context-length 8192 --batch-size 1 128 --input-len 128 \
  --output-len 64 2>&1 | grep "bs=" | tee $OUT/one_batch.log
python3 -m portaserve.bench.one_batch $M --context-length 8192 --batch-size 1 128 --input-len 128 \
  --output-len 64 --disable-overlap-schedule 2>&1 | grep "bs=" | sed 's/^/[no overlap] /' | tee -a $OUT/one_batch.log
python3 -m portaserve.bench.offline $M --dataset random --num-prompts 500 --random-input-len 4096 \
  --random-output-len 2048 --random-range-ratio 0 --output-file $OUT/offline_random.json 2>&1 \
  | grep -v "^\[" | tail -5 | tee $OUT/offline_random.log
