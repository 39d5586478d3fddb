"""Building blocks shared by model graphs; every hot op goes through core.ops."""
from __future__ import annotations

import torch
from torch import nn

from portaserve.core import ops
from portaserve.core.forward_batch import ForwardBatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        if residual is None:
            return ops.rmsnorm(x, self.weight, self.eps)
        return ops.fused_add_rmsnorm(x, residual, self.weight, self.eps)


class PagedAttention(nn.Module):
    """Stores the new tokens' K/V into the paged pool, then attends over the pool
    (RadixAttention: prefixes shared through the radix cache are just shared slots)."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q, k, v, fb: ForwardBatch, rope=None):
        """rope: (positions, cos_sin_cache, is_neox) to rotate q and k on the way in (one
        op with the store, so a platform can fuse them)."""
        k_cache = fb.kv.k[self.layer_id]
        v_cache = fb.kv.v[self.layer_id]
        if rope is not None:
            positions, cos_sin, is_neox = rope
            q = ops.rotary_kv_store(positions, q, k, v, cos_sin, is_neox, k_cache, v_cache, fb.out_cache_loc)
        else:
            ops.kv_store(k_cache, v_cache, fb.out_cache_loc, k, v)
        if fb.is_decode and fb.shared is not None:
            sp = fb.shared
            return ops.attention_decode_shared(q, k_cache, v_cache, fb.req_to_token, fb.req_pool_indices,
                                               fb.seq_lens, self.scale, sp.kv_start, sp.tile_rows,
                                               sp.tile_lens, sp.tile_members)
        if fb.is_decode:
            return ops.attention_decode(q, k_cache, v_cache, fb.req_to_token, fb.req_pool_indices,
                                        fb.seq_lens, self.scale)
        n = fb.decode_tail
        if n:  # mixed batch: prompt chunks, then running requests' one-token decode steps
            t = q.shape[0] - n
            head = ops.attention_extend(q[:t], k_cache, v_cache, fb.req_to_token, fb.req_pool_indices[:-n],
                                        fb.prefix_lens[:-n], fb.extend_lens[:-n], self.scale, fb.max_extend_len)
            tail = ops.attention_decode(q[t:], k_cache, v_cache, fb.req_to_token, fb.req_pool_indices[-n:],
                                        fb.seq_lens[-n:], self.scale)
            return torch.cat([head, tail])
        return ops.attention_extend(q, k_cache, v_cache, fb.req_to_token, fb.req_pool_indices,
                                    fb.prefix_lens, fb.extend_lens, self.scale, fb.max_extend_len)
