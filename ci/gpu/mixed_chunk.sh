#!/usr/bin/env bash
# --enable-mixed-chunk against off, on a FRESH machine (an empty Triton cache: mid-run
# compiles show up here and nowhere else), offline and then online at 1 request/s.
# ~8 min on one H200.  Reading: BENCHMARKS.md, session 6.
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
for v in on off; do
  flag=""; [ $v = on ] && flag=--enable-mixed-chunk
  python3 -m portaserve.bench.offline $M --dataset random --num-prompts 64 --random-input-len 4096 \
    --random-output-len 256 --random-range-ratio 0 --profile --profile-steps 30 --profile-dir $OUT/prof_$v \
    $flag > $OUT/offline_mixed_$v.log 2>&1
  grep -E "^portaserve  |steps:" $OUT/offline_mixed_$v.log; grep "^[a-z]*:" $OUT/prof_$v/*.summary.txt
  python3 -m portaserve.profiler $OUT/prof_$v/*.trace.json.gz --min-gap-ms 20 | grep -B1 "idle" | head -20
  rm -f $OUT/prof_$v/*.trace.json.gz
done
for v in on off; do
  flag=""; [ $v = on ] && flag=--enable-mixed-chunk
  python3 -m portaserve.launch_server $M --skip-tokenizer-init --context-length 8192 --port 30000 \
    --log-level warning $flag > $OUT/server_$v.log 2>&1 &
  SERVER=$!
  for i in $(seq 1 240); do curl -sf http://127.0.0.1:30000/health >/dev/null && break; sleep 1; done
  python3 -m portaserve.cli bench serving --port 30000 --dataset-name random --num-prompts 100 \
    --random-input-len 1024 --random-output-len 256 --random-range-ratio 0.5 --request-rate 1 --seed 0 \
    --disable-tqdm 2>&1 | grep -E "TTFT|ITL|throughput" | sed "s/^/mixed $v: /"
  kill $SERVER; wait $SERVER 2>/dev/null
done
