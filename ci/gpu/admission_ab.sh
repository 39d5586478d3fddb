#!/usr/bin/env bash
# Admission counting requests that finish at the step in flight as gone (session 9), on
# the headline offline run (random, 500 prompts, in [1, 4096], out [1, 2048], seed 0):
# the default against the same build with that counting patched out (admission waits for
# the previous step's tokens to be read, as in session 8); one process each (~5 min).
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
R="--dataset random --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"
for v in default no_leaving; do
  echo "== $v ($(date +%T))"
  timeout ${RUN_SECS:-170} python3 - $M $R --output-file $OUT/offline_random_$v.json > $OUT/offline_random_$v.log 2>&1 <<PY
import sys
from portaserve.core.scheduler import Scheduler as S
if "$v" == "no_leaving":
    f1, f2 = S._schedule_prefill, S._prefill_possible
    S._schedule_prefill = lambda self, leaving=0: f1(self, 0)
    S._prefill_possible = lambda self, leaving=0: f2(self, 0)
from portaserve.bench.offline import main
sys.exit(main(sys.argv[1:]))
PY
  echo "   rc=$? ($(date +%T))"; grep -E "^portaserve|Error" $OUT/offline_random_$v.log | cut -c1-300
  python3 -c "import json; c = json.load(open('$OUT/offline_random_$v.json'))['portaserve']['counters']; print('   passes', c['forward_extend'], 'decode steps', c['forward_decode'])"
done
