"""The Triton attention kernels' launch (attention.Launch: rows and keys per block, warps,
stages, heads per program, a register cap) and, over an fp8 cache, the dtype of the dots (bfloat16 or
float16: attention.FP8_DOTS_IN_F16), timed per cache dtype on shapes of the offline
benchmark (Llama-3.1-8B: 32 query / 8 KV heads x 128).

- decode: one layer's call with a running offline batch's lengths (prompt in [1, 4096] plus
  a uniform share of an output in [1, 2048]), longest first as the scheduler orders it;
  KV bytes per second against a device copy's.
- extend: one 8,192-token prompt pass (four prompts of the random dataset's lengths, no
  cached prefix), and one 4,096-token chunk over a 4,096-token prefix; causal TFLOP/s.

Each variant's output is checked against the native op on the same (upcast) cache.

    python3 ci/gpu/attention_sweep.py [--batch 64 150 256]
"""
from __future__ import annotations

import argparse
import time

import torch

FP8 = torch.float8_e4m3fn


def _time(fn, reps):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _show(cfg) -> str:
    """A Launch's fields that differ from the defaults."""
    return " ".join(f"{k}={v}" for k, v in cfg._asdict().items() if v != type(cfg)._field_defaults[k]) or "default"


def _variants(dtype, table, match=None):
    """(launch, float16 dots) to time for a cache dtype: over fp8, float16 dots, and the
    first launch with bfloat16 dots too; with match, those whose label it finds."""
    import re

    if dtype == torch.bfloat16:
        out = [(cfg, False) for cfg in table]
    else:
        out = [(table[0], False)] + [(cfg, True) for cfg in table]
    return [v for v in out if not match or re.search(match, _label(dtype, *v))]


def _label(dtype, cfg, f16) -> str:
    return f"{str(dtype)[6:]} {_show(cfg)} f16={f16:d}"


class _Grab:
    """Wraps a Triton kernel: keeps the compiled kernel of its last launch (registers,
    spills, and its TTGIR/PTX for --asm-dir)."""

    def __init__(self, ta, name):
        self.ta, self.name, self.orig, self.last = ta, name, getattr(ta, name), None
        setattr(ta, name, self)

    def __getitem__(self, grid):
        def launch(*a, **kw):
            self.last = self.orig[grid](*a, **kw)
            return self.last
        return launch

    def info(self, asm_dir, label) -> str:
        ck = self.last
        if ck is None:
            return ""
        if asm_dir:
            import os
            import re

            os.makedirs(asm_dir, exist_ok=True)
            base = os.path.join(asm_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.name}-{label}"))
            for kind in ("ttgir", "ptx"):
                if kind in ck.asm:
                    with open(f"{base}.{kind}", "w") as f:
                        f.write(ck.asm[kind])
        return f"  regs {getattr(ck, 'n_regs', '?')} spills {getattr(ck, 'n_spills', '?')}"


def _sweep(ns, ta, table, dtype, configs, esize, fn, reps, error, rate, grab, asm_dir) -> None:
    """Time fn under each launch variant (ta.<table>[esize] and ta.FP8_DOTS_IN_F16 set for
    the call), print its time, rate(t), error(output) against native and registers, then
    the fastest; the module's settings are restored after."""
    launches = getattr(ta, table)
    saved = launches[esize], ta.FP8_DOTS_IN_F16
    best = None
    try:
        for cfg, f16 in _variants(dtype, configs, ns.match):
            launches[esize], ta.FP8_DOTS_IN_F16 = cfg, f16
            label = _label(dtype, cfg, f16)
            try:
                o = fn()
                t = _time(fn, reps)
            except Exception as e:  # a launch that does not fit (shared memory)
                print(f"  {label}: failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            print(f"  {label:>72}: {t * 1e3:7.3f} ms {rate(t)}  max|diff| {error(o):.1e}{grab.info(asm_dir, label)}")
            if best is None or t < best[0]:
                best = (t, label)
    finally:
        launches[esize], ta.FP8_DOTS_IN_F16 = saved
    if best is not None:
        print(f"  best: {best[1]} {best[0] * 1e3:.3f} ms")


def decode(ns, bw, ta, native, dev):
    H, Hk, D = 32, 8, 128
    grab = _Grab(ta, "_decode_stage1")
    L = ta.Launch
    configs = [L(), L(block_n=128, warps=4, stages=2), L(warps=4, stages=4), L(block_n=32, warps=4, stages=3),
               L(warps=8, stages=3), L(block_n=128, warps=8, stages=2), L(warps=4, stages=2), L(warps=4, stages=1),
               L(block_n=128, warps=4, stages=1), L(maxnreg=128), L(block_n=128, warps=4, stages=2, maxnreg=128),
               L(maxnreg=96), L(block_n=32, warps=4, stages=3, maxnreg=96), L(stages=4, maxnreg=128),
               L(stages=5, maxnreg=128), L(block_n=128, warps=8, stages=2, maxnreg=128),
               L(block_n=128, warps=8, stages=3, maxnreg=128), L(block_n=32, stages=5, maxnreg=128)]
    for B in ns.batch:
        g = torch.Generator().manual_seed(ns.seed + B)
        inp = torch.randint(1, 4097, (B,), generator=g)
        out = torch.randint(1, 2049, (B,), generator=g)
        lens = (inp + (torch.rand(B, generator=g) * out).long()).sort(descending=True).values
        total = int(lens.sum())
        starts = torch.zeros(B, dtype=torch.long)
        perm = torch.randperm(B, generator=g)
        starts[perm] = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lens[perm][:-1]]), 0) + 1
        r2t = torch.zeros(B, int(lens.max()), dtype=torch.int32)
        for i in range(B):
            r2t[i, :lens[i]] = torch.arange(int(starts[i]), int(starts[i] + lens[i]), dtype=torch.int32)
        r2t, rows, sl = r2t.to(dev), torch.arange(B, device=dev), lens.to(dev)
        q = torch.randn(B, H, D, generator=g).to(torch.bfloat16).to(dev)
        kf = torch.randn(total + 1, Hk, D, dtype=torch.bfloat16, device=dev)
        vf = torch.randn(total + 1, Hk, D, dtype=torch.bfloat16, device=dev)
        print(f"decode batch {B}: {total} cached tokens (mean {total / B:.0f}, max {int(lens.max())}), "
              f"splits {ta._num_splits(B, Hk, dev)}")
        for dtype in (torch.bfloat16, FP8):
            k, v = (kf, vf) if dtype == torch.bfloat16 else (kf.to(dtype), vf.to(dtype))
            nbytes = total * Hk * D * 2 * k.element_size() + total * 4
            n = min(B, 8)
            ref = native.attention_decode(q[:n].float(), k.float(), v.float(), r2t[:n], rows[:n], sl[:n], D ** -0.5)
            asm = ns.asm_dir if B == ns.batch[-1] else None
            _sweep(ns, ta, "DECODE_LAUNCH", dtype, configs, k.element_size(),
                   lambda: ta.attention_decode(q, k, v, r2t, rows, sl, D ** -0.5), ns.reps,
                   lambda o: (o[:n].float() - ref).abs().max().item(),
                   lambda t: f"{nbytes / t / 1e12:5.2f} TB/s ({nbytes / t / bw:4.0%} of copy)", grab, asm)
        del kf, vf


