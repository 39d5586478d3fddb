"""CPU platform: always available; gloo collectives; native ops plus CPU providers."""
from __future__ import annotations

import os
import platform as _pyplatform

import torch

from portaserve.platforms.base import MemoryInfo, Platform


def _meminfo() -> MemoryInfo:
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                fields[k] = int(v.split()[0]) * 1024
        return MemoryInfo(fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return MemoryInfo(free, total)


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    supports_graphs = False
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    # The host's RAM is shared with everything else on it: take a modest share.
    default_mem_fraction_static = 0.25

    @classmethod
    def unavailable_reason(cls):
        return None

    def memory_info(self, index: int = 0) -> MemoryInfo:
        return _meminfo()

    def provider_priority(self, op_family: str) -> list[str]:
        return ["native"]

    def device_name(self) -> str:
        return _pyplatform.processor() or _pyplatform.machine()
