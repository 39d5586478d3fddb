"""Host -> device copies of small scheduler tensors (batch metadata, sampling params,
grammar masks).  Where the platform can pin host memory the copy is made from pinned
memory and asynchronous, so it queues behind the running forward pass instead of
waiting for it; elsewhere (XLA) it is a plain copy."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device, pin: bool) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cpu" or t.device == device:
        return t
    if pin:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
