"""Compile counts and step times of the TPU platform's engine path on whatever XLA device
PJRT gives (``PJRT_DEVICE=CPU PORTASERVE_XLA_ON_CPU=1`` on a host without a TPU: XLA's
CPU backend, which is *not* a TPU — its figures show graph counts and host overheads,
not TPU speed).

    PJRT_DEVICE=CPU PORTASERVE_XLA_ON_CPU=1 /tmp/xla-venv/bin/python -m portaserve.platforms.tpu.bench_xla

Phase 1 serves prompts of many different lengths (one at a time and in batches) and
reports how many XLA graphs were compiled.  Phase 2 times decode steps of a fixed batch
with every graph already compiled: (t(1 + n steps) - t(1 step)) / n.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _metrics():
    import torch_xla.debug.metrics as met

    ct = met.metric_data("CompileTime")
    ex = met.metric_data("ExecuteTime")
    return {"compiles": ct[0] if ct else 0, "compile_s": round(ct[1] / 1e9, 2) if ct else 0.0,
            "executions": ex[0] if ex else 0,
            "uncached_compile": met.counter_value("UncachedCompile") or 0}


def _delta(a, b):
    return {k: round(b[k] - a[k], 2) for k in a}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None, help="default: a tiny random llama (tests.conftest)")
    ap.add_argument("--lengths", type=int, default=24, help="distinct prompt lengths in phase 1")
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--overlap", action="store_true",
                    help="with the overlap scheduler (the platform's default; off here for comparable counts)")
    args = ap.parse_args(argv)

    from portaserve import Engine

    return _run(args, Engine)


def _run(args, Engine):
    path = args.model_path
    if path is None:
        from tests.conftest import make_tiny_checkpoint

        path = str(make_tiny_checkpoint(Path(tempfile.mkdtemp()), "llama3"))
    common = dict(skip_tokenizer_init=True, dtype="float32", max_total_tokens=4096,
                  context_length=args.context_length, disable_overlap_schedule=not args.overlap)
    out = {}
    with Engine(path, device="tpu", **common) as eng:
        m0 = _metrics()
        t0 = time.perf_counter()
        lens = [5 + (i * 37) % 150 for i in range(args.lengths)]
        sp = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
        for i, L in enumerate(lens):  # one at a time: extend batches of one request
            eng.generate(input_ids=[(j * 7 + i) % 500 + 3 for j in range(L)], sampling_params=sp)
        for k in range(0, len(lens), 6):  # batches of several requests of mixed lengths
            batch = [[(j * 11 + i) % 500 + 3 for j in range(L)] for i, L in enumerate(lens[k:k + 6])]
            eng.generate(input_ids=batch, sampling_params=sp)
        m1 = _metrics()
        out["phase1_mixed_lengths"] = {"prompt_lengths": len(set(lens)), "wall_s": round(time.perf_counter() - t0, 1),
                                       **_delta(m0, m1)}
        runner = eng.rt.scheduler.decode_graph
        out["decode_buckets_used"] = sorted(getattr(runner, "buckets_used", []))
        out["extend_buckets_used"] = sorted(getattr(runner, "extend_buckets_used", []))

        prompts = [[(j * 13 + i) % 500 + 3 for j in range(40 + 9 * i)] for i in range(args.decode_batch)]

        def run(n):
            eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "temperature": 0,
                                                             "ignore_eos": True})

        n = args.decode_steps
        run(1), run(1 + n), run(1), run(1 + n)  # compile everything these shapes need
        m2 = _metrics()
        t = time.perf_counter()
        run(1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        run(1 + n)
        tn = time.perf_counter() - t
        out["phase2_decode"] = {"batch": args.decode_batch, "steps": n, "prefill_plus_1_s": round(t1, 3),
                                "ms_per_decode_step": round((tn - t1) / n * 1e3, 2),
                                **_delta(m2, _metrics())}
        out["device"] = eng.rt.platform.device_name()
        out["overlap_schedule"] = eng.rt.scheduler.overlap
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
