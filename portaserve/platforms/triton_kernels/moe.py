"""Fused mixture-of-experts: (token, expert) pairs sorted by expert into blocks of BLOCK_M
rows, so each program multiplies one block of gathered rows by one expert's weight tile.
Two grouped GEMMs (w13, then w2 with the routing weight applied) around silu_and_mul."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.platforms.triton_kernels.activation import silu_and_mul


@triton.jit
def _grouped_gemm(a_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, total_ptr, weight_ptr,
                  n_pairs, N, Kd, stride_a, stride_we, stride_wn, stride_o,
                  TOPK: tl.constexpr, A_BY_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    total = tl.load(total_ptr)
    if b * BLOCK_M >= total:
        return
    e = tl.load(block_expert_ptr + b).to(tl.int64)
    rows = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < n_pairs
    a_rows = rows // TOPK if A_BY_TOKEN else rows
    a_rows = tl.where(valid, a_rows, 0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < Kd
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + k[None, :], mask=valid[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + e * stride_we + n[None, :] * stride_wn + k[:, None],
                    mask=nmask[None, :] & kmask[:, None], other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
    if MUL_WEIGHT:
        rw = tl.load(weight_ptr + tl.where(valid, rows, 0), mask=valid, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
    tl.store(out_ptr + tl.where(valid, rows, 0).to(tl.int64)[:, None] * stride_o + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


def _align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Pair ids sorted by expert, each expert's run padded to block_m with the sentinel
    n_pairs; the expert of each block; and the padded total (on the device)."""
    flat = topk_ids.flatten()
    n_pairs = flat.numel()
    # scatter_add rather than bincount: bincount syncs with the host (no CUDA graphs)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first = torch.cumsum(counts, 0) - counts
    dest = starts[sorted_e] + (torch.arange(n_pairs, device=flat.device) - first[sorted_e])
    max_total = n_pairs + num_experts * (block_m - 1)
    max_blocks = triton.cdiv(max_total, block_m)
    sorted_ids = torch.full((max_blocks * block_m,), n_pairs, dtype=torch.int64, device=flat.device)
    sorted_ids[dest] = order
    block_start = torch.arange(max_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert, ends[-1:].contiguous(), max_blocks


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    T, H = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    K = topk_ids.shape[1]
    n_pairs = T * K
    if T == 0:
        return torch.zeros_like(x)
    BM = 16
    sorted_ids, block_expert, total, max_blocks = _align(topk_ids, E, BM)
    weights = topk_weights.flatten().contiguous()
    inter = torch.empty(n_pairs, I2, dtype=x.dtype, device=x.device)

    def gemm(a, w, out, N, Kd, by_token, mul):
        BN = min(64, max(16, triton.next_power_of_2(N)))
        BK = min(64, max(16, triton.next_power_of_2(Kd)))
        _grouped_gemm[(max_blocks, triton.cdiv(N, BN))](
            a, w, out, sorted_ids, block_expert, total, weights, n_pairs, N, Kd, a.stride(0),
            w.stride(0), w.stride(1), out.stride(0), TOPK=K, A_BY_TOKEN=by_token, MUL_WEIGHT=mul,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)

    gemm(x.contiguous(), w13.contiguous(), inter, I2, H, True, False)
    act = silu_and_mul(inter)
    out = torch.empty(n_pairs, H, dtype=x.dtype, device=x.device)
    gemm(act, w2.contiguous(), out, H, I, False, True)
    return out.view(T, K, H).sum(dim=1)
