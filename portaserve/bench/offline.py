"""Offline throughput of the in-process Engine, optionally side by side with Hugging
Face transformers ``generate`` (batched, left-padded) on the same weights and prompts.

    python -m portaserve.bench.offline --dataset mixed --compare-hf
    python -m portaserve.bench.offline --dataset generated-shared-prefix --compare-hf \
        --compare-no-cache
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import threading
import time

import torch

from portaserve.bench import NONNEG, POS, at_least, fraction, out_file
from portaserve.bench.datasets import (BenchRequest, random_dataset, shared_prefix_dataset,
                                       uniform_dataset)
from portaserve.core.scheduler import POLICIES


class StepTimer:
    """Wall time of the scheduler's steps by kind: extend (prefill) passes, decode steps
    (with the overlap scheduler a decode step's time is mostly waiting for the previous
    one on the device) and steps that only read back a launched decode ("resolve")."""

    def __init__(self, sched):
        self.sched, self.step = sched, sched.step
        self.seconds: dict = {}
        self.count: dict = {}
        self.decode_rows = 0
        self.decode_times: list = []
        sched.step = self

    def __call__(self):
        t = time.perf_counter()
        out = self.step()
        dt = time.perf_counter() - t
        st = self.sched.last_step
        mode = st.mode if st.mode != "idle" else "resolve"
        self.seconds[mode] = self.seconds.get(mode, 0.0) + dt
        self.count[mode] = self.count.get(mode, 0) + 1
        if mode == "decode":
            self.decode_rows += st.batch_size
            self.decode_times.append(dt)
        return out

    def remove(self) -> dict:
        del self.sched.step  # the bound method again
        d = {f"{m}_seconds": round(v, 3) for m, v in self.seconds.items()}
        d.update({f"{m}_steps": n for m, n in self.count.items()})
        if self.count.get("decode"):
            d["mean_decode_batch"] = round(self.decode_rows / self.count["decode"], 1)
        return d


def run_engine(engine, reqs: list[BenchRequest], profile: dict = None) -> dict:
    """profile: Engine.start_profile options, to profile this run (its first num_steps)."""
    sps = [{"max_new_tokens": r.output_len, "temperature": 0, "ignore_eos": True} for r in reqs]
    timer = StepTimer(engine.rt.scheduler) if engine.rt.tp is None else None
    starter, late = None, []
    if profile is not None:
        earlier = engine.rt.profiler.last
        profile = dict(profile)
        after = profile.pop("after", 0)
        if after:  # from another thread, through the engine's inbox like any command
            def start_late():
                try:
                    engine.start_profile(**profile)
                except Exception as e:  # noqa: BLE001 - reported after the run
                    late.append(e)

            starter = threading.Timer(after, start_late)
            starter.daemon = True  # a failed run exits without waiting for it
            starter.start()
        else:
            engine.start_profile(**profile)
    t0 = time.perf_counter()
    try:
        outs = engine.generate(input_ids=[r.input_ids for r in reqs], sampling_params=sps)
    finally:
        if starter is not None:
            starter.cancel()
            starter.join()  # one that fired has finished starting
    dt = time.perf_counter() - t0
    prof = None
    if profile is not None:  # stopped by num_steps already, or now
        from portaserve.profiler import ProfileError

        try:
            prof = engine.stop_profile()
        except ProfileError:
            prof = engine.rt.profiler.last
        if prof is earlier or (prof is not None and not prof["steps"]):
            # not written (its stop logged why), or started as the run ended
            why = f": the window did not start: {late[0]}" if late else ""
            print(f"profile: none written for this run{why}", file=sys.stderr)
            prof = None
    steps = timer.remove() if timer is not None else {}
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert out_tokens == sum(r.output_len for r in reqs)
    cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    prompt = sum(len(r.input_ids) for r in reqs)
    return {"seconds": dt, "output_tokens": out_tokens, "output_tok_s": out_tokens / dt,
            "total_tok_s": (out_tokens + prompt) / dt, "cache_hit_rate": cached / prompt,
            "steps": steps, "outputs": [o["output_ids"] for o in outs],
            **({"profile": {k: prof[k] for k in ("trace", "summary_file", "steps")}} if prof else {})}


@torch.inference_mode()
def run_hf(model, reqs: list[BenchRequest], pad_id: int, batch_size: int) -> dict:
    """transformers generate, batched with left padding; a batch runs until its longest
    request is done, and only each request's own output tokens are counted."""
    t0 = time.perf_counter()
    outputs = []
    for s in range(0, len(reqs), batch_size):
        chunk = reqs[s:s + batch_size]
        L = max(len(r.input_ids) for r in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, L - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[i, L - len(r.input_ids):] = 1
        n = max(r.output_len for r in chunk)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad_id)
        for i, r in enumerate(chunk):
            outputs.append(gen[i, L:L + r.output_len].tolist())
    dt = time.perf_counter() - t0
    out_tokens = sum(r.output_len for r in reqs)
    prompt = sum(len(r.input_ids) for r in reqs)
    return {"seconds": dt, "output_tokens": out_tokens, "output_tok_s": out_tokens / dt,
            "total_tok_s": (out_tokens + prompt) / dt, "outputs": outputs}


