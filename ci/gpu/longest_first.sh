#!/usr/bin/env bash
# Session 18, calls 3-4: decode batches longest first with stage 1's grid (KV heads, batch,
# splits), against the tree before it (0af7f1e), alternating on one machine.  The base
# tree is made on the dev machine and carried (git-ignored):
#   rm -rf .ab-base && mkdir .ab-base && git archive 0af7f1e portaserve | tar -x -C .ab-base
# FlashInfer is left out in both arms (prompt passes: the Triton extend kernel).
export PORTASERVE_WITHOUT_FLASHINFER=1
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
B="env -C .ab-base PYTHONPATH=/tmp/site:$PWD/.ab-base"  # the base tree: python -m runs from its folder
step balance 100 python3 ci/gpu/decode_balance.py --batch 64 150 256
cat $OUT/balance.log
OB="--context-length 4096 --batch-size 1 32 128 --input-len 128 --output-len 64"
OL="--context-length 4096 --batch-size 128 --input-len 3072 --output-len 16"
step ob_new 100 python3 -m portaserve.bench.one_batch $M $OB
step ob_base 100 $B python3 -m portaserve.bench.one_batch $M $OB
step obl_base 100 $B python3 -m portaserve.bench.one_batch $M $OL
step obl_new 100 python3 -m portaserve.bench.one_batch $M $OL
grep -E "^bs=" $OUT/ob_new.log $OUT/ob_base.log $OUT/obl_base.log $OUT/obl_new.log | cut -c1-200
R="--dataset random --num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"
step off_base 200 $B python3 -m portaserve.bench.offline $M $R --output-file $OUT/off_base.json
grep -vE "^\[|^$|Warn|warn" $OUT/off_base.log | tail -6
step off_new 200 python3 -m portaserve.bench.offline $M $R --output-file $OUT/off_new.json
grep -vE "^\[|^$|Warn|warn" $OUT/off_new.log | tail -6
