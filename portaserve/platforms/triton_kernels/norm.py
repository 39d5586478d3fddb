"""RMSNorm and fused residual-add + RMSNorm."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.platforms.triton_kernels import pdl


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr, n_cols, stride_x, stride_r, stride_y,
                    stride_ro, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: read before the wait
    pdl.wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = x + r  # in the activation dtype, like the native op
        tl.store(r_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(x.dtype), mask=mask)


def _launch(x, residual, weight, eps):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, d = x2.shape
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, d)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        r_out = torch.empty_like(y)
    else:
        r2 = r_out = y  # unused
    if n:
        _rmsnorm_kernel[(n,)](x2, r2, weight, y, r_out, d, x2.stride(0), r2.stride(0), y.stride(0),
                              r_out.stride(0), eps, HAS_RESIDUAL=residual is not None,
                              BLOCK=triton.next_power_of_2(d), **pdl.launch(x.device))
    return y.reshape(shape), (r_out.reshape(shape) if residual is not None else None)


def rmsnorm(x, weight, eps):
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(x, residual, weight, eps):
    return _launch(x, residual, weight, eps)
