"""Intel XPU platform (torch.xpu)."""
from __future__ import annotations

import torch

from portaserve.platforms.base import MemoryInfo, Platform


class XpuPlatform(Platform):
    name = "xpu"
    profiler_activities = ("cpu", "xpu")
    device_type = "xpu"
    dist_backend = "xccl"
    supports_graphs = False
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)

    @classmethod
    def unavailable_reason(cls):
        xpu = getattr(torch, "xpu", None)
        if xpu is None:
            return "this torch build has no torch.xpu"
        try:
            if not xpu.is_available():
                return "no Intel XPU device visible (torch.xpu.is_available() is False)"
        except Exception as e:  # pragma: no cover - driver errors
            return f"torch.xpu probe failed: {e}"
        return None

    def bind_device(self, local_rank: int) -> None:
        super().bind_device(local_rank)
        torch.xpu.set_device(local_rank)

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        index = self.local_rank if index is None else index
        props = torch.xpu.get_device_properties(index)
        total = props.total_memory
        return MemoryInfo(total - torch.xpu.memory_reserved(index), total)

    def synchronize(self) -> None:
        torch.xpu.synchronize()

    def device_name(self) -> str:
        return torch.xpu.get_device_name(self.local_rank)

    def provider_priority(self, op_family: str) -> list[str]:
        return ["ipex", "triton", "native"]
