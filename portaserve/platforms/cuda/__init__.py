"""NVIDIA CUDA platform: the shared Triton kernels, CUDA graphs for decode, NCCL.
ROCm reuses everything that goes through torch's cuda API (see platforms/rocm)."""
from __future__ import annotations

import torch

from portaserve.platforms.base import MemoryInfo, Platform


class CudaPlatform(Platform):
    name = "cuda"
    profiler_activities = ("cpu", "cuda")
    device_type = "cuda"
    dist_backend = "nccl"
    supports_graphs = True
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)

    @classmethod
    def unavailable_reason(cls):
        if getattr(torch.version, "hip", None):
            return "this torch is a ROCm build (use the rocm platform)"
        if getattr(torch.version, "cuda", None) is None:
            return "this torch build has no CUDA support"
        if not torch.cuda.is_available():
            return "no CUDA device visible (torch.cuda.is_available() is False)"
        return None

    def bind_device(self, local_rank: int) -> None:
        super().bind_device(local_rank)
        torch.cuda.set_device(local_rank)

    def memory_info(self, index: int | None = None) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self.local_rank if index is None else index)
        return MemoryInfo(free, total)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def decode_graph_runner(self, model, kv, req_pool, max_bs: int, compiled=None, cascade=False):
        from portaserve.platforms.cuda.graph_runner import CudaGraphRunner

        runner = CudaGraphRunner(model, kv, req_pool, max_bs, self.device(), compiled, cascade)
        try:
            runner.capture()
        except Exception as e:  # e.g. an op provider that syncs with the host
            import logging

            logging.getLogger(__name__).warning("CUDA graph capture failed, running eagerly: %s", e)
            return None
        return runner

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.local_rank)

    def provider_priority(self, op_family: str) -> list[str]:
        return ["flashinfer", "triton", "native"]

    def op_priority(self, op: str) -> list[str] | None:
        # measured on an H200, Llama-3.1-8B shape, bf16 (docs/BENCHMARKS.md, session 5): the
        # Triton split-KV kernel replayed in CUDA graphs decodes 3-9% faster than FlashInfer's
        # (which also plans on the host every step); FlashInfer prefills faster (extend stays
        # FlashInfer).  --attention-backend flashinfer runs both through FlashInfer.
        if op == "attention_decode" and self.name == "cuda":  # not subclasses (ROCm, plugins)
            return ["triton", "flashinfer", "native"]
        return None
