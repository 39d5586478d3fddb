#!/usr/bin/env bash
# Session 18, call 2: the GPU tests on this tree (kernels, sampling, engine, the PDL chain
# captured against eager and the one-split decode in 16-bit), then decode attention with a
# running offline batch's lengths (ci/gpu/decode_balance.py), then one-batch at 1 and 128.
export PORTASERVE_WITHOUT_FLASHINFER=1
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16 --context-length 4096"
step balance 150 python3 ci/gpu/decode_balance.py
cat $OUT/balance.log
step tests 400 env PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -rA \
  tests/gpu/test_pdl_graph.py tests/triton/test_kernels.py tests/triton/test_sampling_kernel.py \
  tests/gpu/test_engine_gpu.py
grep -E "PASSED|FAILED|ERROR|passed|failed|bf16:|Error|assert" $OUT/tests.log | tail -70
step one_batch 150 python3 -m portaserve.bench.one_batch $M --batch-size 1 128 --input-len 128 --output-len 64 \
  --output-file $OUT/one_batch.json
grep -E "^bs=|Error|PDL|programmatic" $OUT/one_batch.log | cut -c1-200
