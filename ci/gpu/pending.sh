#!/usr/bin/env bash
# What session 7 built and could not measure on the GPU (its device time ran out), for one
# fresh machine and one 10-minute call (~6 min on an H200 after setup.sh's FlashInfer build):
#  1. the engine against transformers on the GPU (tests/gpu/test_engine_gpu.py), now through
#     the fused rotary + KV-store kernel;
#  2. decode at batch 1 and 128 with the fused kernel and with the two ops it replaces
#     (--kernel rotary_kv_store=native), profiled at batch 1 (small-kernel share);
#  3. prompt passes with their metadata in one upload: wall against device time per 8K-token
#     pass (session 7 call 1, before: 200.1 wall / 184.2 device ms).
# Then ci/gpu/overlap_prefill.sh (the headline offline run; mixed chunk there too).
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
step engine_gpu 180 env PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py -rA
grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/engine_gpu.log | tail -8
for v in fused composed; do
  k=""; [ $v = composed ] && k="--kernel rotary_kv_store=native"
  step one_batch1_$v 90 python3 -m portaserve.bench.one_batch $M --context-length 4096 --batch-size 1 \
    --input-len 128 --output-len 64 --cuda-graph-max-bs 1 --profile $k --output-file $OUT/one_batch1_$v.json
  grep -E "^bs=|per decode step|rotary_kv_store|_rope|index_elementwise|direct_copy|Error" $OUT/one_batch1_$v.log | cut -c1-200
  step one_batch128_$v 90 python3 -m portaserve.bench.one_batch $M --context-length 4096 --batch-size 128 \
    --input-len 128 --output-len 64 --cuda-graph-max-bs 128 $k --output-file $OUT/one_batch128_$v.json
  grep -E "^bs=|Error" $OUT/one_batch128_$v.log | cut -c1-200
done
step prof_extend 120 python3 -m portaserve.bench.offline $M --dataset random --num-prompts 64 --random-input-len 4096 \
  --random-output-len 256 --random-range-ratio 0 --profile --profile-steps 30 --profile-dir $OUT/prof_extend
grep -E "^portaserve" $OUT/prof_extend.log; grep -A14 "^extend:" $OUT/prof_extend/*.summary.txt | cut -c1-150
python3 -m portaserve.profiler $OUT/prof_extend/*.trace.json.gz --min-gap-ms 1 | grep -E "^step|idle" | head -16
rm -f $OUT/prof_extend/*.trace.json.gz
