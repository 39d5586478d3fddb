"""Programmatic dependent launch (PDL) for the decode step's kernels, on NVIDIA sm_90+.

A decode step at small batch is a chain of ~300 kernels, most of them a few microseconds
long, each waiting for the one before to drain.  With PDL a kernel is launched while its
predecessor still runs: it does what does not depend on it (the GEMV reads its first block
of weights), then ``gdc_wait`` blocks until the predecessor has finished and its writes
are visible.  Each kernel here calls ``gdc_launch_dependents`` at its start, so the next one
can be scheduled as soon as all of this one's programs are resident.

The rule every kernel launched this way keeps: nothing it reads that an earlier kernel may
write, and nothing it writes (the allocator may hand it memory an earlier kernel still
reads), before ``gdc_wait``.  Only weights are read before it.  Every such kernel waits
unconditionally, so "finished" is transitive along the chain.  A kernel without PDL (torch's,
cuBLAS's) never triggers, so the kernel after it starts as usual: correct in every mix.

On by default where supported, for kernels captured into CUDA graphs; ``PORTASERVE_PDL=0``
turns it off (A/B: ``python -m portaserve.bench.one_batch`` with and without it).
"""
from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)
_ON: dict = {}


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL: CUDA (not ROCm) on sm_90 or
    later, unless PORTASERVE_PDL=0, and only once a two-kernel PDL chain compiled, ran,
    and was captured into a CUDA graph and replayed correctly here (an older Triton, CUDA
    runtime or driver fails that; decode graphs are then captured without PDL, rather
    than not at all).  The CPU interpreter never is."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    if device not in _ON:
        if os.environ.get("PORTASERVE_PDL", "1") == "0" or torch.cuda.get_device_capability(device)[0] < 9:
            _ON[device] = False
        elif torch.cuda.is_current_stream_capturing():
            return False  # cannot check inside a capture: without PDL for now, decided later
        else:
            why = _probe(device)
            if why:
                logger.warning("programmatic dependent launch is off on %s: %s", device, why)
            _ON[device] = why is None
    return _ON[device]


@triton.jit
def _probe_kernel(x_ptr, y_ptr, PDL: tl.constexpr):
    start(PDL)
    wait(PDL)
    i = tl.arange(0, 128)
    tl.store(y_ptr + i, tl.load(x_ptr + i) + 1.0)


def _probe(device: torch.device) -> str | None:
    """None when y = x + 1 twice over, with PDL, runs right eagerly and from a CUDA graph;
    else the reason."""
    try:
        with torch.cuda.device(device):
            x = torch.arange(128, dtype=torch.float32, device=device)
            y, z = torch.empty_like(x), torch.empty_like(x)
            for _ in range(2):  # eagerly (compiles), then captured and replayed
                _probe_kernel[(1,)](x, y, **_WITH)
                _probe_kernel[(1,)](y, z, **_WITH)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _probe_kernel[(1,)](x, y, **_WITH)
                _probe_kernel[(1,)](y, z, **_WITH)
            x.add_(10.0)
            z.zero_()
            graph.replay()
            torch.cuda.synchronize(device)
            if not torch.equal(z, x + 2.0):
                return "a captured PDL chain computed the wrong result"
    except Exception as e:  # no launch_pdl / griddepcontrol in this Triton, CUDA or driver
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


_WITH = {"PDL": True, "launch_pdl": True}
_WITHOUT = {"PDL": False}


def launch(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch with a ``PDL: tl.constexpr`` parameter: PDL
    only while a CUDA graph is being captured (decode steps), where it was measured.  Eager
    steps (prompt passes, --disable-cuda-graph) are paced by the host, not by the drain
    between kernels; an eager A/B on an H200 was inconclusive (docs/BENCHMARKS.md, session
    17), so they launch as before."""
    if enabled(device) and torch.cuda.is_current_stream_capturing():
        return _WITH
    return _WITHOUT


@triton.jit
def start(PDL: tl.constexpr):
    """At a kernel's start: let the next kernel be scheduled (it waits for this one)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """Before the first read of anything an earlier kernel writes, and before any write."""
    if PDL:
        tl.extra.cuda.gdc_wait()
