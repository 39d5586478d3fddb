"""Tensor-parallel state: which rank this process is, how many there are, and the
collectives the model graph needs.

Model code asks ``tp_rank()`` / ``tp_size()`` when it builds its layers and calls
``all_reduce`` / ``all_gather`` in forward.  The runtime sets the state once, after
joining the process group with the platform's communicator (platforms/communicator.py);
until then the state is the single-process one and the collectives are the identity.
The collectives are registry ops (family "collective"), so a platform can bring its
own all-reduce kernel; the native implementation is torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class TPState:
    rank: int = 0
    size: int = 1
    group: Optional[Any] = None  # torch.distributed group for the model's collectives


_state = TPState()


def set_tp(rank: int, size: int, group=None) -> None:
    global _state
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} out of range for size {size}")
    _state = TPState(rank, size, group)


def reset_tp() -> None:
    set_tp(0, 1, None)


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def tp_group():
    return _state.group


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {d}")
    return n // d