def make_dataset(ns, vocab: int) -> list[BenchRequest]:
    if ns.dataset == "mixed":
        return uniform_dataset(ns.num_prompts, (ns.min_input_len, ns.max_input_len),
                               (ns.min_output_len, ns.max_output_len), vocab, ns.seed)
    if ns.dataset == "random":
        return random_dataset(ns.num_prompts, ns.random_input_len, ns.random_output_len,
                              ns.random_range_ratio, vocab, ns.seed)
    return shared_prefix_dataset(ns.gsp_num_groups, ns.gsp_prompts_per_group, ns.gsp_system_prompt_len,
                                 ns.gsp_question_len, ns.gsp_output_len, vocab, ns.seed)


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["mixed", "random", "generated-shared-prefix"], default="mixed")
    p.add_argument("--num-prompts", type=POS, default=32)
    p.add_argument("--min-input-len", type=POS, default=20)
    p.add_argument("--max-input-len", type=POS, default=400)
    p.add_argument("--min-output-len", type=POS, default=8)
    p.add_argument("--max-output-len", type=POS, default=128)
    p.add_argument("--random-input-len", type=POS, default=1024)
    p.add_argument("--random-output-len", type=POS, default=1024)
    p.add_argument("--random-range-ratio", type=fraction, default=0.0)
    p.add_argument("--gsp-num-groups", type=POS, default=8)
    p.add_argument("--gsp-prompts-per-group", type=POS, default=8)
    p.add_argument("--gsp-system-prompt-len", type=POS, default=512)
    p.add_argument("--gsp-question-len", type=POS, default=32)
    p.add_argument("--gsp-output-len", type=POS, default=32)
    p.add_argument("--seed", type=int, default=0)


def check_dataset_args(p: argparse.ArgumentParser, ns) -> None:
    """Errors argparse cannot see: ranges given backwards."""
    for kind in ("input", "output"):
        lo, hi = getattr(ns, f"min_{kind}_len"), getattr(ns, f"max_{kind}_len")
        if lo > hi:
            p.error(f"--min-{kind}-len ({lo}) is greater than --max-{kind}-len ({hi})")


