"""Decode on XLA with static shapes: batches are padded up to a bucket of a fixed ladder,
so XLA compiles a bounded set of decode graphs (one per bucket) instead of one per batch
size.  Padded entries read and write only the padding slot 0 through the pool's pad row,
and their logits are dropped — the same contract as the CUDA graph runner, whose ladder
this reuses.  Plugged in through ``Platform.decode_graph_runner``.
"""
from __future__ import annotations

import bisect

import torch

from portaserve.core.forward_batch import ForwardBatch
from portaserve.platforms.cuda.graph_runner import batch_size_ladder


def pad_to_bucket(n: int, buckets: list[int]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


class XlaDecodeRunner:
    def __init__(self, model, kv, req_pool, max_bs: int, device):
        self.model = model
        self.kv = kv
        self.req_to_token = req_pool.req_to_token
        self.pad_row = req_pool.pad_row
        self.device = device
        self.sizes = batch_size_ladder(max_bs)
        self.max_bs = self.sizes[-1]
        self.buckets_used: set[int] = set()

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.batch_size <= self.max_bs

    def padded(self, fb: ForwardBatch) -> ForwardBatch:
        b = fb.batch_size
        bs = pad_to_bucket(b, self.sizes)
        if bs == b:
            return fb
        n = bs - b

        def pad(t, value):
            return torch.cat([t, torch.full((n,), value, dtype=t.dtype, device=t.device)])

        return ForwardBatch(is_decode=True, input_ids=pad(fb.input_ids, 0),
                            positions=pad(fb.positions, 0), out_cache_loc=pad(fb.out_cache_loc, 0),
                            req_pool_indices=pad(fb.req_pool_indices, self.pad_row),
                            seq_lens=pad(fb.seq_lens, 1), kv=fb.kv, req_to_token=fb.req_to_token)

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        b = fb.batch_size
        pfb = self.padded(fb)
        self.buckets_used.add(pfb.batch_size)
        return self.model.compute_logits(self.model(pfb))[:b]
