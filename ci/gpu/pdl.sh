#!/usr/bin/env bash
# Programmatic dependent launch (platforms/triton_kernels/pdl.py), the split-row argmax and
# the single-launch decode attention at full batches, on one GPU: the kernel and engine
# tests (the kernel tests launch eagerly, so without PDL; the engine tests capture decode
# graphs with it), then decode steps with PORTASERVE_PDL=1 and =0 alternating,
# the argmax against torch's (--kernel argmax=native), and a profile of batch 1.
# FlashInfer is left out (its nvcc build takes ~2 min; decode is Triton either way).
export PORTASERVE_WITHOUT_FLASHINFER=1
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16 --context-length 4096"
step tests 420 env PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -rA \
  tests/triton/test_kernels.py tests/triton/test_sampling_kernel.py tests/gpu/test_engine_gpu.py
grep -E "PASSED|FAILED|ERROR|passed|failed|bf16:" $OUT/tests.log | tail -60
i=0
for v in 1 0 1 0; do
  i=$((i + 1))
  step decode_${i}_pdl$v 150 env PORTASERVE_PDL=$v python3 -m portaserve.bench.one_batch $M \
    --batch-size 1 8 32 128 --input-len 128 --output-len 64 --output-file $OUT/decode_${i}_pdl$v.json
  grep -E "^bs=|Error" $OUT/decode_${i}_pdl$v.log | cut -c1-200
done
step argmax_native 120 python3 -m portaserve.bench.one_batch $M --batch-size 1 --input-len 128 \
  --output-len 64 --kernel argmax=native --output-file $OUT/argmax_native.json
grep -E "^bs=|Error" $OUT/argmax_native.log | cut -c1-200
for v in 1 0; do
  step prof1_pdl$v 120 env PORTASERVE_PDL=$v python3 -m portaserve.bench.one_batch $M --batch-size 1 \
    --input-len 128 --output-len 64 --cuda-graph-max-bs 1 --profile
  grep -E "^bs=|per decode step|_kernel|_decode|argmax|reduce" $OUT/prof1_pdl$v.log | cut -c1-200 | head -20
done
