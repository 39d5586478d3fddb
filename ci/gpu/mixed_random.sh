#!/usr/bin/env bash
# --enable-mixed-chunk on the headline offline run (random, 500 prompts, in [1, 4096], out
# [1, 2048], seed 0), on and off in one call (~6 min on an H200 after setup.sh): the figure
# that decides whether mixing becomes the default (session 7: 1.12x on 64 x 4096-token
# prompts, median TTFT -12% online; session 5's -4% here was mid-run Triton compiles).
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
for mix in on off; do
  flag=""; [ $mix = on ] && flag=--enable-mixed-chunk
  echo "== mixed $mix ($(date +%T))"
  timeout 200 python3 -m portaserve.bench.offline $M --dataset random --num-prompts 500 --random-input-len 4096 \
    --random-output-len 2048 --random-range-ratio 0 $flag --output-file $OUT/offline_random_mixed_$mix.json \
    > $OUT/offline_random_mixed_$mix.log 2>&1
  echo "   rc=$?"; grep -E "^portaserve|Error" $OUT/offline_random_mixed_$mix.log | cut -c1-300
done
