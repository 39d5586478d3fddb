"""Attention on TPU through torch_xla's ragged paged attention (Pallas on TPU; torch_xla's
own reference path elsewhere, e.g. under ``PJRT_DEVICE=CPU``).

``ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, ...)``
serves decode and extend alike: q holds the packed new tokens of every request
(cu_q_lens), kv_lens the cached length of each, and attention is causal, bottom-right
aligned (query i of a request sits at position kv_len - q_len + i).

KV layout: the kernel reads ``kv_pages [pages, page_size, 2*Hk, D]`` with K and V heads
interleaved (k0, v0, k1, v1, ...).  The pool keeps K and V apart ([slots, Hk, D] each), so
each call interleaves them with page_size 1 and page_indices = the request rows of
req_to_token.  That copy is the price of keeping the core's KV pool platform-neutral; a
TPU-native pool with interleaved K/V pages would remove it.
"""
from __future__ import annotations

import torch


def _use_kernel(device: torch.device) -> bool:
    """The Pallas kernel runs only on a real TPU; elsewhere the reference path."""
    if device.type != "xla":
        return False
    try:
        import torch_xla.runtime as xr

        return xr.device_type() == "TPU"
    except Exception:  # pragma: no cover - old torch_xla
        return False


def _kv_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype) -> torch.Tensor:
    S, Hk, D = k_cache.shape
    return torch.stack((k_cache.to(dtype), v_cache.to(dtype)), dim=2).reshape(S, 1, 2 * Hk, D)


def _ragged(q, k_cache, v_cache, page_indices, kv_lens, q_lens, scale):
    from torch_xla.experimental.custom_kernel import ragged_paged_attention

    if k_cache.shape[-1] != v_cache.shape[-1]:
        raise NotImplementedError("ragged_paged_attention needs equal K and V head dims")
    B = int(kv_lens.shape[0])
    cu_q = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu_q[1:] = torch.cumsum(q_lens.to(torch.int32), 0)
    num_seqs = torch.tensor([B], dtype=torch.int32, device=q.device)
    return ragged_paged_attention(
        q.contiguous(), _kv_pages(k_cache, v_cache, q.dtype), kv_lens.to(torch.int32),
        page_indices.to(torch.int32).contiguous(), cu_q, num_seqs, sm_scale=scale,
        use_kernel=_use_kernel(q.device))


def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    B = q.shape[0]
    page_indices = req_to_token[req_pool_indices]
    ones = torch.ones(B, dtype=torch.int32, device=q.device)
    return _ragged(q, k_cache, v_cache, page_indices, seq_lens, ones, scale)


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                     extend_lens, scale):
    page_indices = req_to_token[req_pool_indices]
    return _ragged(q, k_cache, v_cache, page_indices, prefix_lens + extend_lens, extend_lens, scale)
