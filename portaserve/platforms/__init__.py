"""Platform detection.

``resolve_platform(explicit)`` picks the platform once:
  1. an explicit name (``--device`` or ``PORTASERVE_DEVICE``) wins, and fails loudly with
     the platform's own reason when it cannot run here;
  2. otherwise side-effect-free probes run in a fixed order: plugins, TPU, ROCm, CUDA, XPU,
     then CPU (always available).
Plugins register a Platform subclass under the ``portaserve.platforms`` entry-point group.
"""
from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

from portaserve.platforms.base import MemoryInfo, Platform, PlatformUnavailable

logger = logging.getLogger(__name__)

# Built-in platforms, in probe order.
_BUILTIN = {
    "tpu": "portaserve.platforms.tpu:TpuPlatform",
    "rocm": "portaserve.platforms.rocm:RocmPlatform",
    "cuda": "portaserve.platforms.cuda:CudaPlatform",
    "xpu": "portaserve.platforms.xpu:XpuPlatform",
    "cpu": "portaserve.platforms.cpu:CpuPlatform",
}

_current: Platform | None = None


def _load(target: str) -> type[Platform]:
    mod, attr = target.split(":")
    import importlib

    return getattr(importlib.import_module(mod), attr)


def _plugins() -> dict[str, object]:
    try:
        eps = entry_points(group="portaserve.platforms")
    except TypeError:  # pragma: no cover - python < 3.10 API
        eps = entry_points().get("portaserve.platforms", [])
    return {ep.name: ep for ep in eps}


def platform_classes() -> dict[str, type[Platform]]:
    """All known platforms (plugins first, in probe order), name -> class."""
    out: dict[str, type[Platform]] = {}
    for name, ep in _plugins().items():
        try:
            out[name] = ep.load()
        except Exception as e:  # a broken plugin must not break startup
            logger.warning("platform plugin %r failed to load: %s", name, e)
    for name, target in _BUILTIN.items():
        out.setdefault(name, _load(target))
    return out


def probe_all() -> dict[str, str | None]:
    """name -> None if usable here, else the reason it is not."""
    res = {}
    for name, cls in platform_classes().items():
        try:
            res[name] = cls.unavailable_reason()
        except Exception as e:
            res[name] = f"probe raised {type(e).__name__}: {e}"
    return res


def resolve_platform(explicit: str | None = None) -> Platform:
    # "auto" (every CLI's default) and no name both leave the choice to PORTASERVE_DEVICE
    named_by = "--device {}"
    if not explicit or explicit.lower() == "auto":
        explicit, named_by = os.environ.get("PORTASERVE_DEVICE") or "auto", "PORTASERVE_DEVICE={}"
    explicit = explicit.lower()
    classes = platform_classes()
    if explicit != "auto":
        if explicit not in classes:
            raise PlatformUnavailable(
                f"unknown device {explicit!r}; known: auto, {', '.join(classes)}"
            )
        reason = classes[explicit].unavailable_reason()
        if reason is not None:
            raise PlatformUnavailable(f"{named_by.format(explicit)} cannot be used here: {reason}")
        return classes[explicit]()
    for name, cls in classes.items():
        try:
            if cls.unavailable_reason() is None:
                return cls()
        except Exception as e:
            logger.debug("probe of %s raised %s", name, e)
    raise PlatformUnavailable("no platform available (the CPU platform should always be)")


def current_platform() -> Platform:
    """The platform chosen for this process (resolved lazily, once)."""
    global _current
    if _current is None:
        _current = resolve_platform(None)
    return _current


def set_current_platform(p: Platform) -> None:
    global _current
    _current = p


__all__ = [
    "MemoryInfo",
    "Platform",
    "PlatformUnavailable",
    "current_platform",
    "platform_classes",
    "probe_all",
    "resolve_platform",
    "set_current_platform",
]


def resolve_op_table(platform: Platform, kernel_overrides=None, model: dict | None = None):
    """Register every platform's providers (metadata only) and resolve the op table
    (for a model {"dtype", "kv_dtype", "head_dim"} when given)."""
    from portaserve.core import ops
    from portaserve.platforms import providers  # noqa: F401  (registers on import)

    return ops.resolve_ops(platform, ops.parse_kernel_overrides(kernel_overrides)
                           if isinstance(kernel_overrides, (list, tuple)) else kernel_overrides, model)
