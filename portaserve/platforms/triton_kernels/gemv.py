"""y = x W^T for one row x: the linear layers of a batch-1 decode step.

At batch 1 a decode step reads every weight once and does little else, so its time is the
GEMMs' memory bandwidth.  cuBLAS runs one-row products as tiled GEMMs (128 x 8 tiles,
split-K for the long ones) and reads Llama-3.1-8B's five shapes at 2.55-4.20 TB/s on an
H200; this kernel, one program per BLOCK_N output rows over the whole K (no split-K: one
launch, no partial sums), reads them at 3.30-4.53 TB/s (python -m portaserve.bench.gemv).

``linear`` takes this path for one row in bf16/fp16 and hands every other case to torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from portaserve.platforms.triton_kernels import pdl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    pdl.start(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    kk = tl.arange(0, BLOCK_K)
    rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    # the weights are no earlier kernel's output: under PDL the first block is read while
    # that kernel still runs, and only x waits for it
    w = tl.load(rows + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0)
    pdl.wait(PDL)
    x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]  # reduced once, after the loop
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        w = tl.load(rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        x = tl.load(x_ptr + k, mask=kmask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=nmask)


def config(N: int, K: int) -> tuple:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): four rows by the largest of 2048/1024/512
    columns that divides K (no masked tail), else by 2048 columns, or for K <= 1024 by K's
    next power of two on two warps.  On an H200 the sweep timed this within 2.5% of the
    fastest of 84 configurations (geometric mean over 20 shapes of four models), and below
    cuBLAS's time on each shape (docs/BENCHMARKS.md, session 16)."""
    for bk in (2048, 1024, 512):
        if K % bk == 0:
            return 4, bk, 4, 3
    if K > 1024:
        return 4, 2048, 4, 3
    return 4, triton.next_power_of_2(K), 2, 3


def gemv(x: torch.Tensor, w: torch.Tensor, cfg=None) -> torch.Tensor:
    """x [1, K] (or [K]) times w [N, K]^T: [1, N] in x's dtype."""
    N, K = w.shape
    if x.numel() != K or w.stride(-1) != 1:
        raise ValueError(f"gemv takes one row of {K} and a row-major weight, got {tuple(x.shape)}")
    x = x.reshape(K).contiguous()
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    BLOCK_N, BLOCK_K, warps, stages = cfg or config(N, K)
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](x, w, y, N, K, w.stride(0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                             num_warps=warps, num_stages=stages, **pdl.launch(x.device))
    return y


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``linear`` runs x through the GEMV: one row, a 2-D row-major weight on the
    same accelerator, both bf16 or fp16 (float32 stays with cuBLAS, whose accumulation the
    fp32 tests match).  Two or more rows stay with cuBLAS too: a tensor-core kernel for
    2-8 rows was slower end to end on an H200 (docs/BENCHMARKS.md, session 16)."""
    return (w.dim() == 2 and x.numel() == x.shape[-1] == w.shape[1] > 0 and w.stride(-1) == 1
            and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and x.device.type != "cpu" and x.device == w.device)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The op "linear" (x W^T) on a GPU: one row through the GEMV, the rest through torch."""
    if takes(x, w):
        return gemv(x, w).reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


_SELFTEST: dict = {}


def selftest(model: dict) -> str | None:
    """The registry's model check: each configuration ``config`` can pick, compiled on the
    accelerator for the model's dtype and compared with torch; None when they agree (or
    there is nothing to test yet), else the reason."""
    from portaserve.platforms.triton_kernels import selftest as st

    dev, dt = st.accel_device(), model.get("dtype")
    if dt is not None and dt not in (torch.bfloat16, torch.float16):
        return f"the GEMV kernels run bfloat16/float16 only, the model is {str(dt).replace('torch.', '')}"
    if dev is None or dt is None:
        return None

    def check():
        g = torch.Generator().manual_seed(0)
        bad = []
        for K in (3 * 2048, 3 * 1024, 3 * 512, 2048 + 40, 896):  # one per branch of config()
            x = torch.randn(1, K, generator=g).to(dt)
            w = (torch.randn(131, K, generator=g) / K ** 0.5).to(dt)  # 131: a partial row block
            want = F.linear(x.float(), w.float())
            got = gemv(x.to(dev), w.to(dev)).cpu().float()
            if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                bad.append(K)
        return f"the GEMV disagrees with torch on {dev} at K = {bad}" if bad else None

    return st.once(_SELFTEST, (str(dev), dt), dev, "the GEMV", check)
