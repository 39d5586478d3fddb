"""Attention on TPU over the paged KV pool, for fixed-shape (padded) XLA graphs.

Two paths, both reading the pool through ``req_to_token`` with no host synchronisation and
no data-dependent shapes (so one XLA graph per padded batch shape):

* **On a TPU: torch_xla's ragged paged attention (Pallas).**
  ``ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)``
  serves decode and extend alike: q holds the packed new tokens of every request
  (cu_q_lens), kv_lens the cached length of each, causal bottom-right aligned.  The
  kernel DMAs only the pages a request uses (up to kv_len) straight from ``kv_pages``.
  Padded batches: padding requests come last, so ``num_seqs`` (a device scalar, not a
  shape) counts only the requests with query tokens.

  **The one copy left, and why it cannot go with torch_xla 2.9's ops:** the kernel reads
  ``kv_pages [pages, page_size, 2*Hk, D]`` with K and V heads *interleaved* in one buffer,
  while core's pool keeps K and V apart (``[slots, Hk, D]`` each).  Its other paged ops
  don't fit either: ``paged_attention``/``multi_queries_paged_attention`` want head-major
  ``[Hk, pages, page_size, D]``.  So each call interleaves the layer's K and V into
  ``kv_pages`` (a copy of the layer's pool, page_size 1).  Removing it needs a TPU-owned
  pool layout: one ``[pages, page_size, 2*Hk, D]`` buffer per layer with a kv_store that
  writes K/V into it; the kernel then reads the pool in place, only the pages up to each
  kv_len, with page_size > 1 for efficient DMA.  That needs a platform hook for the KV
  pool's allocation in core (outside this package).

* **Elsewhere (XLA's CPU backend, tests): a gather through a fixed-size padded index.**
  Token t of a request stored in row r at position p attends to key positions 0..p:
  ``slots = req_to_token[r, :W]`` (W = the table's width, fixed), masked past p, and
  ``k_cache[slots]`` gathers exactly those keys from the pool — no interleaving, no
  per-request Python loop, no ``.item()``.  XLA may fuse the gather into its consumer;
  whether it does or materialises the [T, W, Hk, D] operand is the compiler's choice
  (on the CPU backend it materialises it: only the batch's keys, never the whole pool).
  The cost is O(W) per token (masked), the price of one graph per padded batch shape;
  the Pallas kernel stops at kv_len instead.  torch_xla's own reference for
  ``ragged_paged_attention(use_kernel=False)`` is unusable in graphs: it loops over
  sequences with ``.item()`` syncs and slices to data-dependent lengths, compiling a new
  graph per request length and layer.
"""
from __future__ import annotations

import torch

_MASK = -1e30  # finite: a row never becomes NaN, even one whose keys are all padding


def _use_kernel(device: torch.device) -> bool:
    """The Pallas kernel runs only on a real TPU; elsewhere the gather path."""
    if device.type != "xla":
        return False
    try:
        import torch_xla.runtime as xr

        return xr.device_type() == "TPU"
    except Exception:  # pragma: no cover - old torch_xla
        return False


# ---- the gather path -----------------------------------------------------------------------
def paged_attention(q, k_cache, v_cache, req_to_token, rows, pos, scale):
    """q [T, H, D]; token t attends to the keys at positions 0..pos[t] of req_to_token
    row rows[t] (its own K/V must already be in the pool).  Static shapes throughout."""
    T, H, D = q.shape
    Hk = k_cache.shape[1]
    W = req_to_token.shape[1]
    kpos = torch.arange(W, device=q.device)
    valid = kpos.unsqueeze(0) <= pos.unsqueeze(1)  # [T, W]
    # masked positions read the padding slot 0 (finite), never stale slots
    slots = torch.where(valid, req_to_token[rows], torch.zeros((), dtype=req_to_token.dtype,
                                                                   device=q.device)).long()
    k = k_cache[slots].float()  # [T, W, Hk, D]
    v = v_cache[slots].float()
    qg = q.view(T, Hk, H // Hk, D).float()
    s = torch.einsum("tkgd,twkd->tkgw", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], _MASK)
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("tkgw,twkd->tkgd", p, v)
    return o.reshape(T, H, -1).to(q.dtype)


def extend_token_index(T, req_pool_indices, prefix_lens, extend_lens):
    """(row, position) of each of the T packed tokens of an extend batch, computed on the
    device with static shapes.  Tokens past sum(extend_lens) map to the last request."""
    B = req_pool_indices.shape[0]
    ends = torch.cumsum(extend_lens, 0)  # [B]
    t = torch.arange(T, device=ends.device)
    r = (ends.unsqueeze(0) <= t.unsqueeze(1)).sum(1).clamp(max=B - 1)  # request of token t
    start = ends[r] - extend_lens[r]
    return req_pool_indices[r], prefix_lens[r] + (t - start)


# ---- the Pallas path (TPU) ---------------------------------------------------------------
def _kv_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype) -> torch.Tensor:
    S, Hk, D = k_cache.shape
    # the copy explained above: interleave K and V heads into the kernel's layout
    return torch.stack((k_cache.to(dtype), v_cache.to(dtype)), dim=2).reshape(S, 1, 2 * Hk, D)


def ragged(q, k_cache, v_cache, page_indices, kv_lens, q_lens, scale, use_kernel=True):
    from torch_xla.experimental.custom_kernel import ragged_paged_attention

    if k_cache.shape[-1] != v_cache.shape[-1]:
        raise NotImplementedError("ragged_paged_attention needs equal K and V head dims")
    B = int(kv_lens.shape[0])
    q_lens = q_lens.to(torch.int32)
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int32, device=q.device), torch.cumsum(q_lens, 0,
                                                                                     dtype=torch.int32)])
    # padding requests (no query tokens) come last: count only those before them
    num_seqs = (q_lens > 0).sum().to(torch.int32).reshape(1) if B else torch.zeros(1, dtype=torch.int32)
    return ragged_paged_attention(
        q.contiguous(), _kv_pages(k_cache, v_cache, q.dtype), kv_lens.to(torch.int32),
        page_indices.to(torch.int32).contiguous(), cu_q, num_seqs, sm_scale=scale,
        use_kernel=use_kernel)


# ---- the registered ops -------------------------------------------------------------------
def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    if _use_kernel(q.device):
        ones = torch.ones(q.shape[0], dtype=torch.int32, device=q.device)
        return ragged(q, k_cache, v_cache, req_to_token[req_pool_indices], seq_lens, ones, scale)
    return paged_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens - 1, scale)


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                     extend_lens, scale, max_extend=None):
    if _use_kernel(q.device):
        return ragged(q, k_cache, v_cache, req_to_token[req_pool_indices], prefix_lens + extend_lens,
                      extend_lens, scale)
    rows, pos = extend_token_index(q.shape[0], req_pool_indices, prefix_lens, extend_lens)
    return paged_attention(q, k_cache, v_cache, req_to_token, rows, pos, scale)
