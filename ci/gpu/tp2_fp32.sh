#!/usr/bin/env bash
# TP=2 vs TP=1 in float32 (bf16 near-ties flip greedy tokens on random weights), and
# decode latency at TP=1/TP=2 side by side.  (setup.sh's step).
source ci/gpu/setup.sh || exit 1
export NCCL_NVLS_ENABLE=0 NCCL_CUMEM_ENABLE=0
STEP_SHOW="TP=|prompt|bs=|stopping|exiting|stopped|left the|Error|error|Traceback" STEP_SHOW_LINES=14
step tp_check_fp32 170 python3 ci/gpu/tp_check.py /tmp/llama8b float32
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16 --context-length 8192 --cuda-graph-max-bs 128"
step one_batch_tp1 60 python3 -m portaserve.bench.one_batch $M --tp 1 --batch-size 1 32 128 --input-len 128 --output-len 64
step one_batch_tp2 90 python3 -m portaserve.bench.one_batch $M --tp 2 --batch-size 1 32 128 --input-len 128 --output-len 64 --log-level info
