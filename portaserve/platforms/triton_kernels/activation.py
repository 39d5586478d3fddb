"""silu(gate) * up over a [.., 2*I] input."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.platforms.triton_kernels import pdl


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, d, stride_x, stride_y, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    tl.store(y_ptr + row * stride_y + cols, s * u, mask=mask)


def silu_and_mul(x):
    shape = x.shape
    d = shape[-1] // 2
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n:
        BLOCK = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(n, triton.cdiv(d, BLOCK))](x2, y, d, x2.stride(0), y.stride(0), BLOCK=BLOCK,
                                                               **pdl.launch(x.device))
    return y.reshape(*shape[:-1], d)