def add_args(p: argparse.ArgumentParser) -> None:
    add_dataset_args(p)
    p.add_argument("--model-path", default=None, help="local folder or .gguf file, or a Hugging Face repo id")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hugging Face repo id")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3", "fp8_e5m2"],
                   help="KV cache storage (as `serve --kv-cache-dtype`)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--max-total-tokens", type=POS, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=8192)
    p.add_argument("--max-running-requests", type=POS, default=256)
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--tp-size", "--tp", dest="tp_size", type=POS, default=1)
    p.add_argument("--enable-torch-compile", action="store_true")
    p.add_argument("--enable-mixed-chunk", action="store_true")
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument("--disable-overlap-prefill", action="store_true")
    p.add_argument("--compare-overlap-prefill-off", action="store_true",
                   help="also run with --disable-overlap-prefill")
    p.add_argument("--compare-mixed-chunk", action="store_true",
                   help="also run with --enable-mixed-chunk flipped")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers generate")
    p.add_argument("--hf-batch-size", type=POS, default=None, help="default: all prompts in one batch")
    p.add_argument("--compare-no-cache", action="store_true", help="also run with --disable-radix-cache")
    p.add_argument("--cascade-attention", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--schedule-policy", default="fcfs", choices=POLICIES)
    p.add_argument("--compare-schedule-policy", default=None, metavar="NAME",
                   choices=POLICIES, help="also run with --schedule-policy NAME (side by side, same prompts)")
    p.add_argument("--compare-cascade-off", action="store_true", help="also run with --cascade-attention off")
    p.add_argument("--attention-backend", default=None, help="flashinfer, triton, ... (default: the platform's)")
    p.add_argument("--compare-attention-backend", default=None, metavar="NAME",
                   help="also run with --attention-backend NAME (side by side, same prompts)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over each timed run; prints device time per step kind")
    p.add_argument("--profile-steps", type=POS, default=None, help="profile only the first N steps")
    p.add_argument("--profile-after", type=at_least(0.0, float), default=0.0, metavar="SECONDS",
                   help="start the profile this many seconds into the timed run (with --profile-steps: "
                        "a window of a running batch rather than the first prompt passes)")
    p.add_argument("--profile-with-stack", action="store_true",
                   help="record Python functions too (host time per function; slows the steps)")
    p.add_argument("--profile-dir", default=None,
                   help="trace directory (default: $PORTASERVE_TORCH_PROFILER_DIR or /tmp/portaserve-profile)")
    p.add_argument("--warmup", type=NONNEG, default=1)
    p.add_argument("--output-file", default=None, type=out_file)


def main(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.offline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    ns = p.parse_args(argv)
    check_dataset_args(p, ns)
    if ns.compare_schedule_policy == ns.schedule_policy:
        p.error(f"--compare-schedule-policy {ns.compare_schedule_policy}: the main run's policy already "
                "(--schedule-policy picks the other one)")
    if ns.profile_after and not ns.profile:
        p.error("--profile-after: only with --profile")
    if ns.profile_after == float("inf"):
        p.error("--profile-after: must be finite")
    from portaserve import Engine

    kw = dict(skip_tokenizer_init=True, model_path=ns.model_path, revision=ns.revision, device=ns.device, dtype=ns.dtype, load_format=ns.load_format,
              kv_cache_dtype=ns.kv_cache_dtype,
              max_total_tokens=ns.max_total_tokens, chunked_prefill_size=ns.chunked_prefill_size,
              max_running_requests=ns.max_running_requests, mem_fraction_static=ns.mem_fraction_static,
              disable_cuda_graph=ns.disable_cuda_graph, tp_size=ns.tp_size,
              enable_torch_compile=ns.enable_torch_compile, enable_mixed_chunk=ns.enable_mixed_chunk, disable_overlap_schedule=ns.disable_overlap_schedule,
              disable_overlap_prefill=ns.disable_overlap_prefill,
              cascade_attention=ns.cascade_attention, schedule_policy=ns.schedule_policy,
              attention_backend=ns.attention_backend)
    results = {}
    configs = [("portaserve", {})]
    if ns.compare_attention_backend:
        configs.append((f"portaserve --attention-backend {ns.compare_attention_backend}",
                        {"attention_backend": ns.compare_attention_backend}))
    if ns.compare_schedule_policy:
        configs.append((f"portaserve --schedule-policy {ns.compare_schedule_policy}",
                        {"schedule_policy": ns.compare_schedule_policy}))
    if ns.compare_cascade_off:
        configs.append(("portaserve --cascade-attention off", {"cascade_attention": "off"}))
    if ns.compare_no_cache:
        configs.append(("portaserve --disable-radix-cache", {"disable_radix_cache": True}))
    if ns.compare_overlap_prefill_off:
        configs.append(("portaserve --disable-overlap-prefill", {"disable_overlap_prefill": True}))
    if ns.compare_mixed_chunk:
        flipped = not ns.enable_mixed_chunk
        configs.append((f"portaserve mixed chunk {'on' if flipped else 'off'}", {"enable_mixed_chunk": flipped}))
    engine_outputs = None
    reqs = None
    for label, extra in configs:
        with Engine(**{**kw, **extra}) as eng:
            reqs = make_dataset(ns, eng.rt.model_config.vocab_size)
            warm = [BenchRequest(r.input_ids[:16], 4) for r in reqs[: ns.warmup * 4]]
            if warm:
                run_engine(eng, warm)
                eng.flush_cache()
            prof = {"output_dir": ns.profile_dir, "num_steps": ns.profile_steps, "after": ns.profile_after,
                    "with_stack": ns.profile_with_stack} if ns.profile else None
            results[label] = run_engine(eng, reqs, prof)
            engine_outputs = engine_outputs or results[label]["outputs"]
            info = eng.rt.info()
            results[label]["counters"] = eng.get_server_info()["counters"]
            table = eng.rt.op_table.as_dict()
            results[label]["attention"] = {k: table[f"attention_{k}"]["provider"] for k in ("extend", "decode")}
            results[label]["kv_cache_dtype"] = info["kv_cache_dtype"]
        del eng  # shutdown() released its memory; drop the handle too
        gc.collect()
    if ns.compare_hf:
        from transformers import AutoModelForCausalLM

        src = info["model_path"]
        if src.endswith(".gguf"):
            import pathlib

            pth = pathlib.Path(src)
            model = AutoModelForCausalLM.from_pretrained(str(pth.parent), gguf_file=pth.name,
                                                         torch_dtype=torch.float32).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(src, torch_dtype="auto").eval()
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        warm = [BenchRequest(r.input_ids[:16], 4) for r in reqs[:4]]
        run_hf(model, warm, pad, 4)
        results["transformers"] = run_hf(model, reqs, pad, ns.hf_batch_size or len(reqs))
        same = sum(a == b for a, b in zip(engine_outputs, results["transformers"]["outputs"]))
        results["transformers"]["identical_outputs"] = f"{same}/{len(reqs)}"

    print(f"\n# {ns.dataset}: {len(reqs)} requests, {sum(len(r.input_ids) for r in reqs)} prompt tokens, "
          f"{sum(r.output_len for r in reqs)} output tokens; {info['platform']} ({info['device_name']}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}"
          f"{'' if ns.kv_cache_dtype == 'auto' else f'; KV cache {ns.kv_cache_dtype}'}"
          f"{'' if ns.schedule_policy == 'fcfs' else f'; portaserve runs --schedule-policy {ns.schedule_policy}'}")
    base = results.get("transformers")
    print(f"{'run':<36}{'seconds':>9}{'out tok/s':>11}{'total tok/s':>13}{'cache hit':>11}{'vs HF':>8}")
    for label, r in results.items():
        ratio = f"{r['output_tok_s'] / base['output_tok_s']:.2f}x" if base else "-"
        hit = f"{r['cache_hit_rate']:.1%}" if "cache_hit_rate" in r else "-"
        print(f"{label:<36}{r['seconds']:>9.2f}{r['output_tok_s']:>11.1f}{r['total_tok_s']:>13.1f}{hit:>11}{ratio:>8}")
    for label, r in results.items():
        if r.get("steps"):
            counters = r.get("counters", {})
            shared = counters.get("decode_shared", 0)
            print(f"{label} steps: " + ", ".join(f"{k}={v}" for k, v in r["steps"].items())
                  + f", retractions={counters.get('retractions', 0)}"
                  + (f", cascade-attention decode steps={shared}" if shared else ""))
    for label, r in results.items():
        if r.get("profile"):
            with open(r["profile"]["summary_file"]) as f:
                print(f"{label} profile ({r['profile']['steps']} steps, trace {r['profile']['trace']}):\n{f.read()}")
    for label, r in results.items():
        if r.get("attention"):
            print(f"{label} attention: " + ", ".join(f"{k}={v}" for k, v in r["attention"].items()))
    first = next(iter(results))
    for label, r in results.items():
        if label not in (first, "transformers"):
            print(f"{first} vs {label}: {results[first]['output_tok_s'] / r['output_tok_s']:.2f}x output tok/s")
    if base:
        print(f"greedy outputs identical to transformers: {base['identical_outputs']}")
    if ns.output_file:
        with open(ns.output_file, "w") as f:
            json.dump({k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in results.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