def extend(ns, ta, native, dev):
    H, Hk, D = 32, 8, 128
    grab = _Grab(ta, "_extend_kernel")
    L = ta.Launch
    configs = [L(block_n=32), L(block_n=32, grouped=True), L(128, 128, 8, 2, grouped=True),
               L(128, 64, 8, 2, grouped=True), L(64, 64, 4, 3, grouped=True), L(128, 128, 8, 3, grouped=True),
               L(128, 128, 8, 2), L(64, 64, 4, 2, grouped=True)]
    cases = {"4 prompts, no prefix": ([0, 0, 0, 0], [3000, 1500, 2500, 1192]),
             "1 chunk after 4,096": ([4096], [4096])}
    g = torch.Generator().manual_seed(ns.seed)
    for name, (prefix, ext) in cases.items():
        B = len(ext)
        lens = [p + e for p, e in zip(prefix, ext)]
        total = sum(lens)
        r2t = torch.zeros(B, max(lens), dtype=torch.int32)
        off = 1
        for i, n in enumerate(lens):
            r2t[i, :n] = torch.arange(off, off + n, dtype=torch.int32)
            off += n
        r2t, rows = r2t.to(dev), torch.arange(B, device=dev)
        pl, el = torch.tensor(prefix, device=dev), torch.tensor(ext, device=dev)
        T = sum(ext)
        q = torch.randn(T, H, D, generator=g).to(torch.bfloat16).to(dev)
        kf = torch.randn(total + 1, Hk, D, dtype=torch.bfloat16, device=dev)
        vf = torch.randn(total + 1, Hk, D, dtype=torch.bfloat16, device=dev)
        # causal score + value products: each query row sees prefix + its position + 1 keys
        flops = sum(4 * H * D * (e * p + e * (e + 1) / 2) for p, e in zip(prefix, ext))
        print(f"extend, {name}: {T} tokens, {flops / 1e12:.2f} TFLOP")
        for dtype in (torch.bfloat16, FP8):
            k, v = (kf, vf) if dtype == torch.bfloat16 else (kf.to(dtype), vf.to(dtype))
            # the last request's last 64 rows against native (float, on the upcast cache)
            ref = native.attention_extend(q[-64:].float(), k.float(), v.float(), r2t[-1:], rows[:1],
                                          pl[-1:] + el[-1:] - 64, torch.tensor([64], device=dev), D ** -0.5)
            _sweep(ns, ta, "EXTEND_LAUNCH", dtype, configs, k.element_size(),
                   lambda: ta.attention_extend(q, k, v, r2t, rows, pl, el, D ** -0.5, max(ext)),
                   max(3, ns.reps // 4), lambda o: (o[-64:].float() - ref).abs().max().item(),
                   lambda t: f"{flops / t / 1e12:6.1f} TFLOP/s", grab, None)
        del kf, vf


def main() -> None:
    from portaserve.bench.one_batch import copy_bandwidth
    from portaserve.core.ops import native
    from portaserve.platforms.cuda import CudaPlatform
    from portaserve.platforms.triton_kernels import attention as ta

    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[64, 150, 256])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["decode", "extend"], default=None)
    p.add_argument("--match", default=None,
                   help="only the variants whose label (dtype, launch, f16=0|1) this finds")
    p.add_argument("--asm-dir", default=None, help="write the decode kernel's TTGIR and PTX per variant here")
    ns = p.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(CudaPlatform())
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    if ns.only != "extend":
        decode(ns, bw, ta, native, dev)
    if ns.only != "decode":
        extend(ns, ta, native, dev)


if __name__ == "__main__":
    main()
