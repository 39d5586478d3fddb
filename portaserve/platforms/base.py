"""The Platform interface.

A Platform describes one kind of accelerator (or the CPU): which torch device string it
uses, which collective backend, how to ask it for free memory, and in which order the op
registry should try providers for each op family.  Subclasses live in one package per
platform (``platforms/cuda`` ...); nothing outside ``platforms/`` asks vendor questions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MemoryInfo:
    free_bytes: int
    total_bytes: int


class PlatformUnavailable(RuntimeError):
    """Raised when an explicitly requested platform cannot be used, with the reason."""


class Platform:
    name: str = "base"
    device_type: str = "cpu"  # torch device string
    dist_backend: str = "gloo"
    supports_graphs: bool = False
    supported_dtypes: tuple = (torch.float32,)
    # torch.inference_mode for forward passes (XLA wants plain no_grad)
    inference_mode: bool = True
    # host->device copies from page-locked memory, asynchronously (needs a CUDA/HIP/XPU
    # runtime; XLA has none)
    pin_memory: bool = True
    # launch decode step N+1 before reading N's tokens (asynchronous devices only)
    overlap_schedule: bool = True
    lazy_tensors: bool = False  # device values exist once read or synced (XLA)
    # torch.profiler activities (/start_profile); XLA has its own profiler
    profiler_activities: tuple = ("cpu",)
    # torch.compile backend for --enable-torch-compile (None: the platform compiles whole
    # graphs already, e.g. XLA)
    compile_backend: str | None = "inductor"
    # Default fraction of device memory the KV pool plus weights may take.
    default_mem_fraction_static: float = 0.88

    # ---- detection -----------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this platform can run here; otherwise a human-readable reason.

        Probes must be side-effect free: no device initialisation beyond what answering
        needs, and never a decision taken from a build flag alone.
        """
        raise NotImplementedError

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    # which local device this process drives (its rank's index on the node under tensor
    # parallelism); set once by bind_device
    local_rank: int = 0

    def bind_device(self, local_rank: int) -> None:
        """Make device ``local_rank`` of this node the process's device."""
        self.local_rank = local_rank

    # ---- runtime queries -------------------------------------------------------------
    def device(self, index: int | None = None) -> torch.device:
        index = self.local_rank if index is None else index
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        raise NotImplementedError

    def rng_device(self) -> torch.device:
        """Where sampling generators live (the device itself unless it has none)."""
        return self.device()

    def default_dtype(self) -> torch.dtype:
        return self.supported_dtypes[0]

    def provider_priority(self, op_family: str) -> list[str]:
        """Provider names to try for an op family, best first.  'native' is appended
        by the registry if missing."""
        return []

    def op_priority(self, op: str) -> list[str] | None:
        """An op's own order where it differs from its family's (measured), else None."""
        return None

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        """Hand cached, unused device memory back to the driver."""

    def decode_graph_runner(self, model, kv, req_pool, max_bs: int, compiled=None, cascade=False):
        """A captured-graph runner for decode batches, or None where graphs don't apply.
        It has can_run(fb) and replay(fb) -> logits.  compiled: a CompiledDecode whose
        function the runner captures for the batch sizes it covers.  cascade: decode
        batches may carry cascade-attention tiles (ForwardBatch.shared)."""
        return None

    def describe(self) -> dict:
        return {
            "platform": self.name,
            "device": str(self.device()),
            "device_name": self.device_name(),
            "torch": torch.__version__,
            "dist_backend": self.dist_backend,
        }

    def device_name(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Platform {self.name}>"
