"""Provider registrations of every platform package, gathered in one place.

Registration is metadata only (op, provider, platforms, lazy target, requirement);
importing this module imports no vendor library.  The platform's provider_priority()
decides which registered provider wins on that platform; native is always the fallback.
"""
from __future__ import annotations

from portaserve.core.ops.registry import all_of, needs_module, register_provider

# ---- Triton: one kernel each for CUDA, ROCm and XPU -----------------------------------
_TRITON_PLATFORMS = ("cuda", "rocm", "xpu")
_TK = "portaserve.platforms.triton_kernels"
for _op, _target in [
    ("rmsnorm", f"{_TK}.norm:rmsnorm"),
    ("fused_add_rmsnorm", f"{_TK}.norm:fused_add_rmsnorm"),
    ("silu_and_mul", f"{_TK}.activation:silu_and_mul"),
    ("rotary_embedding", f"{_TK}.rotary:rotary_embedding"),
    ("attention_decode", f"{_TK}.attention:attention_decode"),
    ("attention_decode_shared", f"{_TK}.attention:attention_decode_shared"),
    ("attention_extend", f"{_TK}.attention:attention_extend"),
    ("fused_moe", f"{_TK}.moe:fused_moe"),
]:
    register_provider(_op, "triton", _TRITON_PLATFORMS, _target, requires=needs_module("triton"))


def _rotary_kv_store_selftest(model):
    # compiled for the model's dtypes and head size, and checked against native, on the
    # device at an engine's start: a kernel that fails there leaves the two ops in charge
    from portaserve.platforms.triton_kernels import rotary

    return rotary.selftest(model)


register_provider("rotary_kv_store", "triton", _TRITON_PLATFORMS, f"{_TK}.rotary:rotary_kv_store",
                  requires=needs_module("triton"), supports=_rotary_kv_store_selftest)


# ---- CUDA: FlashInfer's attention (the [cuda] extra), ahead of Triton where it has kernels ------
def _flashinfer_supports(model):
    # the model's dtype and head size; at an engine's start also builds the kernels for its
    # attention shape (nvcc JIT, cached) and checks them against native on its device
    from portaserve.platforms.cuda import flashinfer_ops

    return flashinfer_ops.unsupported_reason(model)


_NEEDS_FLASHINFER = needs_module("flashinfer", "pip install portaserve[cuda]")
for _op in ("attention_prepare", "attention_decode", "attention_extend"):
    register_provider(_op, "flashinfer", ("cuda",), f"portaserve.platforms.cuda.flashinfer_ops:{_op}",
                      requires=_NEEDS_FLASHINFER, supports=_flashinfer_supports)

# ---- CPU: torch's fused SDPA kernel, one batched call per step --------------------------------
def _needs_sdpa_gqa():
    import inspect

    import torch.nn.functional as F

    try:
        ok = "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: ask the docstring
        ok = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
    return None if ok else "needs torch >= 2.5 (scaled_dot_product_attention(enable_gqa=...))"


for _op in ("attention_decode", "attention_extend"):
    register_provider(_op, "sdpa", ("cpu",), f"portaserve.platforms.cpu.attention:{_op}",
                      requires=_needs_sdpa_gqa)

# ---- ROCm: AMD's aiter (installed from AMD's release; never the unrelated PyPI `aiter`) -------
_NEEDS_AITER = needs_module("aiter", "install AMD's aiter from its release; the PyPI package named aiter is unrelated")
_AITER = "portaserve.platforms.rocm.aiter_ops"
for _op in ("rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "attention_decode", "attention_extend"):
    register_provider(_op, "aiter", ("rocm",), f"{_AITER}:{_op}", requires=_NEEDS_AITER)

# ---- XPU: intel_extension_for_pytorch (optional; archived upstream) ---------------------------
_NEEDS_IPEX = needs_module("intel_extension_for_pytorch",
                           "optional: pip install intel-extension-for-pytorch matching your torch")
_IPEX = "portaserve.platforms.xpu.ipex_ops"
for _op in ("rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "attention_decode", "attention_extend"):
    register_provider(_op, "ipex", ("xpu",), f"{_IPEX}:{_op}", requires=_NEEDS_IPEX)

# ---- TPU: torch_xla's ragged paged attention (Pallas on TPU) ----------------------------------
_NEEDS_XLA = needs_module("torch_xla", "pip install portaserve[tpu]")
for _op in ("attention_decode", "attention_extend"):
    register_provider(_op, "pallas", ("tpu",), f"portaserve.platforms.tpu.xla_ops:{_op}",
                      requires=_NEEDS_XLA)

# ---- quantized GEMM (family "gemm") ----------------------------------------------------------
# FP8 / INT8 W8A8 through torch's cuBLASLt kernels; weight-only INT4 (AWQ / GPTQ layouts)
# through one Triton dequant-GEMM kernel for CUDA, ROCm and XPU.
def _cuda_quant_requirement(name):
    def check():
        from portaserve.platforms.cuda import quant_ops

        return getattr(quant_ops, name)()

    return check


register_provider("fp8_scaled_mm", "scaled_mm", ("cuda",),
                  "portaserve.platforms.cuda.quant_ops:fp8_scaled_mm",
                  requires=_cuda_quant_requirement("fp8_supported"))
register_provider("int8_scaled_mm", "int_mm", ("cuda",),
                  "portaserve.platforms.cuda.quant_ops:int8_scaled_mm",
                  requires=_cuda_quant_requirement("int_mm_supported"))


def _gemv_selftest(model):
    # compiled for the model's dtype and checked against torch on the device at startup
    from portaserve.platforms.triton_kernels import gemv

    return gemv.selftest(model)


# One-row products (batch-1 decode) through the Triton GEMV, the rest through torch: on CUDA
# only, where it was measured faster than cuBLAS (python -m portaserve.bench.gemv)
register_provider("linear", "triton", ("cuda",), f"{_TK}.gemv:linear",
                  requires=needs_module("triton"), supports=_gemv_selftest)


def _int4_triton_selftest():
    # compiles the INT4 kernels on the device and checks them against the oracle at
    # startup, so a kernel that cannot compile here is rejected (with its reason) up front
    from portaserve.platforms.triton_kernels import int4_gemm

    return int4_gemm.selftest()


register_provider("int4_gemm", "triton", _TRITON_PLATFORMS, f"{_TK}.int4_gemm:int4_gemm",
                  requires=all_of(needs_module("triton"), _int4_triton_selftest))


def _sampling_triton_selftest():
    # compiled and checked against native on the device at startup (see int4 above)
    from portaserve.platforms.triton_kernels import sampling

    return sampling.selftest()


register_provider("top_k_top_p_min_p_sample", "triton", _TRITON_PLATFORMS,
                  f"{_TK}.sampling:top_k_top_p_min_p_sample",
                  requires=all_of(needs_module("triton"), _sampling_triton_selftest))


def _argmax_triton_selftest():
    from portaserve.platforms.triton_kernels import sampling

    return sampling.argmax_selftest()


# Greedy tokens: torch reduces a whole vocabulary row in one block (27 us per step at batch 1
# on an H200); the Triton kernel splits the row across programs
register_provider("argmax", "triton", _TRITON_PLATFORMS, f"{_TK}.sampling:argmax",
                  requires=all_of(needs_module("triton"), _argmax_triton_selftest))
