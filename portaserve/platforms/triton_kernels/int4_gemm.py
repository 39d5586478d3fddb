"""Weight-only INT4 GEMM for the AWQ and GPTQ layouts: one Triton kernel that unpacks
and dequantizes a [BLOCK_K, BLOCK_N] tile of W^T in registers and feeds tl.dot, so the
4-bit weights are read from memory once and never written back dequantized.

Same contract as ``portaserve.core.ops.native.int4_gemm`` (layouts documented in
``portaserve.core.ops.quant``).  Decode-sized batches (few rows) split the reduction
over several programs (split-K) so that a small grid still keeps the device's memory
system busy; the partial sums are added in float32 on the host side of the launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LAYOUT_ID = {"awq": 0, "gptq": 1, "gptq_v2": 2}


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, gidx_ptr, y_ptr, M, N, K, k_per_split,
                      stride_xm, stride_xk, stride_q0, stride_q1, stride_s0, stride_s1,
                      stride_z0, stride_z1, stride_ys, stride_ym, stride_yn, group_size,
                      LAYOUT: tl.constexpr, HAS_GIDX: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # packed words along N
    mmask = rm < M
    nmask = rn < N
    wnmask = rw < tl.cdiv(N, 8)
    # nibble shift of the j-th column of a word: AWQ interleaves [0,2,4,6,1,3,5,7]
    # (column j sits in nibble 4*(j%2) + j//2); GPTQ's zeros are sequential
    j = tl.arange(0, 8)
    if LAYOUT == 0:
        col_shift = ((j % 2) * 4 + j // 2) * 4
    else:
        col_shift = j * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < k_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        # each packed word is loaded once and its eight nibbles spread in registers
        if LAYOUT == 0:  # AWQ qweight [K, N/8]: words along N
            qw = tl.load(qw_ptr + rk[:, None] * stride_q0 + rw[None, :] * stride_q1,
                         mask=kmask[:, None] & wnmask[None, :], other=0)
            q = tl.reshape((qw[:, :, None] >> col_shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
        else:  # GPTQ qweight [K/8, N]: words along K
            rkw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            qw = tl.load(qw_ptr + rkw[:, None] * stride_q0 + rn[None, :] * stride_q1,
                         mask=(rkw * 8 < k_end)[:, None] & nmask[None, :], other=0)
            q = tl.reshape((qw[:, None, :] >> (j * 4)[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        if GROUP_ALIGNED:  # the whole K tile is in one group: one row of scales/zeros
            g = k0 // group_size
            qz = tl.load(qz_ptr + g * stride_z0 + rw * stride_z1, mask=wnmask, other=0)
            z = tl.reshape((qz[:, None] >> col_shift[None, :]) & 0xF, (BLOCK_N,))[None, :]
            s = tl.load(s_ptr + g * stride_s0 + rn * stride_s1, mask=nmask, other=0.0)[None, :]
        else:
            if HAS_GIDX:
                g = tl.load(gidx_ptr + rk, mask=kmask, other=0)
            else:
                g = rk // group_size
            qz = tl.load(qz_ptr + g[:, None] * stride_z0 + rw[None, :] * stride_z1,
                         mask=kmask[:, None] & wnmask[None, :], other=0)
            z = tl.reshape((qz[:, :, None] >> col_shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
            s = tl.load(s_ptr + g[:, None] * stride_s0 + rn[None, :] * stride_s1,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
        if LAYOUT == 1:
            z = z + 1  # GPTQ v1 checkpoints store zero - 1
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, w, input_precision="ieee")
    tl.store(y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc, mask=mmask[:, None] & nmask[None, :])


def _config(M: int, N: int, K: int, device_type: str, esize: int):
    if device_type == "cpu":  # the interpreter: small tiles keep the tests quick
        return 16, 32, 32, 1, 1
    if M <= 64:  # decode: memory bound, long K tiles, split-K fills the device
        return (16 if M <= 16 else 32 if M <= 32 else 64), 64, 128, 4, 3
    return 128, 128, 32, 8, 3


def int4_gemm(x, qweight, scales, qzeros, g_idx, layout, split_k=None):
    if layout not in _LAYOUT_ID:
        raise ValueError(f"unknown int4 layout {layout!r}")
    lead, K = x.shape[:-1], x.shape[-1]
    N = scales.shape[1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    group_size = K // scales.shape[0]
    bm, bn, bk, warps, stages = _config(M, N, K, x.device.type, x.element_size())
    if x.element_size() == 4 and x.device.type != "cpu":  # float32 tiles: stay within shared memory
        bm, bn, bk, stages = min(bm, 64), 64, 32, 2
    grid_m, grid_n = triton.cdiv(M, bm), triton.cdiv(N, bn)
    # split-K for small grids (decode): aim at ~2 programs per SM-sized unit of work
    split = 1
    if split_k is not None:
        split = split_k
    elif x.device.type != "cpu":
        split = max(1, min(256 // (grid_m * grid_n), K // (bk * 4)))
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per_split)
    y = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    has_gidx = g_idx is not None
    aligned = (not has_gidx) and group_size % bk == 0 and k_per_split % bk == 0
    gi = g_idx if has_gidx else qweight  # any pointer; unused
    _int4_gemm_kernel[(grid_m, grid_n, split)](
        x2, qweight, scales, qzeros, gi, y, M, N, K, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
        y.stride(0), y.stride(1), y.stride(2), group_size,
        LAYOUT=_LAYOUT_ID[layout], HAS_GIDX=has_gidx, GROUP_ALIGNED=aligned,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    out = y[0] if split == 1 else y.sum(0)
    return out.to(x.dtype).reshape(*lead, N)
