#!/usr/bin/env bash
# Multi-GPU leg (2 GPUs): tensor parallelism on the Llama-3.1-8B shape, random bf16 weights.
# Each step has its own time limit and writes its full log under $OUT.
source ci/gpu/setup.sh || exit 1
export NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0
nvidia-smi topo -m | head -4
STEP_SHOW="TP=|prompt|bs=|tok/s|Throughput|throughput|Error|error|Traceback" STEP_HIDE="^\["
step tp_check 200 python3 ci/gpu/tp_check.py /tmp/llama8b
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16 --context-length 8192 --cuda-graph-max-bs 64"
step one_batch_tp1 90 python3 -m portaserve.bench.one_batch $M --tp 1 --batch-size 1 --input-len 128 --output-len 64
step one_batch_tp2 110 python3 -m portaserve.bench.one_batch $M --tp 2 --batch-size 1 32 --input-len 128 --output-len 64
step offline_tp2 ${OFFLINE_SECS:-240} python3 -m portaserve.bench.offline --model-path /tmp/llama8b --load-format dummy \
  --dtype bfloat16 --tp 2 --dataset random --num-prompts 500 --random-input-len 4096 --random-output-len 2048 \
  --random-range-ratio 0 --output-file $OUT/offline_random_tp2.json
