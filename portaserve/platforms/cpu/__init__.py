"""CPU platform: always available; gloo collectives; native ops plus CPU providers.

Beyond the native ops it offers:
* ``sdpa`` attention providers (``platforms/cpu/attention.py``): one batched call of torch's
  fused CPU SDPA kernel per step instead of per-request work;
* a report of the CPU's vector ISA (AVX2 / AVX512 / AVX512-BF16 / AMX) and whether bf16
  runs natively, shown by ``portaserve env`` (the default dtype is not changed by it);
* thread settings: torch's intra-op threads follow OMP_NUM_THREADS when it is set, else
  the CPUs this process may actually use (affinity mask and cgroup quota), which torch's
  own default (all physical cores of the host) overshoots inside containers.
"""
from __future__ import annotations

import logging
import math
import os
import platform as _pyplatform

import torch

from portaserve.platforms.base import MemoryInfo, Platform

logger = logging.getLogger(__name__)


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


# ---- ISA and bf16 ------------------------------------------------------------------------
def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags") or line.startswith("Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_capability() -> str:
    """torch's dispatch level for this CPU: 'DEFAULT', 'AVX2', 'AVX512', 'ZVECTOR', ..."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def bf16_support(flags: set[str] | None = None) -> tuple[bool, str]:
    """(native bf16 arithmetic?, explanation).  AVX512-BF16 or AMX-BF16 on x86, the BF16
    extension on Arm; elsewhere bf16 works but is emulated through fp32 conversions."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return True, "AMX-BF16 tiles"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    if "bf16" in flags:  # aarch64 (FEAT_BF16)
        return True, "Arm BF16"
    return False, "no AVX512-BF16/AMX: bf16 is converted through fp32"


# ---- threads -----------------------------------------------------------------------------
def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2/v1 quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, p = f.read().split()[:2]
            if q != "max":
                quota = int(q) / int(p)
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                p = int(f.read())
            if q > 0 and p > 0:
                quota = q / p
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def thread_count(env=None) -> tuple[int, str]:
    """(intra-op threads, where the number came from)."""
    env = os.environ if env is None else env
    for var in ("PORTASERVE_CPU_THREADS", "OMP_NUM_THREADS"):
        v = env.get(var, "").strip()
        if v:
            try:
                n = int(v.split(",")[0])
                if n > 0:
                    return n, var
            except ValueError:
                logger.warning("ignoring %s=%r (not a positive integer)", var, v)
    return usable_cpus(), "usable CPUs (affinity / cgroup quota)"


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    supports_graphs = False
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    # The host's RAM is shared with everything else on it: take a modest share.
    default_mem_fraction_static = 0.25
    pin_memory = False
    overlap_schedule = False  # the CPU runs synchronously: nothing for the host to overlap with

    def __init__(self, configure_threads: bool = True):
        self.threads, self.threads_from = thread_count()
        if configure_threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    @classmethod
    def unavailable_reason(cls):
        return None

    def memory_info(self, index: int = 0) -> MemoryInfo:
        return _meminfo()

    def provider_priority(self, op_family: str) -> list[str]:
        if op_family == "attention":
            return ["sdpa", "native"]
        return ["native"]

    def device_name(self) -> str:
        return _pyplatform.processor() or _pyplatform.machine()

    def describe(self) -> dict:
        d = super().describe()
        ok, why = bf16_support()
        d.update({
            "cpu_capability": cpu_capability(),
            "bf16_native": ok,
            "bf16_note": why,
            "threads": torch.get_num_threads(),
            "threads_from": self.threads_from,
        })
        return d
