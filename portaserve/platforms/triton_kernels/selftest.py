"""Start-up checks of the Triton providers: before the registry chooses a kernel, it is
compiled on the accelerator and compared with its reference on a few inputs.  A check
returns None when the kernel agrees, else the reason (the registry then chooses the next
provider and says why)."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def accel_device() -> Optional[torch.device]:
    """The accelerator the kernels would run on; None on a CPU-only host (nothing to check)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu", xpu.current_device())
    return None


def once(cache: dict, key, dev: torch.device, what: str, check: Callable[[], Optional[str]]) -> Optional[str]:
    """check()'s verdict, computed once per key (device, dtypes, shape) and process; an
    exception is a kernel that does not compile or run here, and its reason."""
    if key not in cache:
        try:
            cache[key] = check()
        except Exception as e:  # noqa: BLE001 - the reason goes to the registry
            cache[key] = f"{what} failed on {dev}: {type(e).__name__}: {e}"
    return cache[key]
