"""Google TPU platform through torch_xla.  Detected only when torch_xla is importable
*and* a TPU is present (a torch_xla install on a CPU host is not a TPU)."""
from __future__ import annotations

import glob
import importlib.util
import os

import torch

from portaserve.platforms.base import MemoryInfo, Platform


def _tpu_present() -> bool:
    # TPU VMs expose /dev/accel* (v4+) or vfio devices; PJRT_DEVICE=TPU is set by users
    # who know they are on one.  None of these initialise the runtime.
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or os.environ.get("PJRT_DEVICE") == "TPU"


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    dist_backend = "xla"
    supports_graphs = True  # XLA compiles whole graphs
    supported_dtypes = (torch.bfloat16, torch.float32)

    @classmethod
    def unavailable_reason(cls):
        if importlib.util.find_spec("torch_xla") is None:
            return "torch_xla is not installed (pip install portaserve[tpu])"
        if not _tpu_present():
            return "torch_xla is installed but no TPU device is present"
        return None

    def device(self, index: int = 0) -> torch.device:
        import torch_xla.core.xla_model as xm

        return xm.xla_device()

    def memory_info(self, index: int = 0) -> MemoryInfo:
        import torch_xla.core.xla_model as xm

        m = xm.get_memory_info(self.device())
        total = m.get("bytes_limit", m.get("kb_total", 0) * 1024)
        used = m.get("bytes_used", total - m.get("kb_free", 0) * 1024)
        return MemoryInfo(total - used, total)

    def provider_priority(self, op_family: str) -> list[str]:
        return ["pallas", "native"]
