"""Latency of one static batch (like SGLang's bench_one_batch): prefill of batch_size
prompts of input_len tokens, then output_len decode steps, timed step by step through the
real scheduler (batch building, forward, sampling, bookkeeping).

    python -m portaserve.bench.one_batch --model-path CONFIG_DIR --load-format dummy \
        --batch-size 1 --input-len 128 --output-len 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from portaserve.bench import NONNEG, POS, at_least, out_file


def run(rt, batch_size: int, input_len: int, output_len: int, seed: int = 0, shared_len: int = 0) -> dict:
    """shared_len: the prompts' first shared_len tokens are the same (a system prompt:
    with the radix cache it is computed once, and decode reads it through cascade
    attention where that is on)."""
    from portaserve.core.request_builder import build_req

    sched = _driver(rt)
    sync = rt.platform.synchronize
    rng = np.random.default_rng(seed)
    vocab = rt.model_config.vocab_size
    shared = rng.integers(100, vocab - 1, min(shared_len, input_len)).tolist()
    reqs = [build_req(rt.limits(), None, None, shared + rng.integers(100, vocab - 1, input_len - len(shared)).tolist(),
                      {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True})
            for _ in range(batch_size)]
    for r in reqs:
        sched.add_request(r)
    sync()
    t0 = time.perf_counter()
    steps = 0
    while any(len(r.output_ids) == 0 for r in reqs):  # prefill (may take several chunks)
        sched.step()
        steps += 1
    # until the first tokens are on the host (reading them waited for the pass); with
    # overlapped prompt passes the first decode step is queued by then: not counted
    prefill = time.perf_counter() - t0
    sync()
    decode = []
    # No device sync per step: with the overlap scheduler a step launches N+1 and then
    # reads N, so the wall time between steps is the pipeline's period.
    while sched.has_work():
        t = time.perf_counter()
        sched.step()
        decode.append(time.perf_counter() - t)
    sync()
    assert all(len(r.output_ids) == output_len for r in reqs)
    decode = [d for d in decode if d > 0] or decode
    sched.flush_cache()
    med = statistics.median(decode) if decode else float("nan")
    return {"batch_size": batch_size, "input_len": input_len, "output_len": output_len, "shared_len": len(shared),
            "prefill_s": prefill, "prefill_tok_s": batch_size * input_len / prefill,
            "decode_median_ms": med * 1e3, "decode_mean_ms": statistics.fmean(decode) * 1e3 if decode else None,
            "decode_tok_s": batch_size / med if decode else None}


def _driver(rt):
    """The scheduler, driven so that tensor-parallel ranks step with rank 0."""
    from portaserve.tp import Driver

    if getattr(rt, "_driver", None) is None:
        rt._driver = Driver(rt)
    return rt._driver


def main(argv=None, prog=None) -> int:
    from portaserve.runtime import build_runtime
    from portaserve.server_args import ServerArgs

    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.one_batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=POS, nargs="+", default=[1])
    p.add_argument("--input-len", type=POS, nargs="+", default=[128])
    p.add_argument("--output-len", type=at_least(2), default=32)
    p.add_argument("--shared-prefix-len", type=NONNEG, default=0,
                   help="the first N input tokens are the same in every prompt (a shared system prompt)")
    p.add_argument("--warmup", type=NONNEG, default=1)
    p.add_argument("--output-file", default=None, type=out_file)
    p.add_argument("--profile", action="store_true", help="profile decode steps of the largest batch")
    p.add_argument("--compare-hf", action="store_true",
                   help="then time transformers generate on the same config and batch shapes")
    ServerArgs.add_cli_args(p)
    ns = p.parse_args(argv)
    args = ServerArgs.from_cli(ns)
    args.skip_tokenizer_init = True
    args.max_running_requests = max(args.max_running_requests, max(ns.batch_size))
    rt = build_runtime(args)
    print(rt.startup_report(), file=sys.stderr)
    for _ in range(ns.warmup):
        run(rt, min(ns.batch_size), 16, 4)
    rows = []
    for bs in ns.batch_size:
        for il in ns.input_len:
            r = run(rt, bs, il, ns.output_len, shared_len=ns.shared_prefix_len)
            rows.append(r)
            shared = f" shared={r['shared_len']}" if r["shared_len"] else ""
            print(f"bs={bs:<4} in={il:<5}{shared} out={ns.output_len:<4} prefill {r['prefill_s'] * 1e3:9.2f} ms "
                  f"({r['prefill_tok_s']:9.0f} tok/s)  decode step median {r['decode_median_ms']:8.3f} ms "
                  f"({r['decode_tok_s']:9.1f} tok/s)", flush=True)
    if ns.profile:
        profile_decode(rt, max(ns.batch_size), min(ns.input_len), 8, ns.shared_prefix_len)
    device = rt.platform.describe()
    # for the physical limit: a decode step reads every weight once (per rank), all but
    # the input embedding's rows it does not look up (unless the LM head shares them)
    device["weight_bytes"] = max(rt.rank_weight_bytes or [rt.weight_bytes])
    if not rt.model_config.tie_word_embeddings:
        device["weight_bytes"] -= sum(p.numel() * p.element_size() for p in rt.model.embed_tokens.parameters())
    device["copy_bytes_per_s"] = copy_bandwidth(rt.platform)
    if rt.tp is not None:
        print(f"{time.strftime('%T')} stopping the tensor-parallel ranks", file=sys.stderr, flush=True)
    _driver(rt).shutdown()
    if ns.compare_hf:
        cfg_path, dtype, dev = rt.source.path, rt.dtype, rt.platform.device()
        del rt
        import gc

        import torch

        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        for r in rows:
            h = hf_generate(cfg_path, dtype, dev, r["batch_size"], r["input_len"], ns.output_len,
                            ns.load_format == "dummy")
            r["hf_decode_ms_per_step"] = h
            print(f"bs={r['batch_size']:<4} in={r['input_len']:<5} transformers generate: "
                  f"{h:8.3f} ms per decode step -> portaserve {h / r['decode_median_ms']:.2f}x faster",
                  flush=True)
    if ns.output_file:
        with open(ns.output_file, "w") as f:
            json.dump({"device": device, "results": rows}, f, indent=2)
    return 0


def copy_bandwidth(platform, nbytes: int = 1 << 30, reps: int = 20):
    """Device memory bandwidth as a large copy measures it (bytes read + written per
    second), the floor a weight-reading decode step is held against; None on the CPU."""
    import torch

    dev = platform.device()
    if dev.type == "cpu" or platform.lazy_tensors:  # XLA: lazy copies are not timed this way
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    platform.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    platform.synchronize()
    bw = 2 * nbytes * reps / (time.perf_counter() - t0)
    del src, dst
    return bw


def profile_decode(rt, bs, input_len, steps, shared_len=0):
    """Top kernels of a few decode steps (torch profiler), to see where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from portaserve.core.request_builder import build_req

    sched = _driver(rt)
    rng = np.random.default_rng(1)
    shared = rng.integers(100, 1000, min(shared_len, input_len)).tolist()
    for _ in range(bs):
        sched.add_request(build_req(rt.limits(), None, None,
                                    shared + rng.integers(100, 1000, input_len - len(shared)).tolist(),
                                    {"max_new_tokens": steps + 4, "temperature": 0, "ignore_eos": True}))
    while sched.prefilling:
        sched.step()
    sched.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.platform.device_type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            sched.step()
        rt.platform.synchronize()
    wall = (time.perf_counter() - t0) / steps
    while sched.has_work():
        sched.step()
    sched.flush_cache()
    key = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))
    if len(acts) > 1:  # device time per step by kind of kernel, against the step's wall time
        kinds: dict = {}
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if not us or not str(getattr(e, "device_type", "")).endswith("CUDA"):
                continue
            n = e.key.lower()
            kind = ("gemm" if any(t in n for t in ("gemm", "gemv", "cutlass", "matmul", "sm90", "nvjet",
                                                   "triton_tem_", "int4", "scaled_mm"))
                    else "attention" if "attn" in n or "attention" in n or "_decode_stage" in n
                    or "_extend_kernel" in n
                    else "memcpy/memset" if "memcpy" in n or "memset" in n else "other")
            kinds[kind] = kinds.get(kind, 0.0) + us / 1e3 / steps
        total = sum(kinds.values())
        print(f"per decode step (bs={bs}): wall {wall * 1e3:.3f} ms (profiled), device kernels "
              f"{total:.3f} ms = " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))


_HF_CACHE = {}


def hf_generate(path, dtype, device, bs, input_len, output_len, random_weights) -> float:
    """transformers generate's time per decode step: (time(output_len) - time(1)) / (output_len - 1)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    key = str(path)
    model = _HF_CACHE.get(key)
    if model is None:
        if random_weights:
            cfg = AutoConfig.from_pretrained(str(path))
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
        elif str(path).endswith(".gguf"):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         torch_dtype=dtype).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype).to(device)
        _HF_CACHE[key] = model.eval()
    ids = torch.randint(100, model.config.vocab_size - 1, (bs, input_len), device=device)

    def timed(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)
    return (timed(output_len) - timed(1)) / (output_len - 1) * 1e3


if __name__ == "__main__":
    sys.exit(main())
