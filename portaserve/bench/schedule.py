"""Replay a benchmark dataset through the scheduler alone: admission, chunked prefill,
decode batches, retraction and the radix cache, with a stand-in model that does no work
(every token it "samples" is token 0).  Nothing is computed, so a run that takes minutes
on a GPU replays in seconds on the CPU, and the step counts it reports are the ones the
engine takes on the same dataset and pool: the forward passes the scheduler launches do
not depend on token values when every request runs to its max_new_tokens (ignore_eos, as
the offline benchmark does).  The replay runs what `bench offline` runs on an
accelerator: the overlap scheduler (--disable-overlap-schedule for the CPU's loop) after
the same warm-up (--warmup: 4 short requests each, whose decode steps lower the
scheduler's new-token estimate before the timed run).  For example, `bench offline`'s
random 500 on an H200 (870,243 KV slots) took 3,412 decode steps at a mean batch of
152.6 under fcfs and 2,096 at 248.5 under lof; this replays the same counts.

What it tells: how many passes a policy or a pool size costs, and where the decode batches
run small (the steps after the queue has emptied, while the longest outputs finish), e.g.
an H100's pool against an H200's:

    portaserve bench schedule --dataset random --num-prompts 500 --random-input-len 4096 \\
        --random-output-len 2048 --max-total-tokens 430000 --schedule-policy fcfs lof

Times come from a GPU run (`bench offline`); this reports counts only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from types import SimpleNamespace

import torch

from portaserve.bench import NONNEG, POS, out_file
from portaserve.bench.datasets import BenchRequest
from portaserve.bench.offline import add_dataset_args, check_dataset_args, make_dataset
from portaserve.core.request_builder import InvalidRequest, Limits, build_req
from portaserve.core.scheduler import POLICIES, Scheduler
from portaserve.runtime import scheduler_config
from portaserve.server_args import ServerArgs

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerArgs)}


class _NoModel:
    """The scheduler's model, doing nothing: hidden states and logits of the right
    lengths, all zero (greedy sampling picks token 0)."""
    cfg = SimpleNamespace(vocab_size=8)

    def __call__(self, fb):
        return torch.zeros(fb.input_ids.shape[0], 1)

    def compute_logits(self, hidden):
        return torch.zeros(hidden.shape[0], self.cfg.vocab_size)


def _submit(s: Scheduler, limits: Limits, reqs, tag: str) -> list:
    """Queue reqs as the engine would, through its own request checks (context length,
    the pool's whole pages): a request it would refuse is an error here too."""
    out = []
    for i, r in enumerate(reqs):
        try:
            req = build_req(limits, None, None, list(r.input_ids),
                            {"max_new_tokens": r.output_len, "temperature": 0, "ignore_eos": True},
                            rid=f"{tag}{i}")
        except InvalidRequest as e:
            raise ValueError(f"request {i} does not fit ({len(r.input_ids)} prompt tokens, "
                             f"{r.output_len} output tokens): {e}") from None
        s.add_request(req)
        out.append(req)
    return out


def replay(reqs, args: ServerArgs, context_len: int, overlap: bool = True, warmup: int = 0,
           vocab_size: int = 128256) -> dict:
    """Run reqs (BenchRequests, all queued at once) through a scheduler built from args'
    scheduling flags and args.max_total_tokens KV slots, with the overlap scheduler or
    without, after `warmup` rounds of bench offline's warm-up; the counts of what the
    timed run did."""
    cfg = scheduler_config(args, context_len, args.max_total_tokens, overlap=overlap)
    s = Scheduler(cfg, _NoModel(), None, torch.device("cpu"), eos_ids=[], pin_memory=False)
    limits = Limits(context_len, vocab_size, s.allocator.size)
    warm = [BenchRequest(r.input_ids[:16], 4) for r in reqs[: warmup * 4]]
    if warm:  # as bench offline's: a few decode steps, then an empty cache
        _submit(s, limits, warm, "warmup-")
        while s.has_work():
            s.step()
        s.flush_cache()
        s.counters = type(s.counters)()
    queued = _submit(s, limits, reqs, "")
    n = {"extend": 0, "mixed": 0, "decode": 0}
    rows = used = tail = tail_rows = retracted = 0
    t0 = time.perf_counter()
    while s.has_work():
        s.step()
        st = s.last_step
        if st.mode in n:
            n[st.mode] += 1
        retracted += st.retracted
        if st.mode == "decode":
            rows += st.batch_size
            used += cfg.max_total_tokens - s._available()
            if not s.waiting and s.chunked is None:
                tail += 1
                tail_rows += st.batch_size
    cut = [r.rid for r in queued if (r.finished_reason or {}).get("type") != "length"
           or len(r.output_ids) != r.sampling.max_new_tokens]
    if cut:
        raise RuntimeError(f"{len(cut)} requests did not run to their max_new_tokens (first: {cut[0]})")
    dec = max(n["decode"], 1)
    return {"extend_steps": n["extend"], "mixed_steps": n["mixed"], "decode_steps": n["decode"],
            "mean_decode_batch": round(rows / dec, 1), "mean_kv_use": round(used / dec / cfg.max_total_tokens, 3),
            "retractions": retracted, "cached_tokens": s.counters.cached_tokens,
            "prompt_tokens_computed": s.counters.extend_tokens,
            "tail_decode_steps": tail, "tail_mean_batch": round(tail_rows / max(tail, 1), 1),
            "replay_seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--vocab-size", type=POS, default=128256,
                   help="the vocabulary the dataset's token ids are drawn from (default: Llama 3's, "
                        "the ids of a Llama-3 run; lengths do not depend on it)")
    p.add_argument("--max-total-tokens", type=POS, required=True, help="KV slots in the pool")
    p.add_argument("--context-length", type=POS, default=131072, help="default: Llama 3.1's")
    p.add_argument("--schedule-policy", nargs="+", choices=POLICIES, default=[_DEFAULTS["schedule_policy"]],
                   help="one run per policy, side by side")
    for name in ("max_running_requests", "chunked_prefill_size", "max_prefill_tokens", "page_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=_DEFAULTS[name])
    p.add_argument("--schedule-conservativeness", type=float, default=_DEFAULTS["schedule_conservativeness"])
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--enable-mixed-chunk", action="store_true")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="the scheduler's synchronous loop, as on the CPU (default: the overlap "
                        "scheduler, as on an accelerator)")
    p.add_argument("--disable-overlap-prefill", action="store_true")
    p.add_argument("--warmup", type=NONNEG, default=1, help="bench offline's warm-up rounds (default: its default)")
    p.add_argument("--output-file", default=None, type=out_file)
    ns = p.parse_args(argv)
    check_dataset_args(p, ns)
    if ns.vocab_size < 128:
        p.error(f"--vocab-size {ns.vocab_size}: at least 128 (dataset ids are drawn above 100)")
    # the scheduler's request table holds a row of context_length slots per running request
    table = (ns.max_running_requests + 1) * ns.context_length * 4
    if table > 1 << 32:
        p.error(f"--max-running-requests {ns.max_running_requests} x --context-length {ns.context_length}: "
                f"the request table would take {table / 2**30:.0f} GiB; lower one of them")
    reqs = make_dataset(ns, ns.vocab_size)
    flags = {k: getattr(ns, k) for k in ("max_total_tokens", "max_running_requests", "chunked_prefill_size",
                                         "max_prefill_tokens", "page_size", "schedule_conservativeness",
                                         "disable_radix_cache", "enable_mixed_chunk", "disable_overlap_prefill")}
    results = {}
    for policy in ns.schedule_policy:
        args = ServerArgs(**flags, schedule_policy=policy)
        try:
            args.validate()
        except ValueError as e:
            p.error(str(e))
        try:
            results[policy] = replay(reqs, args, ns.context_length, overlap=not ns.disable_overlap_schedule,
                                     warmup=ns.warmup, vocab_size=ns.vocab_size)
        except ValueError as e:
            p.error(str(e))
    print(f"# {ns.dataset}: {len(reqs)} requests, {sum(len(r.input_ids) for r in reqs)} prompt tokens, "
          f"{sum(r.output_len for r in reqs)} output tokens; pool {ns.max_total_tokens} tokens, "
          f"max running {ns.max_running_requests}, chunk {ns.chunked_prefill_size}; "
          f"{'synchronous loop' if ns.disable_overlap_schedule else 'overlap scheduler'}, warm-up {ns.warmup}")
    cols = [("policy", 12), ("extend", 8), ("mixed", 7), ("decode", 8), ("mean batch", 11), ("KV use", 8),
            ("retracted", 10), ("recomputed", 11), ("tail steps", 11), ("tail batch", 11)]
    prompt = sum(len(r.input_ids) for r in reqs)
    print("".join(f"{c:>{w}}" for c, w in cols))
    for policy, r in results.items():
        vals = [policy, r["extend_steps"], r["mixed_steps"], r["decode_steps"], r["mean_decode_batch"],
                f"{r['mean_kv_use']:.0%}", r["retractions"], r["prompt_tokens_computed"] + r["cached_tokens"] - prompt,
                r["tail_decode_steps"], r["tail_mean_batch"]]
        print("".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))
    print("(recomputed: tokens prefilled again after a retraction; tail: decode steps after the queue emptied;\n"
          " KV use: slots held by running requests, mean over decode steps)")
    if ns.output_file:
        with open(ns.output_file, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
