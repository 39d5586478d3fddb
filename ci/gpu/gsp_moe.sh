#!/usr/bin/env bash
# GPU leg, part 4: shared-prefix throughput (radix cache on/off) and MoE decode.
source ci/gpu/setup.sh || exit 1
set -o pipefail
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
python3 -m portaserve.bench.offline $M --dataset generated-shared-prefix --gsp-num-groups 64 \
  --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048 --gsp-question-len 128 --gsp-output-len 256 \
  --schedule-policy lpm --compare-cascade-off --compare-no-cache 2>&1 | grep -v "^\[" | tail -6 | tee $OUT/offline_gsp.log
mkdir -p /tmp/qwen3moe && cp ci/gpu/qwen3-30b-a3b.json /tmp/qwen3moe/config.json
python3 -m portaserve.bench.one_batch --model-path /tmp/qwen3moe --load-format dummy --dtype bfloat16 \
  --context-length 4096 --batch-size 1 64 --input-len 128 --output-len 32 --cuda-graph-max-bs 64 \
  --max-running-requests 64 --mem-fraction-static 0.80 2>&1 | grep -E "bs=|Error|error|ops:|moe" | tee $OUT/moe.log
