#!/usr/bin/env bash
# Overlapped prompt passes (session 8) on the headline offline run (random, 500 prompts,
# in [1, 4096], out [1, 2048], seed 0): the default, --disable-overlap-prefill (prompt
# passes as before: the previous step's tokens read first, and the pass's own before the
# next decode step), and --enable-mixed-chunk; one process each, in one call (~9 min on an
# H200 after setup.sh), so a run cut by the time limit loses only itself.
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
R="--dataset random --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"
for v in default overlap_prefill_off mixed_chunk; do
  flag=""; [ $v = overlap_prefill_off ] && flag=--disable-overlap-prefill; [ $v = mixed_chunk ] && flag=--enable-mixed-chunk
  echo "== $v ($(date +%T))"
  timeout ${RUN_SECS:-150} python3 -m portaserve.bench.offline $M $R $flag --output-file $OUT/offline_random_$v.json \
    > $OUT/offline_random_$v.log 2>&1
  echo "   rc=$? ($(date +%T))"; grep -E "^portaserve|Error" $OUT/offline_random_$v.log | cut -c1-300
done
