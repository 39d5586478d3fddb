"""Rotary position embedding for q [T, H, D] and k [T, Hk, D] (neox or interleaved)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cs_ptr, n_heads, stride_t, stride_h, stride_cs,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                 IS_NEOX: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rmask = r < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + r, mask=rmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + r, mask=rmask, other=0.0).to(tl.float32)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < n_heads
    m = hmask[:, None] & rmask[None, :]
    base = x_ptr + t * stride_t + h[:, None] * stride_h
    if IS_NEOX:
        o1 = r[None, :]
        o2 = r[None, :] + HALF
    else:
        o1 = 2 * r[None, :]
        o2 = 2 * r[None, :] + 1
    x1 = tl.load(base + o1, mask=m, other=0.0)
    x2 = tl.load(base + o2, mask=m, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    y1 = x1f * cos[None, :] - x2f * sin[None, :]
    y2 = x2f * cos[None, :] + x1f * sin[None, :]
    tl.store(base + o1, y1.to(x1.dtype), mask=m)
    tl.store(base + o2, y2.to(x1.dtype), mask=m)


def _apply(x, positions, cos_sin_cache, is_neox):
    out = x.clone(memory_format=torch.contiguous_format)  # the op returns new tensors
    T, H, D = out.shape
    if T == 0:
        return out
    half = cos_sin_cache.shape[-1] // 2
    BLOCK_H = min(16, triton.next_power_of_2(H))
    _rope_kernel[(T, triton.cdiv(H, BLOCK_H))](
        out, positions, cos_sin_cache, H, out.stride(0), out.stride(1), cos_sin_cache.stride(0),
        HALF=half, BLOCK_H=BLOCK_H, BLOCK_R=triton.next_power_of_2(half), IS_NEOX=is_neox)
    return out


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True):
    return _apply(q, positions, cos_sin_cache, is_neox), _apply(k, positions, cos_sin_cache, is_neox)
