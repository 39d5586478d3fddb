"""Provider registrations of every platform package, gathered in one place.

Registration is metadata only (op, provider, platforms, lazy target, requirement);
importing this module imports no vendor library.  Platform packages add their entries
here as their kernels land (Triton kernels shared by CUDA/ROCm/XPU, FlashInfer, aiter,
IPEX, Pallas).
"""
from __future__ import annotations

from portaserve.core.ops.registry import register_provider  # noqa: F401

# The CPU leg uses the native ops for now.  Accelerator providers are registered by the
# CUDA / ROCm / XPU / TPU work.
