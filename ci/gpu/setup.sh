# Sourced at the start of every GPU-host command: carried wheels, paths, the 8B config, and
# `step NAME SECONDS CMD...` (CMD's output to $OUT/NAME.log under a time limit; with STEP_SHOW
# set, the log's lines matching it after, less those matching STEP_HIDE).
# PORTASERVE_WITHOUT_FLASHINFER=1 leaves FlashInfer out: with it importable, every engine
# start on a fresh machine builds its kernels (~2 min).  The status of sourcing this file is
# that of the FlashInfer pre-build (or of the wheel install).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu-wheels/*.whl || return 1
[ -z "${PORTASERVE_WITHOUT_FLASHINFER:-}" ] || rm -rf /tmp/site/flashinfer*
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# FlashInfer (carried wheel, the [cuda] extra) builds its kernels with the toolkit's nvcc
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} && export PATH=$CUDA_HOME/bin:$PATH MAX_JOBS=${MAX_JOBS:-16}
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/llama8b && cp ci/gpu/llama-3.1-8b.json /tmp/llama8b/config.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step() {
  local name=$1 secs=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc=$? ($(date +%T))"
  [ -z "${STEP_SHOW:-}" ] || grep -vE "${STEP_HIDE:-^$}" "$OUT/$name.log" | grep -E "$STEP_SHOW" | tail -"${STEP_SHOW_LINES:-12}"
}
# FlashInfer builds its kernels with nvcc at the first engine start on a fresh machine (~80 s,
# cached after): build them here for the 8B shape (bf16, head size 128, 32/8 heads), so no
# benchmark's timing or a step's time limit has to absorb it (session 7 lost a call to that)
if [ -z "${PORTASERVE_WITHOUT_FLASHINFER:-}" ]; then
  python3 -c "import time, torch; from portaserve.platforms.cuda import flashinfer_ops as f; t = time.time(); \
r = f.selftest(torch.bfloat16, 32, 8, 128) if torch.cuda.is_available() else 'no CUDA device'; print(f'flashinfer kernels: {r or \"built and checked\"} ({time.time() - t:.0f} s)')"
fi
