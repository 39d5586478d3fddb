"""Quantized GEMMs through torch's own CUDA kernels (cuBLASLt): FP8 W8A8 via
``torch._scaled_mm`` (Ada / Hopper and newer) and INT8 W8A8 via ``torch._int_mm``.
Same contracts as the native ops in ``portaserve.core.ops.native`` (which quantize the
activations the same way, in ``portaserve.core.ops.quant``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from portaserve.core.ops import native
from portaserve.core.ops.quant import quantize_fp8, quantize_int8, weight_scale_vector


def fp8_supported() -> str | None:
    """Requirement of the _scaled_mm provider: a CUDA device of compute capability 8.9+."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return f"FP8 GEMMs need compute capability 8.9+ (Ada/Hopper); this device is sm_{cap[0]}{cap[1]}"
    return None


def int_mm_supported() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        return f"INT8 tensor-core GEMMs need compute capability 8.0+; this device is sm_{cap[0]}{cap[1]}"
    return None


def fp8_scaled_mm(x, w, w_scale, input_scale, out_dtype):
    N, K = w.shape
    if K % 16 or N % 16:  # cuBLASLt's FP8 alignment; rare shapes take the oracle
        return native.fp8_scaled_mm(x, w, w_scale, input_scale, out_dtype)
    lead = x.shape[:-1]
    xq, xs = quantize_fp8(x.reshape(-1, K), input_scale)
    if input_scale is not None and w_scale.numel() == 1:  # per-tensor x per-tensor
        y = torch._scaled_mm(xq, w.t(), scale_a=xs[:1, :1].reshape(()).contiguous(),
                             scale_b=w_scale.float().reshape(()), out_dtype=out_dtype)
    else:  # row-wise: per-token activation scales, per-channel weight scales (bf16 output)
        sb = weight_scale_vector(w_scale, N).reshape(1, N).contiguous()
        y = torch._scaled_mm(xq, w.t(), scale_a=xs.contiguous(), scale_b=sb,
                             out_dtype=torch.bfloat16).to(out_dtype)
    return y.reshape(*lead, N)


def int8_scaled_mm(x, w, w_scale, input_scale, out_dtype):
    N, K = w.shape
    if K % 8 or N % 8:
        return native.int8_scaled_mm(x, w, w_scale, input_scale, out_dtype)
    lead = x.shape[:-1]
    xq, xs = quantize_int8(x.reshape(-1, K), input_scale)
    M = xq.shape[0]
    if M <= 16:  # _int_mm wants more than 16 rows
        xq = F.pad(xq, (0, 0, 0, 17 - M))
    acc = torch._int_mm(xq, w.t())[:M]
    y = acc.float() * xs * weight_scale_vector(w_scale, N)[None, :]
    return y.to(out_dtype).reshape(*lead, N)
