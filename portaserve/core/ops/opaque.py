"""Torch custom ops wrapping the registry ops a compiler should not trace: attention and
the collectives (see ``ops.use_opaque_ops``).  Each calls whatever provider the op table chose, so
torch.compile keeps the platform's attention kernels and collectives as single nodes.

No ``from __future__ import annotations`` here: torch.library reads the signatures."""
from typing import Optional

import torch
from torch import Tensor

from portaserve.core import parallel

_impl: dict = {}  # op name -> chosen provider (the registry's live dict)


@torch.library.custom_op("portaserve::attention_decode", mutates_args=())
def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                     req_pool_indices: Tensor, seq_lens: Tensor, scale: float) -> Tensor:
    return _impl["attention_decode"](q, k_cache, v_cache, req_to_token, req_pool_indices,
                                     seq_lens, scale)


@attention_decode.register_fake
def _(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("portaserve::attention_decode_shared", mutates_args=())
def attention_decode_shared(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                            req_pool_indices: Tensor, seq_lens: Tensor, scale: float, kv_start: Tensor,
                            tile_rows: Tensor, tile_lens: Tensor, tile_members: Tensor) -> Tensor:
    return _impl["attention_decode_shared"](q, k_cache, v_cache, req_to_token, req_pool_indices,
                                            seq_lens, scale, kv_start, tile_rows, tile_lens, tile_members)


@attention_decode_shared.register_fake
def _(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale, kv_start, tile_rows,
      tile_lens, tile_members):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("portaserve::attention_extend", mutates_args=())
def attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                     req_pool_indices: Tensor, prefix_lens: Tensor, extend_lens: Tensor,
                     scale: float, max_extend: Optional[int] = None) -> Tensor:
    return _impl["attention_extend"](q, k_cache, v_cache, req_to_token, req_pool_indices,
                                     prefix_lens, extend_lens, scale, max_extend)


@attention_extend.register_fake
def _(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens, scale, max_extend=None):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("portaserve::all_reduce", mutates_args=("x",))
def all_reduce(x: Tensor) -> None:
    _impl["all_reduce"](x, parallel.tp_group())


@torch.library.custom_op("portaserve::all_gather", mutates_args=())
def all_gather(x: Tensor, dim: int) -> Tensor:
    return _impl["all_gather"](x, dim, parallel.tp_group())


@all_gather.register_fake
def _(x, dim):
    shape = list(x.shape)
    shape[dim] *= parallel.tp_size()
    return x.new_empty(shape)


def _all_reduce_route(x, group):
    all_reduce(x)
    return x


def routes(impl: dict) -> dict:
    """The opaque replacements, keyed by op name; they call impl[op] at run time."""
    global _impl
    _impl = impl
    return {"attention_decode": attention_decode, "attention_decode_shared": attention_decode_shared,
            "attention_extend": attention_extend, "all_reduce": _all_reduce_route,
            "all_gather": lambda x, dim, group: all_gather(x, dim)}
