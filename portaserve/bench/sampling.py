"""Top-k/top-p/min-p sampling: every provider of the op against the native one (sort +
cumulative sum) on the same probabilities and noise, per batch size, with the share of
rows on which they agree.

    python -m portaserve.bench.sampling --device cuda --vocab 128256 --batch-size 1 16 128
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from portaserve.bench import NONNEG, POS, fraction, positive


def _time(fn, sync, reps):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def _top_p(s: str) -> float:
    v = fraction(s)
    if v == 0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v

def main(argv=None, prog=None) -> int:
    from portaserve.core.ops import native
    from portaserve.core.ops.registry import providers_for
    import portaserve.platforms.providers  # noqa: F401  (registers the providers)
    from portaserve.platforms import resolve_platform

    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.sampling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--vocab", type=POS, default=128256)
    p.add_argument("--batch-size", type=POS, nargs="+", default=[1, 16, 128])
    p.add_argument("--top-k", type=NONNEG, default=50)
    p.add_argument("--top-p", type=_top_p, default=0.9)
    p.add_argument("--min-p", type=fraction, default=0.0)
    p.add_argument("--temperature", type=positive, default=3.0, help="scale of the random logits")
    p.add_argument("--reps", type=POS, default=20)
    ns = p.parse_args(argv)
    plat = resolve_platform(None if ns.device == "auto" else ns.device)
    dev = plat.device()
    impls = {"native": native.top_k_top_p_min_p_sample}
    for prov in providers_for("top_k_top_p_min_p_sample"):
        if prov.name != "native" and prov.check(plat.name) is None:
            impls[prov.name] = prov.load()
    print(f"{plat.name} ({plat.device_name()}), vocab {ns.vocab}, top_k {ns.top_k}, top_p {ns.top_p}, "
          f"min_p {ns.min_p}, torch {torch.__version__}")
    g = torch.Generator(device="cpu").manual_seed(0)
    for bs in ns.batch_size:
        logits = (torch.randn(bs, ns.vocab, generator=g) * ns.temperature).to(dev)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty(bs, ns.vocab).exponential_(generator=g).to(dev)
        k = torch.full((bs,), ns.top_k, dtype=torch.int64, device=dev)
        tp = torch.full((bs,), ns.top_p, device=dev)
        mp = torch.full((bs,), ns.min_p, device=dev)
        ref = impls["native"](probs, k, tp, mp, noise)
        row = []
        for name, fn in impls.items():
            dt = _time(lambda: fn(probs, k, tp, mp, noise), plat.synchronize, ns.reps)
            same = (fn(probs, k, tp, mp, noise) == ref).float().mean().item()
            row.append(f"{name} {dt * 1e3:8.3f} ms (agrees {same:.0%})")
        print(f"bs={bs:<4} " + "  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
