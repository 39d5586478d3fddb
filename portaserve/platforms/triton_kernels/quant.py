"""Activation quantization for the W8A8 GEMMs, and the INT8 GEMM's scale epilogue, as
single Triton launches.

``per_token_quant(x, "fp8" | "int8", static_scale=None, pad_rows=0)`` does what
``portaserve.core.ops.quant.quantize_fp8`` / ``quantize_int8`` do (row absmax -> scale ->
quantized row, float32 scale [M, 1]) in ONE kernel: one program per row, the row read
once when it fits in registers (K <= 16384, every Llama/Qwen hidden size), twice (the
second time from L2) otherwise.  The arithmetic is the torch reference's, step for step
(amax / qmax clamped at 1e-12, x / s rounded to nearest, round-half-even for int8), so
the quantized activations match bit for bit.  (Under the CPU interpreter the last cast to
float8 is left to torch: Triton 3.x's interpreter rounds float32 -> e4m3 wrongly, e.g.
124.3 -> 64; the device kernel uses the hardware's round-to-nearest-even cast.)  ``pad_rows`` appends zero rows (scale 1e-12)
for GEMMs that want a minimum M (torch._int_mm wants M > 16), so no separate pad kernel.

``int8_dequant_epilogue(acc, x_scale, w_scale, out_dtype)`` is y = acc * xs[m] * ws[n]
cast to out_dtype, one launch instead of four torch kernels (the same float32 products in
the same order as the native oracle).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_EPS = 1e-12
_QMAX = {"fp8": 448.0, "int8": 127.0}
_OUT_DTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
MAX_ONE_PASS = 16384  # row length held in registers (16 warps x 32 lanes x 32 values)


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, sin_ptr, M, K, stride_xm, stride_qm, qmax, eps,
                            STATIC: tl.constexpr, IS_INT8: tl.constexpr, ONE_PASS: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    kl = tl.where(row < M, K, 0)  # rows >= M are padding: read nothing, zeros, scale eps
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        xr = tl.load(x_row + offs, mask=offs < kl, other=0.0).to(tl.float32)
    if STATIC:
        s = tl.load(sin_ptr).to(tl.float32)
    else:
        if ONE_PASS:
            amax = tl.max(tl.abs(xr), axis=0)
        else:
            vmax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_row + k0 + offs, mask=k0 + offs < kl, other=0.0)
                vmax = tl.maximum(vmax, tl.abs(xk.to(tl.float32)))
            amax = tl.max(vmax, axis=0)
        s = tl.maximum(tl.div_rn(amax, qmax), eps)
    tl.store(s_ptr + row, s)
    if ONE_PASS:
        v = tl.div_rn(xr, s)
        if IS_INT8:
            # round half to even as torch.round: adding and subtracting 1.5 * 2^23 rounds a
            # float32 of magnitude < 2^22 to an integer under the default rounding mode
            v = (v + 12582912.0) - 12582912.0
            v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        else:
            v = tl.minimum(tl.maximum(v, -qmax), qmax)
        tl.store(q_row + offs, v.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_row + k0 + offs, mask=k0 + offs < kl, other=0.0)
            v = tl.div_rn(xk.to(tl.float32), s)
            if IS_INT8:
                v = (v + 12582912.0) - 12582912.0
                v = tl.minimum(tl.maximum(v, -128.0), 127.0)
            else:
                v = tl.minimum(tl.maximum(v, -qmax), qmax)
            tl.store(q_row + k0 + offs, v.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


def _block(K: int, device_type: str):
    if device_type == "cpu":  # the interpreter: keep the tile small, exercise both paths
        bk = min(triton.next_power_of_2(K), 128)
        return bk, bk >= K, 1
    bk = triton.next_power_of_2(K)
    if bk > MAX_ONE_PASS:
        return 4096, False, 16
    return bk, True, (4 if bk <= 2048 else 8 if bk <= 8192 else 16)


def per_token_quant(x: torch.Tensor, kind: str, static_scale=None, pad_rows: int = 0,
                    block_k: int | None = None):
    """x [M, K] (any float dtype, last dim contiguous) -> (xq [M + pad_rows, K] float8_e4m3fn
    or int8, scale [M + pad_rows, 1] float32).  static_scale: None for dynamic per-token
    scales, else a one-element tensor (per-tensor static scale, broadcast to every row)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("per_token_quant wants a 2-D tensor with a contiguous last dim")
    M, K = x.shape
    rows = M + pad_rows
    # the interpreter's float32 -> e4m3 cast is wrong: it writes clamped float32, torch casts
    emulate = kind == "fp8" and x.device.type == "cpu"
    q = torch.empty(rows, K, dtype=torch.float32 if emulate else _OUT_DTYPE[kind], device=x.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, s
    bk, one_pass, warps = _block(K, x.device.type)
    if block_k is not None:  # tests: force the two-pass path
        bk, one_pass = block_k, block_k >= K
    static = static_scale is not None
    sin = static_scale.reshape(1) if static else s
    _per_token_quant_kernel[(rows,)](x, q, s, sin, M, K, x.stride(0), q.stride(0),
                                     _QMAX[kind], _EPS, STATIC=static, IS_INT8=kind == "int8",
                                     ONE_PASS=one_pass, BLOCK_K=bk, num_warps=warps)
    return (q.to(_OUT_DTYPE[kind]) if emulate else q), s


@triton.jit
def _int8_epilogue_kernel(acc_ptr, xs_ptr, ws_ptr, y_ptr, N, stride_am, stride_xs, stride_ws,
                          stride_ym, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    a = tl.load(acc_ptr + row.to(tl.int64) * stride_am + rn, mask=nmask, other=0).to(tl.float32)
    xs = tl.load(xs_ptr + row * stride_xs)
    ws = tl.load(ws_ptr + rn * stride_ws, mask=nmask, other=0.0)
    y = a * xs * ws
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


def int8_dequant_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                          M: int, out_dtype: torch.dtype) -> torch.Tensor:
    """acc [>= M, N] int32, x_scale [>= M, 1] float32, w_scale [N] float32 (a per-tensor
    scale may be expanded, stride 0) -> [M, N]."""
    N = acc.shape[1]
    y = torch.empty(M, N, dtype=out_dtype, device=acc.device)
    if M == 0:
        return y
    bn = 128 if acc.device.type == "cpu" else 1024
    _int8_epilogue_kernel[(M, triton.cdiv(N, bn))](acc, x_scale, w_scale, y, N, acc.stride(0),
                                                   x_scale.stride(0), w_scale.stride(0),
                                                   y.stride(0), BLOCK_N=bn, num_warps=4)
    return y
