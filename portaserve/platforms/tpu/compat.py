"""Work-arounds for core behaviour that does not hold on XLA hosts yet.

``unpinned_host_copies()``: core's scheduler and sampler pin host tensors before copying
them to a non-CPU device (``t.pin_memory().to(dev, non_blocking=True)``).  torch can only
pin memory through a CUDA/XPU/... accelerator runtime, so on a TPU VM (and under
``PJRT_DEVICE=CPU``) ``pin_memory()`` raises ("Found no NVIDIA driver ...") and the
engine's scheduler dies at its first decode step.  Pinning buys nothing for XLA's
host->device transfers, so within this context ``Tensor.pin_memory`` returns the tensor
itself (and ``pin_memory=True`` factories are not touched: they are only used on the
overlap path).  The TPU tests and ``bench_xla`` use it; the proper fix is in core (ask the
platform whether pinning is supported), after which this goes away.
"""
from __future__ import annotations

import contextlib

import torch


def pinning_works() -> bool:
    try:
        torch.empty(1).pin_memory()
        return True
    except RuntimeError:
        return False


@contextlib.contextmanager
def unpinned_host_copies():
    if pinning_works():
        yield
        return
    orig = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = orig
