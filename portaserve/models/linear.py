"""Linear layers that know tensor parallelism and quantization.

Tensor parallelism (Megatron's split, as SGLang and vLLM do it):

  ColumnParallelLinear  splits the output features: each rank holds its slice of every
                        logical shard (q|k|v or gate|up fused into one matrix) and
                        returns its slice of the output; no communication.
  RowParallelLinear     splits the input features: each rank multiplies its slice of the
                        input by its slice of the weight and the partial sums are
                        all-reduced (bias added once, after the reduction).
  VocabParallelEmbedding / ParallelLMHead  split the vocabulary rows.

How a layer's weights are stored and multiplied is its LinearMethod (unquantized here;
FP8 / INT8 / INT4 methods in models/quantization.py).  A method creates the layer's
parameters (``add_param``) and tags each with the dimension that holds output features
(``output_dim``) and the one that holds input features (``input_dim``); loading uses
only those tags, so a packed INT4 tensor or a per-group scale is sliced for a rank the
same way as a plain weight: a parameter's local extent along a tagged dimension is
proportional to the layer's local feature count.  A parameter tagged ``shard_indexed``
holds one entry per logical shard (per-tensor scales of fused q|k|v).

Checkpoint tensors arrive as ``LazyWeight`` views: slicing one reads only that slice
from the safetensors file, so each rank reads only its part of every matrix.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from portaserve.core import ops
from portaserve.core.parallel import divide, tp_rank, tp_size


# ---- lazily read checkpoint tensors -------------------------------------------------------
class LazyWeight:
    """A checkpoint tensor, or a rectangular slice of one, not read until ``load()``.

    source: a torch.Tensor, or a safetensors slice (``safe_open(...).get_slice(name)``,
    which reads only the indexed part); full: a callable returning the whole tensor (used
    when nothing was sliced, which also covers 0-d tensors)."""

    def __init__(self, source, shape: Sequence[int], full: Optional[Callable] = None,
                 index: Optional[tuple] = None):
        self.source = source
        self.shape = torch.Size(shape)
        self._full = full
        self._index = index  # tuple of slices, one per dim, or None (whole tensor)

    @classmethod
    def of(cls, w) -> "LazyWeight":
        return w if isinstance(w, LazyWeight) else cls(w, w.shape)

    def narrow(self, dim: int, start: int, size: int) -> "LazyWeight":
        dim = dim % len(self.shape)
        if start < 0 or size < 0 or start + size > self.shape[dim]:
            raise ValueError(f"slice [{start}:{start + size}] out of range for dim {dim} "
                             f"of a tensor of shape {tuple(self.shape)}")
        index = list(self._index or [slice(0, n) for n in self.shape])
        base = index[dim].start
        index[dim] = slice(base + start, base + start + size)
        shape = list(self.shape)
        shape[dim] = size
        return LazyWeight(self.source, shape, self._full, tuple(index))

    def load(self) -> torch.Tensor:
        if self._index is None:
            t = self._full() if self._full is not None else self.source
        else:
            t = self.source[self._index]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        return t


def add_param(layer: nn.Module, name: str, p: torch.Tensor, *, output_dim: Optional[int],
              input_dim: Optional[int], shard_indexed: bool = False) -> nn.Parameter:
    """Register a (frozen) parameter with its loading tags.  The tags live on the layer,
    not the tensor: materialising a meta-built model replaces the tensors."""
    p = p if isinstance(p, nn.Parameter) else nn.Parameter(p, requires_grad=False)
    layer.register_parameter(name, p)
    tags = layer.__dict__.setdefault("param_tags", {})
    tags[name] = {"output_dim": output_dim, "input_dim": input_dim, "shard_indexed": shard_indexed}
    return p


def _tag(layer: nn.Module, name: str, key: str):
    return layer.__dict__.get("param_tags", {}).get(name, {}).get(key)


def _copy(dst: torch.Tensor, w: LazyWeight, what: str) -> int:
    t = w.load()
    if tuple(t.shape) != tuple(dst.shape):
        if t.numel() == dst.numel() == 1:
            t = t.reshape(dst.shape)  # scalars stored as [] or [1]
        else:
            raise ValueError(f"{what}: checkpoint shape {tuple(t.shape)} != model {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(t)
    return dst.numel()


# ---- linear methods ----------------------------------------------------------------------------
class LinearMethod:
    """How a linear layer stores and applies its weight."""

    # checkpoint parameters this method reads but does not keep (e.g. GPTQ's g_idx when
    # it is the trivial ordering)
    ignored_params: tuple = ()

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int,
                       dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T for the layer's (local) weight, without bias."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer, in_features, out_features, dtype):
        add_param(layer, "weight", torch.empty(out_features, in_features, dtype=dtype),
                  output_dim=0, input_dim=1)

    def apply(self, layer, x):
        return ops.linear(x, layer.weight)


def linear_method(quant_config, prefix: str) -> LinearMethod:
    """The method a layer named ``prefix`` uses under ``quant_config`` (None: unquantized)."""
    if quant_config is None:
        return UnquantizedLinearMethod()
    return quant_config.linear_method(prefix)


# ---- layers ------------------------------------------------------------------------------------
class _LinearBase(nn.Module):
    def __init__(self, in_local: int, out_local: int, bias: bool, quant_config, prefix: str,
                 dtype: Optional[torch.dtype]):
        super().__init__()
        self.in_local, self.out_local, self.prefix = in_local, out_local, prefix
        self.method = linear_method(quant_config, prefix)
        dtype = dtype or torch.get_default_dtype()
        self.method.create_weights(self, in_local, out_local, dtype)
        if bias:
            add_param(self, "bias", torch.empty(out_local, dtype=dtype), output_dim=0, input_dim=None)
        else:
            self.bias = None

    def _extent(self, p: torch.Tensor, dim: int, local: int, total_local: int) -> int:
        """Extent along dim of ``local`` features of a parameter holding total_local."""
        n = p.shape[dim] * local
        if n % total_local:
            raise ValueError(f"{self.prefix}: parameter of shape {tuple(p.shape)} cannot be "
                             f"split into {local}/{total_local} along dim {dim}")
        return n // total_local

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)


class ColumnParallelLinear(_LinearBase):
    """y = x W^T with W's output features split over the ranks.

    shards: full output size of each logical shard fused into this layer ([q, k, v],
    [gate, up], or just [out]).  shard_starts(rank) may override where a rank's slice
    of each shard begins (KV heads replicated when there are fewer than ranks)."""

    def __init__(self, in_features: int, shards: Sequence[int], bias: bool = False,
                 quant_config=None, prefix: str = "", gather_output: bool = False,
                 local_sizes: Optional[Sequence[int]] = None,
                 starts: Optional[Sequence[int]] = None, dtype=None):
        n, r = tp_size(), tp_rank()
        local = list(local_sizes) if local_sizes is not None else [
            divide(s, n, f"{prefix or 'linear'} output size") for s in shards]
        self.full_sizes = list(shards)
        self.local_sizes = local
        self.starts = list(starts) if starts is not None else [r * l for l in local]
        self.offsets = [sum(local[:i]) for i in range(len(local))]
        self.gather_output = gather_output
        super().__init__(in_features, sum(local), bias, quant_config, prefix, dtype)

    def forward(self, x):
        y = self.method.apply(self, x)
        if self.bias is not None:
            y = y + self.bias
        return ops.all_gather(y, -1) if self.gather_output else y

    def load_weight(self, name: str, w, shard: Optional[int] = None) -> int:
        p = getattr(self, name)
        w = LazyWeight.of(w)
        if shard is None:
            if len(self.local_sizes) != 1:
                raise ValueError(f"{self.prefix}.{name}: fused layer needs a shard index")
            shard = 0
        if _tag(self, name, "shard_indexed"):
            return _copy(p.data[shard], w, f"{self.prefix}.{name}")
        od = _tag(self, name, "output_dim")
        if od is None:  # replicated (a per-tensor scale of an unfused layer)
            return _copy(p.data, w, f"{self.prefix}.{name}")
        size = self._extent(p, od, self.local_sizes[shard], self.out_local)
        off = self._extent(p, od, self.offsets[shard], self.out_local)
        start = self._extent(p, od, self.starts[shard], self.out_local)
        full = self._extent(p, od, self.full_sizes[shard], self.out_local)
        if w.shape[od] != full:
            raise ValueError(f"{self.prefix}.{name} (shard {shard}): checkpoint has {w.shape[od]} "
                             f"along dim {od}, the model expects {full}")
        return _copy(p.data.narrow(od, off, size), w.narrow(od, start, size), f"{self.prefix}.{name}")


class RowParallelLinear(_LinearBase):
    """y = all_reduce(x_r W_r^T) + b with W's input features split over the ranks; x is
    already split (the output of a column-parallel layer or of attention heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_config=None, prefix: str = "", reduce_results: bool = True, dtype=None):
        self.in_full = in_features
        self.reduce_results = reduce_results
        super().__init__(divide(in_features, tp_size(), f"{prefix or 'linear'} input size"),
                         out_features, bias, quant_config, prefix, dtype)

    def forward(self, x):
        y = self.method.apply(self, x)
        if self.reduce_results:
            y = ops.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def load_weight(self, name: str, w, shard: Optional[int] = None) -> int:
        p = getattr(self, name)
        w = LazyWeight.of(w)
        idim = _tag(self, name, "input_dim")
        if idim is None:
            return _copy(p.data, w, f"{self.prefix}.{name}")
        size = p.shape[idim]
        return _copy(p.data, w.narrow(idim, tp_rank() * size, size), f"{self.prefix}.{name}")


