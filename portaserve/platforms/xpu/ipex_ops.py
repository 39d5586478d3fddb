"""Thin adapters from portaserve's op contracts onto intel_extension_for_pytorch (IPEX).

IPEX is archived upstream, so it is an optional provider on XPU (``needs_module``), never
a requirement; the shared Triton kernels serve XPU without it.  APIs used:
``ipex.llm.functional.{rms_norm, add_rms_norm, silu_and_mul, varlen_attention}`` and
``ipex.llm.modules.PagedAttention.single_query_cached_kv_attention``.

The KV pool is token-granular ([num_slots, Hk, D]); as a paged cache with block size 1
it is ``[num_slots, Hk, 1, D]`` (IPEX: blocks, heads, tokens-in-block, dim) — a view with
the same memory — and a request's block table is its row of ``req_to_token``.
"""
from __future__ import annotations

import torch


def _ipex():
    import intel_extension_for_pytorch as ipex  # noqa: PLC0415

    return ipex


def rmsnorm(x, weight, eps):
    return _ipex().llm.functional.rms_norm(x.contiguous(), weight, eps)


def fused_add_rmsnorm(x, residual, weight, eps):
    # add_rms_norm(residual, x, weight, bias, eps, add_back): with add_back=True it returns
    # rmsnorm(x + residual) and writes x + residual into `residual`, so hand it a copy.
    res = residual.clone()
    out = _ipex().llm.functional.add_rms_norm(res, x.contiguous(), weight, None, eps, True)
    return out, res


def silu_and_mul(x):
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    _ipex().llm.functional.silu_and_mul(x.contiguous(), out)
    return out


def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    ipex = _ipex()
    B, H, D = q.shape
    Hk = k_cache.shape[1]
    max_len = int(seq_lens.max())
    head_mapping = torch.arange(Hk, dtype=torch.int32, device=q.device).repeat_interleave(H // Hk)
    block_tables = req_to_token[req_pool_indices, :max_len].to(torch.int32).contiguous()
    out = torch.empty(B, H, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    ipex.llm.modules.PagedAttention.single_query_cached_kv_attention(
        out, q.contiguous(), k_cache.to(q.dtype).unsqueeze(2), v_cache.to(q.dtype).unsqueeze(2),
        head_mapping, scale, block_tables, seq_lens.to(torch.int32), 1, max_len, None)
    return out


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                     extend_lens, scale, max_extend=None):
    """IPEX's varlen attention for batches without a cached prefix (plain causal prefill,
    where top-left and bottom-right causal alignment agree).  A batch that extends a
    cached prefix goes to the shared Triton kernel (or native where Triton is absent):
    IPEX does not document its causal alignment for q shorter than k."""
    if int(prefix_lens.max()) > 0:
        from portaserve.core.ops.native import attention_extend as fallback

        if q.device.type != "cpu":
            try:
                from portaserve.platforms.triton_kernels.attention import attention_extend as fallback
            except ImportError:
                pass
        return fallback(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                        extend_lens, scale, max_extend)
    ipex = _ipex()
    H, Hk = q.shape[1], k_cache.shape[1]
    totals = extend_lens.to(torch.int64)
    max_total = int(totals.max())
    pos = torch.arange(max_total, device=q.device)
    valid = pos.unsqueeze(0) < totals.unsqueeze(1)
    slots = req_to_token[req_pool_indices, :max_total].long()[valid]
    k = k_cache[slots].to(q.dtype)
    v = v_cache[slots].to(q.dtype)
    if H != Hk:  # varlen_attention takes matching head counts
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32, device=q.device),
                    torch.cumsum(totals, 0).to(torch.int32)])
    out = torch.empty(q.shape[0], H, v.shape[-1], dtype=q.dtype, device=q.device)
    ipex.llm.functional.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), out,
                                         cu, cu, max_total, max_total, 0.0, scale, False, True,
                                         False, None)
    return out
