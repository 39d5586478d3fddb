#!/usr/bin/env bash
# Multi-GPU leg (2 GPUs): tensor parallelism on the Llama-3.1-8B shape, random bf16 weights.
source ci/gpu/setup.sh || exit 1
set -o pipefail
export NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0
nvidia-smi topo -m | head -5
python3 ci/gpu/tp_check.py /tmp/llama8b 2>&1 | grep -v "^\[" | grep -v "^  " | tee $OUT/tp_check.log
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16 --context-length 8192"
for tp in 1 2; do
  python3 -m portaserve.bench.one_batch $M --tp $tp --batch-size 1 32 128 --input-len 128 --output-len 64 \
    2>&1 | grep "bs=" | sed "s/^/[tp=$tp] /" | tee -a $OUT/one_batch_tp.log
done
if [ "${TP_OFFLINE:-1}" = 1 ]; then
  python3 -m portaserve.bench.offline --model-path /tmp/llama8b --load-format dummy --dtype bfloat16 --tp 2 --dataset random --num-prompts 500 --random-input-len 4096 \
    --random-output-len 2048 --random-range-ratio 0 --output-file $OUT/offline_random_tp2.json 2>&1 \
    | grep -v "^\[" | tail -5 | tee $OUT/offline_random_tp2.log
fi
