"""Collectives for tensor parallelism, over torch.distributed, with the backend the
platform names: gloo (CPU), nccl (CUDA, and RCCL behind the same name on ROCm), xccl
(Intel XPU, torch >= 2.8), xla (TPU; importing torch_xla.distributed.xla_backend
registers it).

    comm = Communicator.for_platform(platform)        # after init_distributed(...)
    comm.all_reduce(t); comm.all_gather(t, dim=-1); comm.reduce_scatter(t); comm.broadcast(t)

Where a backend lacks the fused tensor collectives (gloo has no reduce_scatter_tensor and
older gloo no all_gather_into_tensor) the same result is built from the list forms.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from portaserve.core.ops import native

_BACKEND_MODULE = {"xla": "torch_xla"}


def init_distributed(platform, rank: int, world_size: int, init_method: str | None = None,
                     timeout_s: float = 120.0, store=None) -> "Communicator":
    """Join the default process group with the platform's backend (rendezvous through
    init_method, e.g. tcp://host:port, or an existing store); returns a Communicator."""
    import datetime

    backend = platform.dist_backend
    if backend == "xla":
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers "xla")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=None if store is not None else init_method,
                                store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Communicator.for_platform(platform)


@dataclass
class CommConfig:
    world_size: int
    backend: str


class Communicator:
    def __init__(self, backend: str, group: Optional[dist.ProcessGroup] = None):
        self.backend = backend
        self.group = group

    @classmethod
    def for_platform(cls, platform, group=None) -> "Communicator":
        return cls(platform.dist_backend, group)

    # ---- capability -------------------------------------------------------------------------
    @staticmethod
    def validate(config: CommConfig) -> list[str]:
        """Reasons this backend cannot serve ``config`` (empty when it can)."""
        reasons = []
        if config.world_size < 1:
            reasons.append(f"world size must be >= 1, got {config.world_size}")
        if config.world_size == 1:
            return reasons  # no collective ever runs
        if not dist.is_available():
            reasons.append("this torch build has no torch.distributed")
            return reasons
        mod = _BACKEND_MODULE.get(config.backend)
        if mod and importlib.util.find_spec(mod) is None:
            reasons.append(f"backend {config.backend} needs {mod}")
        checks = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available,
                  "xccl": getattr(dist, "is_xccl_available", lambda: False)}
        check = checks.get(config.backend)
        if check is not None and not check():
            reasons.append(f"torch.distributed backend {config.backend} is not available in this torch build")
        return reasons

    # ---- properties ---------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    # ---- collectives (identity at world size 1) ----------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; returns t."""
        if self.world_size == 1:
            return t
        if op == "sum":
            return native.all_reduce(t, self.group)  # the model's all-reduce (core/ops)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenation of every rank's t along dim (rank order)."""
        if self.world_size == 1:
            return t
        return native.all_gather(t, dim, self.group)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        """Reduce t across ranks, then keep this rank's 1/world_size chunk along dim."""
        n = self.world_size
        if n == 1:
            return t
        if t.shape[dim] % n:
            raise ValueError(f"reduce_scatter: size {t.shape[dim]} along dim {dim} is not "
                             f"divisible by world size {n}")
        red = getattr(dist.ReduceOp, op.upper())
        if self.backend != "gloo":
            chunks = t.chunk(n, dim=dim)
            inp = torch.cat([c.reshape(-1) for c in chunks])  # rank-major, each chunk flat
            out = torch.empty(chunks[0].numel(), dtype=t.dtype, device=t.device)
            dist.reduce_scatter_tensor(out, inp, op=red, group=self.group)
            return out.view(chunks[0].shape)
        full = t.clone()
        dist.all_reduce(full, op=red, group=self.group)
        return full.chunk(n, dim=dim)[self.rank].contiguous()

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place from rank src; returns t."""
        if self.world_size == 1:
            return t
        dist.broadcast(t, src=src, group=self.group)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
