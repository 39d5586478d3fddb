"""Stand-ins for vendor libraries that cannot be installed on a CPU host (AMD's aiter,
Intel's IPEX, torch_xla's ragged paged attention), written from their documented
contracts as plain loops.  They check the *adapters*: argument order, layouts (paged
views with block size 1, block tables, cu_seqlens), head mappings and causal alignment.
They say nothing about the vendor kernels' own numerics, which need the hardware."""
from __future__ import annotations

import math
import types

import torch


def _rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def _attend(q, k, v, scale, causal_offset=None):
    """q [Tq, H, D], k/v [Tk, H, D] (heads already matched); causal_offset: position of
    query 0 among the keys (bottom-right alignment: Tk - Tq)."""
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if causal_offset is not None:
        qi = torch.arange(q.shape[0])[:, None] + causal_offset
        ki = torch.arange(k.shape[0])[None, :]
        s = s.masked_fill(ki > qi, -math.inf)
    p = torch.softmax(s, -1)
    return torch.einsum("hqk,khd->qhd", p, v.double())


def _gather_paged(cache, table, n, block_size, layout):
    """Token rows [n, Hk, D] of one sequence from a paged cache."""
    rows = []
    for pos in range(n):
        blk = int(table[pos // block_size])
        off = pos % block_size
        rows.append(cache[blk, off] if layout == "NHD" else cache[blk, :, off])
    return torch.stack(rows)


# ---- aiter ------------------------------------------------------------------------------------
def make_aiter():
    m = types.ModuleType("aiter")
    m.calls = []

    def rms_norm(x, weight, eps, *rest):
        m.calls.append("rms_norm")
        assert x.dim() == 2
        return _rms(x, weight, eps)

    def rmsnorm2d_fwd_with_add(out, x, residual_in, residual_out, weight, eps, *rest):
        m.calls.append("rmsnorm2d_fwd_with_add")
        s = x + residual_in
        residual_out.copy_(s)
        out.copy_(_rms(s, weight, eps))

    def silu_and_mul(out, x):
        m.calls.append("silu_and_mul")
        d = x.shape[-1] // 2
        out.copy_((torch.nn.functional.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype))

    def paged_attention_v1(out, workspace, query, key_cache, value_cache, scale, block_tables,
                           cu_query_lens, context_lens, max_context_len, alibi, kv_dtype,
                           layout, soft_cap, k_scale, v_scale, fp8_out_scale=None,
                           partition_size=256):
        m.calls.append("paged_attention_v1")
        assert layout == "NHD" and kv_dtype == "auto" and alibi is None
        assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
        assert workspace.dtype == torch.uint8
        H = query.shape[1]
        Hk = key_cache.shape[2]
        bs = key_cache.shape[1]
        for b in range(query.shape[0]):
            qs, qe = int(cu_query_lens[b]), int(cu_query_lens[b + 1])
            n = int(context_lens[b])
            assert n <= max_context_len
            k = _gather_paged(key_cache, block_tables[b], n, bs, "NHD").repeat_interleave(H // Hk, 1)
            v = _gather_paged(value_cache, block_tables[b], n, bs, "NHD").repeat_interleave(H // Hk, 1)
            out[qs:qe] = _attend(query[qs:qe], k, v, scale, n - (qe - qs)).to(out.dtype)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        m.calls.append("flash_attn_varlen_func")
        assert dropout_p == 0.0 and causal
        H, Hk = q.shape[1], k.shape[1]
        out = torch.empty(q.shape[0], H, v.shape[-1], dtype=q.dtype)
        for b in range(len(cu_seqlens_q) - 1):
            qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
            kk = k[ks:ke].repeat_interleave(H // Hk, 1)
            vv = v[ks:ke].repeat_interleave(H // Hk, 1)
            out[qs:qe] = _attend(q[qs:qe], kk, vv, softmax_scale, (ke - ks) - (qe - qs)).to(q.dtype)
        return out

    for f in (rms_norm, rmsnorm2d_fwd_with_add, silu_and_mul, paged_attention_v1, flash_attn_varlen_func):
        setattr(m, f.__name__, f)
    return m


# ---- intel_extension_for_pytorch ---------------------------------------------------------------
def make_ipex():
    m = types.ModuleType("intel_extension_for_pytorch")
    m.calls = []
    fn = types.SimpleNamespace()

    def rms_norm(x, weight, eps):
        m.calls.append("rms_norm")
        return _rms(x, weight, eps)

    def add_rms_norm(residual, x, weight, bias, eps, add_back):
        m.calls.append("add_rms_norm")
        assert bias is None
        s = x + residual
        if add_back:
            residual.copy_(s)
        return _rms(s, weight, eps)

    def silu_and_mul(x, out):
        m.calls.append("silu_and_mul")
        d = x.shape[-1] // 2
        out.copy_((torch.nn.functional.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype))

    def varlen_attention(q, k, v, out, cu_q, cu_k, max_q, max_k, pdrop, scale, zero_tensors,
                         is_causal, return_softmax, gen):
        m.calls.append("varlen_attention")
        assert q.shape[1] == k.shape[1], "varlen_attention takes matching head counts"
        assert cu_q.dtype == torch.int32 and is_causal and not return_softmax
        for b in range(len(cu_q) - 1):
            qs, qe = int(cu_q[b]), int(cu_q[b + 1])
            ks, ke = int(cu_k[b]), int(cu_k[b + 1])
            assert qe - qs == ke - ks, "the adapter only sends prefix-free batches"
            out[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], scale, 0).to(out.dtype)

    def single_query_cached_kv_attention(out, q, key_cache, value_cache, head_mapping, scale,
                                         block_tables, context_lens, block_size, max_len, alibi):
        m.calls.append("single_query_cached_kv_attention")
        assert key_cache.shape[2] == block_size  # [blocks, Hk, block_size, D]
        for b in range(q.shape[0]):
            n = int(context_lens[b])
            k = _gather_paged(key_cache, block_tables[b], n, block_size, "HND")
            v = _gather_paged(value_cache, block_tables[b], n, block_size, "HND")
            k = k[:, head_mapping.long()]
            v = v[:, head_mapping.long()]
            out[b] = _attend(q[b:b + 1], k, v, scale, n - 1)[0].to(out.dtype)

    fn.rms_norm, fn.add_rms_norm, fn.silu_and_mul, fn.varlen_attention = (
        rms_norm, add_rms_norm, silu_and_mul, varlen_attention)
    pa = types.SimpleNamespace(single_query_cached_kv_attention=single_query_cached_kv_attention)
    m.llm = types.SimpleNamespace(functional=fn, modules=types.SimpleNamespace(PagedAttention=pa))
    return m


# ---- torch_xla's ragged paged attention -----------------------------------------------------
def make_custom_kernel():
    m = types.ModuleType("torch_xla.experimental.custom_kernel")
    m.calls = []

    def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale=1.0, use_kernel=True, **kw):
        m.calls.append(("ragged_paged_attention", use_kernel))
        assert kv_lens.dtype == page_indices.dtype == cu_q_lens.dtype == torch.int32
        _, page_size, combined, D = kv_pages.shape
        Hk = combined // 2
        H = q.shape[1]
        out = torch.zeros_like(q)
        for i in range(int(num_seqs[0])):
            qs, qe = int(cu_q_lens[i]), int(cu_q_lens[i + 1])
            n = int(kv_lens[i])
            rows = torch.stack([kv_pages[int(page_indices[i, p // page_size]), p % page_size] for p in range(n)])
            k = rows[:, 0::2].repeat_interleave(H // Hk, 1)
            v = rows[:, 1::2].repeat_interleave(H // Hk, 1)
            out[qs:qe] = _attend(q[qs:qe], k, v, sm_scale, n - (qe - qs)).to(q.dtype)
        return out

    m.ragged_paged_attention = ragged_paged_attention
    return m
