#!/usr/bin/env bash
# The batch-1 GEMV (op "linear", Triton provider) on one GPU: its tests, the kernel against
# cuBLAS per shape with a configuration sweep, and batch-1 decode with it and with
# --kernel linear=native, alternating, in one call.  FlashInfer is left out (its nvcc build
# takes ~2 min; prompt passes then run the Triton extend kernel, decode is Triton either way).
export PORTASERVE_WITHOUT_FLASHINFER=1
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
step tests 300 env PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -rA \
  tests/triton/test_kernels.py -k "gemv or linear" tests/gpu/test_engine_gpu.py::test_bf16_runs_and_mostly_agrees
grep -E "PASSED|FAILED|ERROR|passed|failed|bf16:" $OUT/tests.log | tail -24
step gemv 300 python3 -m portaserve.bench.gemv --sweep --models ${MODELS:-llama8b llama8b_tp2 qwen7b qwen0.5b} \
  --output-file $OUT/gemv.json
grep -v Warn $OUT/gemv.log
i=0
for v in triton native triton native; do
  i=$((i + 1)); k=""; [ $v = native ] && k="--kernel linear=native"
  step one_batch1_${i}_$v 120 python3 -m portaserve.bench.one_batch $M --context-length 4096 --batch-size 1 \
    --input-len 128 --output-len 64 --cuda-graph-max-bs 1 $k --output-file $OUT/one_batch1_${i}_$v.json
  grep -E "^bs=|  linear|Error" $OUT/one_batch1_${i}_$v.log | cut -c1-200
done
for v in triton native; do
  k=""; [ $v = native ] && k="--kernel linear=native"
  step prof1_$v 120 python3 -m portaserve.bench.one_batch $M --context-length 4096 --batch-size 1 \
    --input-len 128 --output-len 64 --cuda-graph-max-bs 1 --profile $k
  grep -E "^bs=|per decode step|_gemv_kernel|nvjet" $OUT/prof1_$v.log | cut -c1-200
done
