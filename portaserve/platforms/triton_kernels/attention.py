"""Paged attention over the KV pool: split-KV decode and causal extend (prefill over a
cached prefix), GQA, variable lengths in one launch.

Both read K/V through req_to_token (the slot of each position of each request), so a
prefix shared through the radix cache is read in place.  The new tokens' K/V are already
in the pool when these run (the model stores them first).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed so that a decode launch does not depend on host-side values (CUDA-graph safe).
NUM_KV_SPLITS = 16


@triton.jit
def _decode_stage1(q_ptr, k_ptr, v_ptr, r2t_ptr, rpi_ptr, seq_ptr, mid_o, mid_lse,
                   stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
                   stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   scale, n_heads, GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    heads = kvh * GROUP + tl.arange(0, BLOCK_H)
    hmask = (tl.arange(0, BLOCK_H) < GROUP) & (heads < n_heads)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dvmask = dv < DV
    seq_len = tl.load(seq_ptr + b).to(tl.int32)
    row = tl.load(rpi_ptr + b).to(tl.int64)
    # whole blocks per split: short sequences use few splits, the rest exit at once
    per = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, seq_len)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        slots = tl.load(r2t_ptr + row * stride_r2t + n, mask=nmask, other=0).to(tl.int64)
        k = tl.load(k_ptr + slots[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee").to(tl.float32) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_ptr + slots[:, None] * stride_vt + kvh * stride_vh + dv[None, :],
                    mask=nmask[:, None] & dvmask[None, :], other=0.0).to(q.dtype)  # fp8 caches upcast
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    has = end > start
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(mid_o + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + dv[None, :], out,
             mask=hmask[:, None] & dvmask[None, :])
    tl.store(mid_lse + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _decode_stage2(mid_o, mid_lse, o_ptr, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   stride_ob, stride_oh, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                   NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    dvmask = dv < DV
    s = tl.arange(0, NUM_SPLITS)
    lse = tl.load(mid_lse + b * stride_lb + h * stride_lh + s)
    m = tl.max(lse, axis=0)
    w = tl.exp(lse - m)
    w = tl.where(lse == float("-inf"), 0.0, w)
    parts = tl.load(mid_o + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + dv[None, :],
                    mask=dvmask[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + dv, out.to(o_ptr.dtype.element_ty), mask=dvmask)


def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    B, H, D = q.shape
    Hk = k_cache.shape[1]
    DV = v_cache.shape[-1]
    group = H // Hk
    o = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    mid_o = torch.empty(B, H, NUM_KV_SPLITS, DV, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, H, NUM_KV_SPLITS, dtype=torch.float32, device=q.device)
    BLOCK_H = max(16, triton.next_power_of_2(group))
    _decode_stage1[(B, Hk, NUM_KV_SPLITS)](
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        req_to_token.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), scale, H, GROUP=group, D=D, DV=DV,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV), BLOCK_H=BLOCK_H,
        BLOCK_N=32 if q.device.type == "cpu" else 64, NUM_SPLITS=NUM_KV_SPLITS)
    _decode_stage2[(B, H)](
        mid_o, mid_lse, o, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), o.stride(0), o.stride(1), DV=DV, BLOCK_DV=triton.next_power_of_2(DV),
        NUM_SPLITS=NUM_KV_SPLITS)
    return o


@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, r2t_ptr, rpi_ptr, prefix_ptr, ext_ptr, qstart_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   stride_r2t, scale, GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    mblk = tl.program_id(2)
    ext = tl.load(ext_ptr + b).to(tl.int32)
    if mblk * BLOCK_M >= ext:
        return
    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    q0 = tl.load(qstart_ptr + b).to(tl.int64)
    row = tl.load(rpi_ptr + b).to(tl.int64)
    kvh = h // GROUP
    m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < ext
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dvmask = dv < DV
    q = tl.load(q_ptr + (q0 + m[:, None]) * stride_qt + h * stride_qh + d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    qpos = prefix + m
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    kv_end = tl.minimum(prefix + (mblk + 1) * BLOCK_M, prefix + ext)
    for n0 in range(0, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < kv_end
        slots = tl.load(r2t_ptr + row * stride_r2t + n, mask=nmask, other=0).to(tl.int64)
        k = tl.load(k_ptr + slots[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee").to(tl.float32) * scale
        causal = (n[None, :] <= qpos[:, None]) & nmask[None, :]
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = tl.load(v_ptr + slots[:, None] * stride_vt + kvh * stride_vh + dv[None, :],
                    mask=nmask[:, None] & dvmask[None, :], other=0.0).to(q.dtype)  # fp8 caches upcast
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (q0 + m[:, None]) * stride_ot + h * stride_oh + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dvmask[None, :])


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens, scale):
    T, H, D = q.shape
    Hk = k_cache.shape[1]
    DV = v_cache.shape[-1]
    o = torch.empty(T, H, DV, dtype=q.dtype, device=q.device)
    B = extend_lens.shape[0]
    if T == 0 or B == 0:
        return o
    qstart = torch.zeros(B, dtype=torch.int64, device=q.device)
    qstart[1:] = torch.cumsum(extend_lens, 0)[:-1]
    BLOCK_M = 32 if q.device.type == "cpu" else 64
    max_ext = int(extend_lens.max())
    _extend_kernel[(B, H, triton.cdiv(max_ext, BLOCK_M))](
        q, k_cache, v_cache, o, req_to_token, req_pool_indices, prefix_lens, extend_lens, qstart,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o.stride(0), o.stride(1), req_to_token.stride(0), scale, GROUP=H // Hk, D=D, DV=DV,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV), BLOCK_M=BLOCK_M, BLOCK_N=32)
    return o
