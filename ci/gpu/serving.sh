#!/usr/bin/env bash
# GPU leg, part 3: online serving and shared-prefix throughput on the Llama-3.1-8B shape,
# then MoE decode on the Qwen3-30B-A3B shape (random weights, bf16).
source ci/gpu/setup.sh || exit 1
set -o pipefail
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/triton 2>&1 | tail -3 | tee $OUT/tests.log
# online: 100 prompts at 1 request/s against `portaserve serve`
python3 -m portaserve.launch_server $M --skip-tokenizer-init --context-length 8192 --port 30000 \
  --log-level warning > $OUT/server.log 2>&1 &
SERVER=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:30000/health >/dev/null && break; sleep 1; done
python3 -m portaserve.cli bench serving --port 30000 --dataset-name random --num-prompts 100 \
  --random-input-len 1024 --random-output-len 256 --random-range-ratio 0.5 --request-rate 1 \
  --seed 0 --disable-tqdm 2>&1 | tail -25 | tee $OUT/serving.log
kill $SERVER; wait $SERVER 2>/dev/null
# generated-shared-prefix, radix cache on vs off
python3 -m portaserve.bench.offline $M --dataset generated-shared-prefix --gsp-num-groups 32 \
  --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048 --gsp-question-len 128 --gsp-output-len 256 \
  --compare-no-cache 2>&1 | grep -v "^\[" | tail -5 | tee $OUT/offline_gsp.log
# MoE decode
mkdir -p /tmp/qwen3moe && cp ci/gpu/qwen3-30b-a3b.json /tmp/qwen3moe/config.json
python3 -m portaserve.bench.one_batch --model-path /tmp/qwen3moe --load-format dummy --dtype bfloat16 \
  --context-length 4096 --batch-size 1 64 --input-len 128 --output-len 32 --cuda-graph-max-bs 64 \
  --max-running-requests 64 --mem-fraction-static 0.80 2>&1 | grep -E "bs=|Error|error" | tee $OUT/moe.log
