#!/usr/bin/env bash
# Overlapped prompt passes (session 8), the figures the offline run does not show, in one
# call (~9 min on an H200 after setup.sh):
#  1. prompt-heavy offline (64 prompts x 4,096 tokens, 256 out): default vs
#     --disable-overlap-prefill;
#  2. online, 100 prompts at 1 req/s (`portaserve serve` + `bench serving`): TTFT and ITL,
#     default vs --disable-overlap-prefill;
#  3. last (a cut loses only it): FlashInfer at head size 256 against native (its own
#     nvcc build, ~1.5 min).
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
for v in on off; do
  flag=""; [ $v = off ] && flag=--disable-overlap-prefill
  echo "== prompt-heavy overlap prefill $v ($(date +%T))"
  timeout 90 python3 -m portaserve.bench.offline $M --dataset random --num-prompts 64 --random-input-len 4096 \
    --random-output-len 256 --random-range-ratio 0 $flag > $OUT/prompt_heavy_$v.log 2>&1
  echo "   rc=$?"; grep -E "^portaserve|Error" $OUT/prompt_heavy_$v.log | cut -c1-300
done
for v in on off; do
  flag=""; [ $v = off ] && flag=--disable-overlap-prefill
  echo "== online overlap prefill $v ($(date +%T))"
  python3 -m portaserve.launch_server $M --skip-tokenizer-init --context-length 8192 --port 30000 \
    --log-level warning $flag > $OUT/server_$v.log 2>&1 &
  SERVER=$!
  for i in $(seq 1 240); do curl -sf http://127.0.0.1:30000/health >/dev/null && break; sleep 1; done
  timeout 150 python3 -m portaserve.cli bench serving --port 30000 --dataset-name random --num-prompts 100 \
    --random-input-len 1024 --random-output-len 256 --random-range-ratio 0.5 --request-rate 1 --seed 0 \
    --disable-tqdm 2>&1 | grep -E "TTFT|ITL|TPOT|throughput" | sed "s/^/overlap prefill $v: /"
  kill $SERVER; wait $SERVER 2>/dev/null
done
echo "== flashinfer head 256 ($(date +%T))"
PORTASERVE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_flashinfer.py \
  -k "test_decode_and_extend_match_native and 256" -rA 2>&1 | tail -4