class ReplicatedLinear(ColumnParallelLinear):
    """Every rank holds the whole matrix (MoE routers, small gates)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_config=None, prefix: str = "", dtype=None):
        super().__init__(in_features, [out_features], bias, None, prefix,
                         local_sizes=[out_features], starts=[0], dtype=dtype)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the ranks (vocabulary padded to a multiple of the rank
    count; padding rows are zero).  Each rank looks up the ids it owns and the partial
    results are all-reduced."""

    def __init__(self, vocab_size: int, hidden: int, dtype=None):
        super().__init__()
        n = tp_size()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // n)
        self.start = tp_rank() * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden,
                                               dtype=dtype or torch.get_default_dtype()),
                                   requires_grad=False)

    def forward(self, ids):
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        out = out * mask.unsqueeze(-1).to(out.dtype)
        return ops.all_reduce(out)

    def load_weight(self, name: str, w, shard=None) -> int:
        w = LazyWeight.of(w)
        if w.shape[0] != self.vocab_size:
            raise ValueError(f"vocabulary-parallel {name}: checkpoint has {w.shape[0]} rows, "
                             f"the config says {self.vocab_size}")
        n = max(0, min(self.per_rank, self.vocab_size - self.start))
        with torch.no_grad():
            self.weight.data[n:].zero_()
        if n:
            _copy(self.weight.data[:n], w.narrow(0, self.start, n), name)
        return self.weight.numel()


def vocab_parallel_logits(hidden: torch.Tensor, emb: VocabParallelEmbedding) -> torch.Tensor:
    """Full-vocabulary logits from a vocabulary-split weight (an LM head, or the tied
    embedding): each rank computes its slice, the slices are gathered, padding dropped."""
    out = ops.all_gather(ops.linear(hidden, emb.weight), -1)
    return out[..., :emb.vocab_size] if out.shape[-1] != emb.vocab_size else out


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection with the vocabulary split like VocabParallelEmbedding (its
    logits: vocab_parallel_logits)."""
