"""Provider registrations of every platform package, gathered in one place.

Registration is metadata only (op, provider, platforms, lazy target, requirement);
importing this module imports no vendor library.  The platform's provider_priority()
decides which registered provider wins on that platform; native is always the fallback.
"""
from __future__ import annotations

from portaserve.core.ops.registry import needs_module, register_provider

# ---- Triton: one kernel each for CUDA, ROCm and XPU -----------------------------------
_TRITON_PLATFORMS = ("cuda", "rocm", "xpu")
_TK = "portaserve.platforms.triton_kernels"
for _op, _target in [
    ("rmsnorm", f"{_TK}.norm:rmsnorm"),
    ("fused_add_rmsnorm", f"{_TK}.norm:fused_add_rmsnorm"),
    ("silu_and_mul", f"{_TK}.activation:silu_and_mul"),
    ("rotary_embedding", f"{_TK}.rotary:rotary_embedding"),
    ("attention_decode", f"{_TK}.attention:attention_decode"),
    ("attention_extend", f"{_TK}.attention:attention_extend"),
    ("fused_moe", f"{_TK}.moe:fused_moe"),
]:
    register_provider(_op, "triton", _TRITON_PLATFORMS, _target, requires=needs_module("triton"))
