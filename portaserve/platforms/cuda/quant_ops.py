"""Quantized GEMMs through torch's own CUDA kernels (cuBLASLt): FP8 W8A8 via
``torch._scaled_mm`` (Ada / Hopper and newer) and INT8 W8A8 via ``torch._int_mm``.
Same contracts as the native ops in ``portaserve.core.ops.native`` (which quantize the
activations the same way, in ``portaserve.core.ops.quant``).

The dynamic per-token activation quantization runs as one Triton kernel
(``triton_kernels/quant.py``: absmax, scale, quantized row and float32 scale in a single
launch, instead of five to eight torch kernels, which made W8A8 slower than bf16 at
decode); the INT8 path also pads for ``_int_mm`` inside that kernel and applies its
scales in one Triton epilogue.  If Triton is missing or a kernel fails to compile, the
providers warn once and continue on torch's kernels."""
from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F

from portaserve.core.ops import native
from portaserve.core.ops.quant import FP8_DTYPE, quantize_fp8, quantize_int8, weight_scale_vector

_log = logging.getLogger(__name__)


def _needs(fn: str, cap_min: tuple, what: str) -> str | None:
    """Why torch.<fn> cannot run here (None when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not hasattr(torch, fn):
        return f"this torch has no torch.{fn}"
    cap = torch.cuda.get_device_capability()
    if cap < cap_min:
        return f"{what} need compute capability {cap_min[0]}.{cap_min[1]}+; this device is sm_{cap[0]}{cap[1]}"
    return None


def fp8_supported() -> str | None:
    """Requirement of the _scaled_mm provider: a CUDA device of compute capability 8.9+."""
    why = _needs("_scaled_mm", (8, 9), "FP8 GEMMs (Ada/Hopper)")
    if why:
        return why
    _check_triton_quant()
    return _check_scaled_mm()


def int_mm_supported() -> str | None:
    why = _needs("_int_mm", (8, 0), "INT8 tensor-core GEMMs")
    if why:
        return why
    _check_triton_quant()
    return None


# ---- activation quantization: one Triton launch, torch's kernels as the loud fallback ----------
_triton_quant_error: str | None = None


def _quantize(x2, kind: str, input_scale, pad_rows: int = 0):
    """(xq [M + pad_rows, K], scale [M + pad_rows, 1] float32) through the one-launch Triton
    kernel; if it cannot compile or run on this device, warn once and use the torch
    quantizer (five to eight small kernels) from then on."""
    global _triton_quant_error
    if _triton_quant_error is None:
        try:
            from portaserve.platforms.triton_kernels.quant import per_token_quant

            return per_token_quant(x2, kind, input_scale, pad_rows)
        except Exception as e:  # compile or launch failure: never crash the engine for it
            _triton_quant_error = f"{type(e).__name__}: {e}"
            msg = (f"portaserve: the Triton per-token activation quantizer failed ({_triton_quant_error}); "
                   "falling back to torch's quantization kernels (slower W8A8 decode)")
            _log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    xq, xs = (quantize_fp8 if kind == "fp8" else quantize_int8)(x2, input_scale)
    if pad_rows:
        xq = F.pad(xq.view(torch.int8), (0, 0, 0, pad_rows)).view(xq.dtype)
        xs = F.pad(xs, (0, 0, 0, pad_rows), value=1.0)
    return xq, xs


_checked = False


def _check_triton_quant() -> None:
    """At provider resolution (startup): compile the Triton quantizer and epilogue on the
    device and compare them with the torch reference, so a failure is reported (and the
    torch kernels chosen) before the first forward or CUDA-graph capture, not during it."""
    global _checked, _triton_quant_error
    if _checked or _triton_quant_error is not None:
        return
    _checked = True
    try:
        from portaserve.platforms.triton_kernels.quant import int8_dequant_epilogue, per_token_quant

        g = torch.Generator().manual_seed(0)
        x = (torch.randn(3, 320, generator=g) * 4).to(torch.bfloat16).cuda()
        kinds = [("int8", quantize_int8)]
        if torch.cuda.get_device_capability() >= (8, 9):  # FP8 is offered from sm_89 (fp8_supported);
            kinds.insert(0, ("fp8", quantize_fp8))  # before it Triton has no e4m3 type to compile
        for kind, ref in kinds:
            q, s = per_token_quant(x, kind, None, pad_rows=1)
            rq, rs = ref(x)
            # relative: the kernel may round amax / qmax one ulp apart from torch (seen on sm_90:
            # 3.7e-9 on scales of ~0.03 with every quantized value identical)
            scale_diff = ((s[:3] - rs).abs() / rs.abs().clamp_min(1e-30)).max().item()
            q_diff = (q[:3].float() - rq.float()).abs().max().item()
            pad = q[3].float().abs().max().item()
            if not (scale_diff <= 1e-6 and q_diff <= (32.0 if kind == "fp8" else 1.0) and pad == 0):
                # the figures name the failing part on a device (the CPU tests run emulated casts)
                raise RuntimeError(f"{kind} quantizer disagrees with the torch reference (max relative "
                                   f"scale diff {scale_diff:.3g}, max |q diff| {q_diff:.3g}, padding row max "
                                   f"{pad:.3g}, {int((q[:3].float() != rq.float()).sum())} of {rq.numel()} "
                                   "values differ)")
        acc = torch.randint(-999, 999, (4, 32), generator=g, dtype=torch.int32).cuda()
        xs, ws = torch.rand(4, 1).cuda(), torch.rand(32).cuda()
        y = int8_dequant_epilogue(acc, xs, ws, 3, torch.float32)
        if not torch.allclose(y, acc[:3].float() * xs[:3] * ws, rtol=1e-6, atol=0):
            raise RuntimeError("int8 epilogue disagrees with the torch reference")
    except Exception as e:
        _disable_triton(e)


def quantizer_status() -> str:
    """Which activation quantizer the W8A8 providers use (for benchmarks and logs)."""
    return "torch (triton failed: " + _triton_quant_error + ")" if _triton_quant_error else "triton"


# torch._scaled_mm with row-wise scales (per-token activation x per-channel weight) runs
# the CUTLASS f8f8bf16 row-wise kernel on sm_90: scale_a [M, 1] and scale_b [1, N] float32,
# contiguous; bf16 output (the only one every torch build accepts for row-wise scaling);
# use_fast_accum as vLLM's/SGLang's CUTLASS FP8 kernels do (FP8FastAccum: the tensor cores
# accumulate without the periodic promotion to float32, fine at these K; set
# PORTASERVE_FP8_FAST_ACCUM=0 to compare).
_FAST_ACCUM = os.environ.get("PORTASERVE_FP8_FAST_ACCUM", "1") != "0"


def _check_scaled_mm() -> str | None:
    """At startup: the exact row-wise and per-tensor _scaled_mm calls the provider makes,
    on a tiny problem (a torch build that rejects fast accumulation falls back to the
    default; one that cannot run them at all rejects the provider, with the reason)."""
    global _FAST_ACCUM
    xq = torch.ones(32, 32, device="cuda").to(FP8_DTYPE)
    w = torch.ones(32, 32, device="cuda").to(FP8_DTYPE)
    sa, sb = torch.ones(32, 1, device="cuda"), torch.ones(1, 32, device="cuda")
    one = torch.ones((), device="cuda")
    err = None
    for fast in ([True, False] if _FAST_ACCUM else [False]):
        try:
            y = torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                 use_fast_accum=fast)
            y2 = torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                  use_fast_accum=fast)
            y3 = torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)  # float32 models
            if not all(bool((t.float() == 32).all()) for t in (y, y2, y3)):
                raise RuntimeError("wrong result on a ones x ones product")
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            continue
        if fast != _FAST_ACCUM:
            _log.warning("portaserve: torch._scaled_mm rejected use_fast_accum=True (%s); using the default", err)
            _FAST_ACCUM = fast
        return None
    return f"torch._scaled_mm (row-wise scales) failed on this device: {err}"


def fp8_scaled_mm(x, w, w_scale, input_scale, out_dtype):
    N, K = w.shape
    if K % 16 or N % 16:  # cuBLASLt's FP8 alignment; rare shapes take the oracle
        return native.fp8_scaled_mm(x, w, w_scale, input_scale, out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xq, xs = _quantize(x2, "fp8", input_scale)
    if input_scale is not None and w_scale.numel() == 1:  # per-tensor x per-tensor
        y = torch._scaled_mm(xq, w.t(), scale_a=input_scale.float().reshape(()),
                             scale_b=w_scale.float().reshape(()), out_dtype=out_dtype,
                             use_fast_accum=_FAST_ACCUM)
    elif out_dtype == torch.float32:  # row-wise for a float32 model (the reference dtype of
        # the tests): the kernel's unscaled float32 product, scaled here in float32, as the
        # row-wise kernel's bf16-only output would round every product to 8 bits
        one = torch.ones((), device=x.device)
        y = torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        y = y * xs * weight_scale_vector(w_scale, N).reshape(1, N)
    else:  # row-wise: per-token activation scales, per-channel weight scales (bf16 output)
        sb = weight_scale_vector(w_scale, N).reshape(1, N)
        if not sb.is_contiguous():  # a per-tensor scale expanded to N
            sb = sb.contiguous()
        y = torch._scaled_mm(xq, w.t(), scale_a=xs.contiguous(), scale_b=sb, out_dtype=torch.bfloat16,
                             use_fast_accum=_FAST_ACCUM)
        if out_dtype != torch.bfloat16:
            y = y.to(out_dtype)
    return y.reshape(*lead, N)


def int8_scaled_mm(x, w, w_scale, input_scale, out_dtype):
    N, K = w.shape
    if K % 8 or N % 8:
        return native.int8_scaled_mm(x, w, w_scale, input_scale, out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    # _int_mm wants more than 16 rows: the quantizer writes the zero rows itself
    xq, xs = _quantize(x2, "int8", input_scale, pad_rows=max(0, 17 - M))
    acc = torch._int_mm(xq, w.t())
    ws = weight_scale_vector(w_scale, N)
    y = None
    if _triton_quant_error is None:
        try:
            from portaserve.platforms.triton_kernels.quant import int8_dequant_epilogue

            y = int8_dequant_epilogue(acc, xs, ws, M, out_dtype)
        except Exception as e:
            _disable_triton(e)
    if y is None:
        y = (acc[:M].float() * xs[:M] * ws[None, :]).to(out_dtype)
    return y.reshape(*lead, N)


def _disable_triton(e: Exception) -> None:
    global _triton_quant_error
    _triton_quant_error = f"{type(e).__name__}: {e}"
    msg = f"portaserve: a Triton W8A8 helper kernel failed ({_triton_quant_error}); using torch's kernels"
    _log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
