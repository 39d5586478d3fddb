"""The batch-1 GEMV (op "linear"'s Triton provider) against cuBLAS, shape by shape.

    python -m portaserve.bench.gemv [--sweep] [--models llama8b qwen7b ...] [--output-file F]

Each figure is one CUDA-graph replay over enough distinct weight copies (>= 3 GB) that no
weight is read from L2, divided by the launches: what a decode step's graph sees.  --sweep
also times every kernel configuration and reports the fastest beside the default one.
"""
from __future__ import annotations

import argparse
import itertools
import json

# (N, K) of the linear layers a batch-1 decode step runs, per model shape
MODELS = {
    "llama8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                "lm_head": (128256, 4096)},
    "llama8b_tp2": {"qkv": (3072, 4096), "o": (4096, 2048), "gate_up": (14336, 4096), "down": (4096, 7168),
                    "lm_head": (64128, 4096)},
    "qwen7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
               "lm_head": (152064, 3584)},
    "qwen0.5b": {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864),
                 "lm_head": (151936, 896)},
}
SWEEP = [c for c in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), (2, 4, 8), (1, 3))
         if 1024 <= c[0] * c[1] <= 16384]


def _graph_time(fn, reps: int = 20, repeats: int = 5) -> float:
    """Seconds per call of fn() (a sequence of launches), captured once, replayed."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    import torch
    import torch.nn.functional as F

    from portaserve.bench.one_batch import copy_bandwidth
    from portaserve.platforms.cuda import CudaPlatform
    from portaserve.platforms.triton_kernels import gemv as G

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama8b"], choices=sorted(MODELS))
    p.add_argument("--sweep", action="store_true", help="also time every configuration in SWEEP")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--output-file")
    a = p.parse_args(argv)
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    bw = copy_bandwidth(CudaPlatform())
    out = {"device": torch.cuda.get_device_name(), "copy_tb_s": bw / 1e12, "rows": []}
    print(f"{out['device']}: a device copy moves {bw / 1e12:.2f} TB/s")
    print(f"{'shape':<20} {'N':>7} {'K':>6} {'MB':>7} {'cuBLAS us':>10} {'gemv us':>8} {'TB/s':>11} "
          f"{'gemv/cuBLAS':>11}  best of sweep")
    for model in a.models:
        for name, (N, K) in MODELS[model].items():
            nbytes = N * K * dt.itemsize
            copies = max(2, -(-(3 << 30) // nbytes))
            ws = [torch.randn(N, K, dtype=dt, device="cuda") * K ** -0.5 for _ in range(copies)]
            x = torch.randn(1, K, dtype=dt, device="cuda")

            def run(f):
                return _graph_time(lambda: [f(w) for w in ws]) / copies

            t_blas = run(lambda w: F.linear(x, w))
            t_gemv = run(lambda w: G.gemv(x, w))
            err = (G.gemv(x, ws[0]).float() - F.linear(x.float(), ws[0].float())).abs().max().item()
            row = dict(model=model, shape=name, N=N, K=K, cublas_us=t_blas * 1e6, gemv_us=t_gemv * 1e6,
                       config=G.config(N, K), max_abs_err_vs_fp32=err)
            best = ""
            if a.sweep:
                timed = []
                for c in SWEEP:
                    try:
                        t = _graph_time(lambda: [G.gemv(x, w, cfg=c) for w in ws], reps=5, repeats=3)
                        timed.append((t / copies, c))
                    except Exception:  # out of registers / shared memory
                        pass
                t, c = min(timed)
                row.update(best_us=t * 1e6, best_config=c, sweep={str(c): t * 1e6 for t, c in timed})
                best = f"{t * 1e6:.1f} us {c}"
            out["rows"].append(row)
            print(f"{model + '.' + name:<20} {N:>7} {K:>6} {nbytes / 1e6:>7.1f} {t_blas * 1e6:>10.1f} "
                  f"{t_gemv * 1e6:>8.1f} {nbytes / t_blas / 1e12:>5.2f}/{nbytes / t_gemv / 1e12:<5.2f} "
                  f"{t_gemv / t_blas:>11.3f}  {best}", flush=True)
            del ws
            torch.cuda.empty_cache()
    if a.output_file:
        with open(a.output_file, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
