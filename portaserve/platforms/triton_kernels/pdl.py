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

import os

import torch
import triton
import triton.language as tl

_ON: dict = {}


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL: CUDA (not ROCm) on sm_90 or
    later, unless PORTASERVE_PDL=0.  The CPU interpreter never is."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    if device not in _ON:
        _ON[device] = (os.environ.get("PORTASERVE_PDL", "1") != "0"
                       and torch.cuda.get_device_capability(device)[0] >= 9)
    return _ON[device]


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
