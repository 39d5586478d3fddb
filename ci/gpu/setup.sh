# Sourced at the start of every GPU-host command: carried wheels, paths, the 8B config.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu-wheels/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# FlashInfer (carried wheel, the [cuda] extra) builds its kernels with the toolkit's nvcc
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} && export PATH=$CUDA_HOME/bin:$PATH MAX_JOBS=${MAX_JOBS:-16}
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/llama8b && cp ci/gpu/llama-3.1-8b.json /tmp/llama8b/config.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
