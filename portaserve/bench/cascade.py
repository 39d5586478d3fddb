"""Decode attention over shared prefixes: the plain paged kernel against cascade attention
(ops.attention_decode_shared), one layer of a batch in which groups of requests share a
cached prefix (as through the radix cache), with the KV bytes each must read at least.

    python -m portaserve.bench.cascade --device cuda --groups 16 --members 16 \\
        --prefix-len 2048 --own-len 384
"""
from __future__ import annotations

import argparse
import sys

import torch

from portaserve.bench import POS
from portaserve.bench.sampling import _time


def main(argv=None, prog=None) -> int:
    from portaserve.core import shared_prefix as sp
    from portaserve.core.ops import native
    from portaserve.core.ops.registry import providers_for
    import portaserve.platforms.providers  # noqa: F401  (registers the providers)
    from portaserve.platforms import resolve_platform

    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.cascade", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--groups", type=POS, nargs="+", default=[1, 16, 64])
    p.add_argument("--members", type=POS, default=16, help="requests per group")
    p.add_argument("--prefix-len", type=POS, default=2048)
    p.add_argument("--own-len", type=POS, default=384, help="tokens after the prefix, per request")
    p.add_argument("--heads", type=POS, default=32)
    p.add_argument("--kv-heads", type=POS, default=8)
    p.add_argument("--head-dim", type=POS, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=POS, default=50)
    p.add_argument("--profile", action="store_true", help="device time per kernel of the cascade call")
    p.add_argument("--sweep", action="store_true",
                   help="also time the Triton shared-prefix kernel's launch alternatives (splits, "
                        "block, warps, stages) and print the fastest")
    ns = p.parse_args(argv)
    if ns.members < 2:
        p.error("--members: a group needs at least 2 requests to share its prefix")
    plat = resolve_platform(None if ns.device == "auto" else ns.device)
    dev = plat.device()
    dtype = getattr(torch, ns.dtype)
    impls = {}
    for op in ("attention_decode", "attention_decode_shared"):
        prov = [q for q in providers_for(op) if q.name != "native" and q.check(plat.name) is None]
        impls[op] = prov[0].load() if prov else getattr(native, op)
    H, Hk, D = ns.heads, ns.kv_heads, ns.head_dim
    print(f"{plat.name} ({plat.device_name()}), heads {H}/{Hk}x{D} {ns.dtype}, prefix {ns.prefix_len}, "
          f"own {ns.own_len}, {ns.members} requests per group; one layer")
    print(f"{'groups':>6} {'batch':>5} {'plain ms':>9} {'cascade ms':>10} {'speed-up':>8} "
          f"{'plain GB/s':>10} {'cascade GB/s':>12} {'max abs diff':>12}")
    g = torch.Generator().manual_seed(0)
    for groups in ns.groups:
        B = groups * ns.members
        lists, slot = [], 1
        for _ in range(groups):
            pre = list(range(slot, slot + ns.prefix_len))
            slot += ns.prefix_len
            for _ in range(ns.members):
                lists.append(pre + list(range(slot, slot + ns.own_len)))
                slot += ns.own_len
        k = torch.randn(slot, Hk, D, generator=g).to(dtype).to(dev)
        v = torch.randn(slot, Hk, D, generator=g).to(dtype).to(dev)
        width = ns.prefix_len + ns.own_len
        r2t = torch.tensor(lists, dtype=torch.int32).to(dev)
        rows = torch.arange(B, device=dev)
        seq = torch.full((B,), width, device=dev)
        meta = sp.unpack(sp.build(lists, list(range(B))), B)
        meta = sp.SharedPrefix(*(t.to(dev) for t in (meta.kv_start, meta.tile_rows, meta.tile_lens,
                                                   meta.tile_members)))
        q = torch.randn(B, H, D, generator=g).to(dtype).to(dev)
        scale = D ** -0.5

        def plain():
            return impls["attention_decode"](q, k, v, r2t, rows, seq, scale)

        def cascade():
            return impls["attention_decode_shared"](q, k, v, r2t, rows, seq, scale, meta.kv_start,
                                                    meta.tile_rows, meta.tile_lens, meta.tile_members)

        diff = (plain().float() - cascade().float()).abs().max().item()
        tp, tc = _time(plain, plat.synchronize, ns.reps), _time(cascade, plat.synchronize, ns.reps)
        per_tok = Hk * D * 2 * k.element_size()  # K and V
        plain_bytes = B * width * per_tok
        unique = (groups * ns.prefix_len + B * ns.own_len) * per_tok  # each slot read once
        print(f"{groups:>6} {B:>5} {tp * 1e3:>9.3f} {tc * 1e3:>10.3f} {tp / tc:>7.2f}x "
              f"{plain_bytes / tp / 1e9:>10.0f} {unique / tc / 1e9:>12.0f} {diff:>12.2e}", flush=True)
        if ns.profile:
            _profile({"plain": plain, "cascade": cascade}, plat, ns.reps)
        if ns.sweep:
            _sweep(cascade, plat, ns.reps, unique)
    print("GB/s: plain counts every request's whole KV; cascade counts each slot once (the least "
          "any kernel must read)")
    return 0


def _profile(fns, plat, reps):
    from torch.profiler import ProfilerActivity, profile

    for label, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            plat.synchronize()
        per = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            if t and e.key.startswith("_"):
                per[e.key] = t / reps
        print(f"    {label}: " + ", ".join(f"{k} {v:.1f} us" for k, v in sorted(per.items(), key=lambda kv: -kv[1])),
              flush=True)


def _sweep(cascade, plat, reps, unique):
    import itertools

    from portaserve.platforms.triton_kernels import attention as ta

    keys = ("PREFIX_SPLITS", "PREFIX_BLOCK_N", "PREFIX_WARPS", "PREFIX_STAGES")
    saved = {k: getattr(ta, k) for k in keys}
    times = []
    for combo in itertools.product((4, 8, 16), (32, 64, 128), (4, 8), (1, 2, 3)):
        for k, v in zip(keys, combo):
            setattr(ta, k, v)
        try:
            t = _time(cascade, plat.synchronize, reps)
        except Exception as e:  # e.g. out of shared memory at this block size
            print(f"    {combo}: {type(e).__name__}")
            continue
        times.append((t, combo))
    for k, v in saved.items():
        setattr(ta, k, v)
    times.sort()
    for t, combo in times[:5]:
        print(f"    splits {combo[0]:>2} block_n {combo[1]:>3} warps {combo[2]} stages {combo[3]}: "
              f"{t * 1e3:.3f} ms ({unique / t / 1e9:.0f} GB/s)")
    default = next(t for t, c in times if c == tuple(saved[k] for k in keys))
    print(f"    default {tuple(saved[k] for k in keys)}: {default * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    sys.exit(main())
