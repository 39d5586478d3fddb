"""Google TPU platform through torch_xla.  Detected only when torch_xla is importable
*and* a TPU is present (a torch_xla install on a CPU host is not a TPU).

Testing without a TPU: ``PORTASERVE_XLA_ON_CPU=1 PJRT_DEVICE=CPU`` makes this platform
usable on XLA's CPU backend (torch_xla's reference attention instead of Pallas), so the
whole TPU path — lazy tensors, padded decode buckets, ragged paged attention — runs here.
See ``ci/run-suite tpu-on-cpu``.
"""
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


def _xla_on_cpu() -> bool:
    return os.environ.get("PORTASERVE_XLA_ON_CPU") == "1" and os.environ.get("PJRT_DEVICE") == "CPU"


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    dist_backend = "xla"
    inference_mode = False  # torch_xla cannot version-count inference tensors: no_grad
    pin_memory = False  # torch pins only through a GPU runtime; XLA transfers need none
    # the host builds step N+1 (and launches its graphs) before reading step N's ids;
    # reading them then waits for N only (Scheduler.lazy_device)
    overlap_schedule = True
    lazy_tensors = True
    supports_graphs = True  # XLA compiles whole graphs; decode batches use padded buckets
    supported_dtypes = (torch.bfloat16, torch.float32)

    @classmethod
    def unavailable_reason(cls):
        if importlib.util.find_spec("torch_xla") is None:
            return "torch_xla is not installed (pip install portaserve[tpu])"
        if not _tpu_present() and not _xla_on_cpu():
            return "torch_xla is installed but no TPU device is present"
        return None

    def device(self, index: int = 0) -> torch.device:
        import torch_xla

        return torch_xla.device(index) if index else torch_xla.device()

    def memory_info(self, index: int = 0) -> MemoryInfo:
        import torch_xla.core.xla_model as xm

        try:
            m = xm.get_memory_info(self.device(index))
        except Exception:  # XLA's CPU backend reports no memory: use the host's
            from portaserve.platforms.cpu import _meminfo

            return _meminfo()
        total = m.get("bytes_limit", m.get("kb_total", 0) * 1024)
        used = m.get("bytes_used", total - m.get("kb_free", 0) * 1024)
        return MemoryInfo(total - used, total)

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()

    compile_backend = None  # XLA traces and compiles every forward already

    def decode_graph_runner(self, model, kv, req_pool, max_bs: int, compiled=None, cascade=False):
        from portaserve.platforms.tpu.runner import XlaDecodeRunner

        return XlaDecodeRunner(model, kv, req_pool, max_bs, self.device())

    def device_name(self) -> str:
        try:
            import torch_xla.runtime as xr

            return f"{xr.device_type()} (torch_xla)"
        except Exception:
            return "tpu"

    def provider_priority(self, op_family: str) -> list[str]:
        return ["pallas", "native"]

    def rng_device(self) -> torch.device:
        return torch.device("cpu")  # torch.Generator has no XLA implementation
