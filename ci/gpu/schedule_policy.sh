#!/usr/bin/env bash
# Session 23: --schedule-policy lof (longest output first) against fcfs on the headline
# offline run (random, 500 prompts, in [1, 4096], out [1, 2048], seed 0), side by side in
# one process each: on the H200's own pool, on an H100's (--max-total-tokens 430000, about
# an H100's pool at the default memory fraction), and with an fp8 cache on the same bytes
# as that H100 pool; then the MoE and GEMM parts of all.sh, which session 22 did not reach.
# The step counts each run takes are predicted on the CPU by `portaserve bench schedule`.
# ~17 min after setup: run it with bg.sh (start, then wait).  FlashInfer is left out.
export PORTASERVE_WITHOUT_FLASHINFER=1
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
R="--dataset random --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"
# first, the bf16 decode kernel's register cap by batch size (session 21 measured 0.148 ms
# capped against 0.176 ms uncapped at batch 64, 2 splits, and 1.5% slower capped at 256)
STEP_SHOW="^decode batch|  bfloat16|Error" STEP_SHOW_LINES=40 step sweep 240 python3 ci/gpu/attention_sweep.py --only decode \
  --batch 8 16 32 64 96 128 192 256 --match "^bfloat16 (default|maxnreg=128) f16"
STEP_SHOW="^portaserve|^#|Error|KV pool"
step lof_h200 330 python3 -m portaserve.bench.offline $M $R --compare-schedule-policy lof --output-file $OUT/lof_h200.json
step lof_h100_pool 360 python3 -m portaserve.bench.offline $M $R --max-total-tokens 430000 --compare-schedule-policy lof \
  --output-file $OUT/lof_h100_pool.json
step lof_fp8_h100_pool 360 python3 -m portaserve.bench.offline $M $R --kv-cache-dtype fp8_e4m3 --max-total-tokens 860000 \
  --schedule-policy lof --compare-schedule-policy fcfs --output-file $OUT/lof_fp8_h100_pool.json
unset STEP_SHOW
ONLY="moe gemm" OUT=$OUT/all bash ci/gpu/all.sh
