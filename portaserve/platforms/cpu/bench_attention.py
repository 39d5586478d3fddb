"""Timing of the CPU ``sdpa`` attention providers against native, on paged batches of
serving-like shapes.  ``python -m portaserve.platforms.cpu.bench_attention [--threads N]``.
Prints min-of-repeats milliseconds per call and the max abs difference."""
from __future__ import annotations

import argparse
import math
import time

import torch

from portaserve.core.ops import native
from portaserve.platforms.cpu import attention as sdpa


def _paged(lens, Hk, D, dtype, g):
    S = sum(lens) + 1
    kc = torch.randn(S, Hk, D, generator=g).to(dtype)
    vc = torch.randn(S, Hk, D, generator=g).to(dtype)
    perm = torch.randperm(S - 1, generator=g) + 1
    r2t = torch.zeros(len(lens), max(lens) + 4, dtype=torch.int32)
    off = 0
    for i, t in enumerate(lens):
        r2t[i, :t] = perm[off:off + t].int()
        off += t
    return kc, vc, r2t


def _time(fn, reps, inner):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1e3


DECODE = [(1, 512), (1, 2048), (4, 512), (16, 512), (32, 1024), (64, 256)]  # (B, context)
EXTEND = [(1, 0, 256), (1, 512, 64), (4, 0, 128), (8, 256, 16), (16, 128, 4)]  # (B, prefix, new)
HEADS = [(9, 3, 64), (32, 8, 128)]  # SmolLM2-135M, Llama-3-8B


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for H, Hk, D in HEADS:
            sc = 1 / math.sqrt(D)
            for B, L in DECODE:
                lens = [max(1, L - 3 * i) for i in range(B)]
                kc, vc, r2t = _paged(lens, Hk, D, dtype, g)
                q = torch.randn(B, H, D, generator=g).to(dtype)
                args = (q, kc, vc, r2t, torch.arange(B), torch.tensor(lens), sc)
                a = _time(lambda: native.attention_decode(*args), ns.reps, 3)
                b = _time(lambda: sdpa.attention_decode(*args), ns.reps, 3)
                err = (native.attention_decode(*args).float() - sdpa.attention_decode(*args).float()).abs().max()
                print(f"decode {str(dtype)[6:]:8} H={H}/{Hk} D={D:3} B={B:3} ctx={L:5}: "
                      f"native {a:8.2f} ms  sdpa {b:8.2f} ms  x{a / b:5.2f}  err {err:.1e}")
            for B, P, E in EXTEND:
                kc, vc, r2t = _paged([P + E] * B, Hk, D, dtype, g)
                q = torch.randn(B * E, H, D, generator=g).to(dtype)
                args = (q, kc, vc, r2t, torch.arange(B), torch.full((B,), P), torch.full((B,), E), sc)
                a = _time(lambda: native.attention_extend(*args), ns.reps, 1)
                b = _time(lambda: sdpa.attention_extend(*args), ns.reps, 1)
                err = (native.attention_extend(*args).float() - sdpa.attention_extend(*args).float()).abs().max()
                print(f"extend {str(dtype)[6:]:8} H={H}/{Hk} D={D:3} B={B:3} prefix={P:4} new={E:4}: "
                      f"native {a:8.2f} ms  sdpa {b:8.2f} ms  x{a / b:5.2f}  err {err:.1e}")


if __name__ == "__main__":
    main()
