#!/usr/bin/env bash
# Where an offline run's decode step goes: the random dataset (500 prompts, in [1, 4096],
# out [1, 2048]) with a profile of 20 steps from 40 s into the run (a running batch of
# ~150 requests at ~2,500-token contexts), device time per kernel.  FlashInfer left out.
export PORTASERVE_WITHOUT_FLASHINFER=1
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
R="--dataset random --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"
STEP_SHOW="." STEP_SHOW_LINES=60 step offline_profile 300 python3 -m portaserve.bench.offline $M $R \
  --profile --profile-after 40 --profile-steps 20 --profile-dir $OUT/trace --output-file $OUT/offline_profile.json
