"""Thin adapters from portaserve's op contracts (``core/ops/native.py``) onto AMD's aiter.

aiter is AMD's kernel library for ROCm (https://github.com/ROCm/aiter), installed from its
GitHub release or source build, never from PyPI (the PyPI package named ``aiter`` is
unrelated).  Registered in ``platforms/providers.py`` with ``needs_module("aiter", ...)``,
so nothing here is imported unless aiter is present and the platform is ROCm.

Layout mapping.  The KV pool is token-granular: ``k_cache[slot] -> [Hk, D]``.  Seen as a
paged cache with block size 1 it is ``[num_slots, 1, Hk, D]`` (aiter's "NHD" layout:
blocks, tokens-in-block, heads, dim), and a request's block table is simply its row of
``req_to_token``.  No copy of the pool is made.
"""
from __future__ import annotations

import torch

_PARTITION_SIZE = 256  # aiter's ROCm paged-attention partition (as vLLM's ROCm backend uses)


def _aiter():
    import aiter  # noqa: PLC0415  (lazy: only on ROCm with aiter installed)

    return aiter


# ---- norms / activation ------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rmsnorm(x, weight, eps):
    out = _aiter().rms_norm(_rows(x), weight, eps)
    return out.view(x.shape)


def fused_add_rmsnorm(x, residual, weight, eps):
    a = _aiter()
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2)
    a.rmsnorm2d_fwd_with_add(out, x2, r2, res_out, weight, eps)
    return out.view(x.shape), res_out.view(x.shape)


def silu_and_mul(x):
    d = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    _aiter().silu_and_mul(out, x2)
    return out.view(*x.shape[:-1], d)


# ---- attention -----------------------------------------------------------------------------
def _paged_view(cache: torch.Tensor) -> torch.Tensor:
    # [S, Hk, D] -> [S, block_size=1, Hk, D]  (NHD), a view
    return cache.unsqueeze(1)


def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    a = _aiter()
    B, H, D = q.shape
    max_len = int(seq_lens.max())
    block_tables = req_to_token[req_pool_indices, :max_len].to(torch.int32).contiguous()
    context_lens = seq_lens.to(torch.int32)
    cu_query_lens = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    out = torch.empty(B, H, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    parts = (max_len + _PARTITION_SIZE - 1) // _PARTITION_SIZE
    elem = torch.finfo(q.dtype).bits // 8
    workspace = torch.empty(B * H * parts * D * elem + 2 * B * H * parts * 4,
                            dtype=torch.uint8, device=q.device)
    one = torch.ones((), dtype=torch.float32, device=q.device)
    a.paged_attention_v1(out, workspace, q.contiguous(), _paged_view(k_cache.to(q.dtype)),
                         _paged_view(v_cache.to(q.dtype)), scale, block_tables, cu_query_lens,
                         context_lens, max_len, None, "auto", "NHD", 0.0, one, one, None,
                         _PARTITION_SIZE)
    return out


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                     extend_lens, scale, max_extend=None):
    """Gather each request's prefix + new K/V into packed varlen tensors and run aiter's
    flash-attention varlen kernel, causal (bottom-right aligned, as flash-attention >= 2.1:
    query i of a request sits at position prefix + i)."""
    a = _aiter()
    totals = (prefix_lens + extend_lens).to(torch.int64)
    max_total = int(totals.max())
    pos = torch.arange(max_total, device=q.device)
    valid = pos.unsqueeze(0) < totals.unsqueeze(1)
    slots = req_to_token[req_pool_indices, :max_total].long()[valid]  # packed, request-major
    k = k_cache[slots].to(q.dtype)
    v = v_cache[slots].to(q.dtype)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_q = torch.cat([zero, torch.cumsum(extend_lens, 0).to(torch.int32)])
    cu_k = torch.cat([zero, torch.cumsum(totals, 0).to(torch.int32)])
    max_q = int(extend_lens.max()) if max_extend is None else max_extend
    out = a.flash_attn_varlen_func(q.contiguous(), k, v, cu_q, cu_k, max_q,
                                   max_total, dropout_p=0.0, softmax_scale=scale, causal=True)
    return out[0] if isinstance(out, (tuple, list)) else out
