"""AMD ROCm platform.  HIP builds of torch expose the torch.cuda API, so memory queries,
synchronisation and HIP graphs are inherited from the CUDA platform; what differs is the
detection and the provider order (AMD's aiter first when installed)."""
from __future__ import annotations

import torch

from portaserve.platforms.cuda import CudaPlatform


class RocmPlatform(CudaPlatform):
    name = "rocm"
    device_type = "cuda"  # HIP devices are addressed as "cuda" in torch
    dist_backend = "nccl"  # RCCL behind torch.distributed's nccl backend

    @classmethod
    def unavailable_reason(cls):
        if not getattr(torch.version, "hip", None):
            return "this torch build is not a ROCm (HIP) build"
        if not torch.cuda.is_available():
            return "no ROCm device visible"
        return None

    def provider_priority(self, op_family: str) -> list[str]:
        return ["aiter", "triton", "native"]

    def op_priority(self, op: str) -> list[str] | None:
        return None  # CUDA's per-op order is a FlashInfer/Triton measurement
