"""What one model forward pass needs to know about its batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from portaserve.core.memory import KVPool
from portaserve.core.shared_prefix import SharedPrefix


@dataclass
class ForwardBatch:
    is_decode: bool
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T] KV slots the new tokens are written to
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B] tokens in the cache after this pass
    kv: KVPool
    req_to_token: torch.Tensor
    prefix_lens: Optional[torch.Tensor] = None  # [B] (extend)
    extend_lens: Optional[torch.Tensor] = None  # [B] (extend)
    # extend (mixed) batches: the last decode_tail requests each compute one token, their
    # decode step; attention runs them through the decode kernel
    decode_tail: int = 0
    # decode batches with requests sharing cached prefixes: cascade attention's tiles
    shared: Optional[SharedPrefix] = None
    # host copies of seq_lens and extend_lens (integer CPU tensors), for attention providers that
    # plan on the host once per forward (ops.attention_prepare) without reading the device
    seq_lens_cpu: Optional[torch.Tensor] = None
    extend_lens_cpu: Optional[torch.Tensor] = None
    # extend: the longest extend of the prompt part (decode tail excluded), known on the host
    max_extend_len: Optional[int] = None

    @property
    def batch_size(self) -> int:
        return int(self.req_pool_indices.shape[0])
