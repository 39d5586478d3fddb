#!/usr/bin/env bash
# The whole GPU leg in one go: kernel/engine checks, then every benchmark of the CUDA issue
# (Llama-3.1-8B shape, random bf16 weights), the MoE and quantized-GEMM figures, TP=2 when
# two GPUs are visible, and one summary table (ci/gpu/summary.py) at the end.
# Took 22 min on one H200 (session 9: set-up 2.5, tests 10.5, benchmarks 9); session 23 added
# a ~2 min lof run.  Where one command may run 10 minutes at most (the device tool's calls),
# run it across calls on one warm machine with ci/gpu/bg.sh (`bg.sh start ci/gpu/all.sh`,
# then `bg.sh wait`, as often as needed), or run the parts (correctness.sh, throughput.sh,
# serving.sh, gsp_moe.sh, tp2.sh).
source ci/gpu/setup.sh || exit 1
M="--model-path /tmp/llama8b --load-format dummy --dtype bfloat16"
# ONLY="tests offline_random ..." runs just those parts (same commands; the rest show as 'not run')
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
run() { local name=$1; shift; want "$name" || return 0; echo "== $name ($(date +%T))"; "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$?"; }
# (the default-model tests are left out: that model is a 93 MB PyPI wheel the offline host cannot fetch)
run tests env PORTASERVE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider --durations=15 tests/triton tests/gpu \
  tests/test_quantization.py --deselect tests/test_quantization.py::test_fp8_against_the_float_model
run one_batch python3 -m portaserve.bench.one_batch $M --context-length 8192 --batch-size 1 32 128 \
  --input-len 128 --output-len 64 --compare-hf --output-file $OUT/one_batch.json
# and, in the same process, longest output first (session 23: the fcfs run's last ~2,000
# decode steps are the last-admitted long outputs finishing in small batches)
run offline_random python3 -m portaserve.bench.offline $M --dataset random --num-prompts 500 \
  --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 --compare-schedule-policy lof \
  --output-file $OUT/offline_random.json
# the same with an fp8 KV cache: twice the tokens in the pool (on an H100 the bf16 pool caps the batch)
run offline_random_fp8 python3 -m portaserve.bench.offline $M --dataset random --num-prompts 500 --kv-cache-dtype fp8_e4m3 \
  --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 --output-file $OUT/offline_random_fp8.json
run offline_gsp python3 -m portaserve.bench.offline $M --dataset generated-shared-prefix --gsp-num-groups 64 \
  --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048 --gsp-question-len 128 --gsp-output-len 256 \
  --schedule-policy lpm --compare-cascade-off --compare-no-cache --output-file $OUT/offline_gsp.json
run cascade python3 -m portaserve.bench.cascade --device cuda --groups 1 16 64 --members 16 --prefix-len 2048 \
  --own-len 384 --profile
if want serving; then
python3 -m portaserve.launch_server $M --skip-tokenizer-init --context-length 8192 --port 30000 \
  --log-level warning > $OUT/server.log 2>&1 &
SERVER=$!
for i in $(seq 1 180); do curl -sf http://127.0.0.1:30000/health >/dev/null && break; sleep 1; done
run serving python3 -m portaserve.cli bench serving --port 30000 --dataset-name random --num-prompts 100 \
  --random-input-len 1024 --random-output-len 256 --random-range-ratio 0.5 --request-rate 1 --seed 0 \
  --disable-tqdm --output-file $OUT/serving.jsonl
kill $SERVER; wait $SERVER 2>/dev/null
fi
mkdir -p /tmp/qwen3moe && cp ci/gpu/qwen3-30b-a3b.json /tmp/qwen3moe/config.json
run moe python3 -m portaserve.bench.one_batch --model-path /tmp/qwen3moe --load-format dummy --dtype bfloat16 \
  --context-length 4096 --batch-size 1 64 --input-len 128 --output-len 32 --cuda-graph-max-bs 64 \
  --max-running-requests 64 --mem-fraction-static 0.80 --output-file $OUT/moe.json
run gemm python3 -m portaserve.bench.gemm --json $OUT/gemm.json
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && want tp2; then
  run tp_check python3 ci/gpu/tp_check.py /tmp/llama8b float32
  run one_batch_tp2 python3 -m portaserve.bench.one_batch $M --context-length 8192 --tp 2 \
    --batch-size 1 32 128 --input-len 128 --output-len 64 --output-file $OUT/one_batch_tp2.json
fi
python3 ci/gpu/summary.py "$OUT" | tee $OUT/summary.md
