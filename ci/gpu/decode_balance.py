"""Decode attention with the lengths of a running offline batch (random dataset: prompt in
[1, 4096], output in [1, 2048], each request somewhere in its output): how the order of the
requests in the batch and the order of the launch grid move the time of one layer's call.

With one KV split per request (batch x KV heads >= 4 programs per SM), each program reads a
whole sequence; a long one dispatched late runs alone at the end.  Variants: the batch in
arrival order or longest first (as the scheduler orders it since session 18), and the
split count.  Prints ms per call and the KV bytes per second against a device copy's.
(Session 18's first run also compared stage 1's grid (batch, heads) with (heads, batch),
the kernel's grid since: docs/BENCHMARKS.md.)

    python3 ci/gpu/decode_balance.py [--batch 64 150 256]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from portaserve.bench.one_batch import copy_bandwidth
    from portaserve.core.ops import native
    from portaserve.platforms.cuda import CudaPlatform
    from portaserve.platforms.triton_kernels import attention as ta

    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64, 150, 256])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(CudaPlatform())
    H, Hk, D, dt = 32, 8, 128, torch.bfloat16
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s; heads {H}/{Hk}x{D} bf16")
    real_splits = ta._num_splits
    try:
        for B in ns.batch:
            g = torch.Generator().manual_seed(ns.seed + B)
            inp = torch.randint(1, 4097, (B,), generator=g)
            out = torch.randint(1, 2049, (B,), generator=g)
            lens = inp + (torch.rand(B, generator=g) * out).long()
            total = int(lens.sum())
            ctx = int(lens.max())
            # each request's slots one contiguous run, the runs in shuffled order
            starts = torch.zeros(B, dtype=torch.long)
            perm = torch.randperm(B, generator=g)
            starts[perm] = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lens[perm][:-1]]), 0) + 1
            r2t = torch.zeros(B, ctx, dtype=torch.int32)
            for i in range(B):
                r2t[i, :lens[i]] = torch.arange(int(starts[i]), int(starts[i] + lens[i]), dtype=torch.int32)
            k = torch.randn(total + 1, Hk, D, dtype=dt, device=dev)
            v = torch.randn(total + 1, Hk, D, dtype=dt, device=dev)
            q = torch.randn(B, H, D, generator=g).to(dt).to(dev)
            r2t_d = r2t.to(dev)
            nbytes = total * Hk * D * 2 * 2 + total * 4
            ref = native.attention_decode(q[:4].float(), k.float(), v.float(), r2t_d[:4], torch.arange(4, device=dev),
                                          lens[:4].to(dev), D ** -0.5).cpu() if B >= 4 else None
            print(f"batch {B}: {total} cached tokens (mean {total / B:.0f}, max {ctx}), KV {nbytes / 1e9:.2f} GB "
                  f"per layer call; auto splits {real_splits(B, Hk, dev)}")
            desc = torch.argsort(lens, descending=True, stable=True)
            results = {}
            for order in ("arrival", "longest first"):
                idx = torch.arange(B) if order == "arrival" else desc
                rows = idx.to(dev)  # request i of the batch reads table row idx[i]
                sl = lens[idx].to(dev)
                qq = q[rows]
                for mult in (1, 2, 4):
                    s_auto = real_splits(B, Hk, dev)
                    s = min(ta.NUM_KV_SPLITS, s_auto * mult)
                    if mult > 1 and s == s_auto:
                        continue
                    ta._num_splits = lambda b, hk, d, s=s: s
                    fn = lambda: ta.attention_decode(qq, k, v, r2t_d, rows, sl, D ** -0.5)  # noqa: E731
                    o = fn()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(ns.reps):
                        fn()
                    torch.cuda.synchronize()
                    t = (time.perf_counter() - t0) / ns.reps
                    back = torch.empty_like(o)
                    back[idx.to(dev)] = o
                    results[(order, s)] = t
                    err = ""
                    if ref is not None:
                        err = f"  max|diff| vs native {(back[:4].float().cpu() - ref).abs().max():.2e}"
                    print(f"  {order:>13}  splits {s:>2}: {t * 1e3:7.3f} ms  {nbytes / t / 1e12:5.2f} TB/s "
                          f"({nbytes / t / bw:4.0%} of copy){err}")
            base = results[("arrival", real_splits(B, Hk, dev))]
            best = min(results, key=results.get)
            print(f"  best: {best} {results[best] * 1e3:.3f} ms = {results[best] / base:.3f}x of arrival order")
            del k, v
    finally:
        ta._num_splits = real_splits


if __name__ == "__main__":
    main()
