"""Quantized GEMM speed against bf16 on the linear layers of Llama-3.1-8B.

    python -m portaserve.bench.gemm                       # the current platform's device
    python -m portaserve.bench.gemm --device cpu --small  # a quick run with tiny shapes

For each layer shape (q|k|v 4096->6144, o 4096->4096, gate|up 4096->28672, down
14336->4096) and each batch size M (decode 1, 8, 32, 64; prefill 2048) it times y = x W^T
for: bf16 (F.linear), fp8 W8A8 (per-channel weight scales, dynamic per-token activation
scales, quantization of x included), int8 W8A8 (same), and int4 weight-only in the AWQ
layout (group 128).  Each quantized GEMM runs through the provider the op registry chose
for the platform (``--kernel OP=PROVIDER`` forces one), exactly as the model would call
it.  On CUDA the calls are captured in a CUDA graph and replayed, so the times are device
time without Python launch overhead (what a decode step under CUDA graphs sees).

Columns: time per call (us), TFLOP/s (2*M*N*K / time), GB/s (weight + activation bytes
moved / time) and the speedup over bf16 at the same shape.

When the INT4 provider is the Triton kernel, extra rows time its paths one by one
(on by default, ``--no-int4-paths`` to skip; kinds ``int4:fma`` (M = 1 GEMV),
``int4:dot`` (the decode split-K kernel with tl.dot, M <= 64), ``int4:general`` (the tiled
kernel) and ``int4:dequant`` (dequantize + vendor GEMM, M >= 32)) so that one run shows
which path wins at which M; the ``int4`` row is what the model runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from portaserve.bench import POS

SHAPES_8B = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
M_DEFAULT = [1, 8, 32, 64, 2048]
SHAPES_SMALL = [("qkv", 128, 192), ("o", 128, 128), ("gate_up", 128, 896), ("down", 448, 128)]
M_SMALL = [1, 8, 64]


def _inputs(K: int, N: int, device, group: int):
    from portaserve.core.ops import quant

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) / K ** 0.5)
    fp8_w, fp8_s = quant.quantize_weight_fp8_per_channel(w)
    int8_w, int8_s = quant.quantize_weight_int8_per_channel(w)
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (K // group, N), generator=g, dtype=torch.int32)
    s = torch.rand(K // group, N, generator=g) * 0.01
    d = lambda t: t.to(device)  # noqa: E731
    return {
        "bf16": (d(w.to(torch.bfloat16)),),
        "fp8": (d(fp8_w), d(fp8_s)),
        "int8": (d(int8_w), d(int8_s)),
        "int4": (d(quant.pack_cols(q, True)), d(s.to(torch.bfloat16)), d(quant.pack_cols(z, True))),
    }


def _weight_bytes(kind: str, K: int, N: int, group: int) -> int:
    return {"bf16": 2 * N * K, "fp8": N * K + 4 * N, "int8": N * K + 4 * N,
            "int4": N * K // 2 + (K // group) * N * 2 + (K // group) * N // 2}[kind]


def _time(fn, platform, device, iters: int) -> float:
    """Seconds per call."""
    for _ in range(3):
        fn()
    platform.synchronize()
    if device.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(iters):
                        fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph.replay()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                torch.cuda.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3 / iters)
            return best
        except Exception as e:  # a provider that cannot be captured: eager timing
            print(f"  (graph capture failed, timing eagerly: {e})", file=sys.stderr)
    best = float("inf")
    for _ in range(3):
        platform.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        platform.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def run(args) -> list:
    from portaserve.platforms import resolve_op_table, resolve_platform

    platform = resolve_platform(args.device)
    table = resolve_op_table(platform, args.kernel or [])
    device = platform.device()
    dtype = torch.bfloat16
    shapes = SHAPES_SMALL if args.small else SHAPES_8B
    ms = args.m or (M_SMALL if args.small else M_DEFAULT)
    group = 32 if args.small else 128
    fns = {k: table.fn(op) for k, op in (("fp8", "fp8_scaled_mm"), ("int8", "int8_scaled_mm"),
                                         ("int4", "int4_gemm"))}
    provs = {"bf16": "F.linear", "fp8": table.choices["fp8_scaled_mm"].provider,
             "int8": table.choices["int8_scaled_mm"].provider, "int4": table.choices["int4_gemm"].provider}
    print(f"platform {platform.name} ({platform.device_name()}), torch {torch.__version__}; "
          f"providers: " + ", ".join(f"{k}={v}" for k, v in provs.items()), flush=True)
    int4_paths = {}
    if args.int4_paths and provs["int4"] == "triton" and "int4" in args.kinds:
        from portaserve.platforms.triton_kernels import int4_gemm as tk

        int4_paths = {"int4:fma": "decode_fma", "int4:dot": "decode_dot", "int4:general": "general",
                      "int4:dequant": "dequant"}
        provs.update({k: "triton" for k in int4_paths})
    rows = []
    hdr = f"{'layer':<8}{'K->N':>13}{'M':>6}  {'kind':<13}{'provider':<10}{'us':>10}{'TFLOP/s':>9}{'GB/s':>8}{'x bf16':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, K, N in shapes:
        ins = _inputs(K, N, device, group)
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            calls = {
                "bf16": lambda: F.linear(x, ins["bf16"][0]),
                "fp8": lambda: fns["fp8"](x, ins["fp8"][0], ins["fp8"][1], None, dtype),
                "int8": lambda: fns["int8"](x, ins["int8"][0], ins["int8"][1], None, dtype),
                "int4": lambda: fns["int4"](x, ins["int4"][0], ins["int4"][1], ins["int4"][2], None, "awq"),
            }
            for kind, path in int4_paths.items():
                if path.startswith("decode") and not tk._decode_applies(
                        x, ins["int4"][0], ins["int4"][1], ins["int4"][2], None, "awq", path[7:]):
                    continue
                if path == "dequant" and M < 32:
                    continue
                calls[kind] = (lambda p: lambda: tk.int4_gemm(x, ins["int4"][0], ins["int4"][1],
                                                               ins["int4"][2], None, "awq", path=p))(path)
            base = None
            for kind in list(args.kinds) + [k for k in int4_paths if k in calls]:
                t = _time(calls[kind], platform, device, args.iters)
                flops = 2 * M * N * K / t / 1e12
                gbs = (_weight_bytes(kind.split(":")[0], K, N, group) + 2 * M * (K + N)) / t / 1e9
                base = t if kind == "bf16" else base
                ratio = base / t if base else float("nan")
                rows.append({"layer": name, "K": K, "N": N, "M": M, "kind": kind,
                             "provider": provs[kind], "us": t * 1e6, "tflops": flops, "gbps": gbs,
                             "speedup_vs_bf16": ratio})
                print(f"{name:<8}{f'{K}->{N}':>13}{M:>6}  {kind:<13}{provs[kind]:<10}{t * 1e6:>10.1f}"
                      f"{flops:>9.2f}{gbs:>8.0f}{ratio:>8.2f}", flush=True)
    notes = _kernel_notes(provs)
    for n in notes:
        print(n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"platform": platform.name, "device": platform.device_name(),
                       "torch": torch.__version__, "notes": notes, "rows": rows}, f, indent=1)
    return rows


def _kernel_notes(provs) -> list:
    """Which helper kernels actually ran (a Triton kernel that failed falls back loudly)."""
    notes = []
    if provs["fp8"] == "scaled_mm" or provs["int8"] == "int_mm":
        from portaserve.platforms.cuda import quant_ops

        notes.append(f"W8A8 activation quantizer: {quant_ops.quantizer_status()}")
    if provs["int4"] == "triton":
        from portaserve.platforms.triton_kernels import int4_gemm as tk

        notes.append("INT4 Triton kernels disabled after a failure: "
                     + (", ".join(f"{k} ({v})" for k, v in tk._disabled.items()) or "none"))
    return notes


def main(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    p.add_argument("--m", type=POS, action="append", help="batch sizes (repeatable)")
    p.add_argument("--kinds", nargs="+", default=["bf16", "fp8", "int8", "int4"],
                   choices=["bf16", "fp8", "int8", "int4"])
    p.add_argument("--iters", type=POS, default=20, help="calls per timing")
    p.add_argument("--kernel", action="append", help="OP=PROVIDER override")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--no-int4-paths", dest="int4_paths", action="store_false",
                   help="skip the per-path rows of the Triton INT4 kernel")
    args = p.parse_args(argv)
    if "bf16" in args.kinds:
        args.kinds = ["bf16"] + [k for k in args.kinds if k != "bf16"]
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
