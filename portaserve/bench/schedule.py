"""Replay a benchmark dataset through the scheduler alone: admission, chunked prefill,
decode batches, retraction and the radix cache, with a stand-in model that does no work
(every token it "samples" is token 0).  Nothing is computed, so a run that takes minutes
on a GPU replays in seconds on the CPU, and the step counts it reports are the ones the
engine takes on the same dataset and pool: the forward passes the scheduler launches do
not depend on token values when every request runs to its max_new_tokens (ignore_eos, as
the offline benchmark does).  For example, `bench offline`'s random 500 on an H200
(870,243 KV slots) took 3,412 decode steps at a mean batch of 152.6; this replays 3,411
at 152.7 (the engine's last step only reads back the one before it).

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

from portaserve.bench import POS, out_file
from portaserve.bench.offline import add_dataset_args, make_dataset
from portaserve.core.request import Req
from portaserve.core.sampling_params import SamplingParams
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


def replay(reqs, args: ServerArgs, context_len: int) -> dict:
    """Run reqs (BenchRequests, all queued at once) through a scheduler built from args'
    scheduling flags and args.max_total_tokens KV slots; the counts of what it did."""
    cfg = scheduler_config(args, context_len, args.max_total_tokens, overlap=False)
    s = Scheduler(cfg, _NoModel(), None, torch.device("cpu"), eos_ids=[], pin_memory=False)
    for i, r in enumerate(reqs):
        sp = SamplingParams.from_dict({"max_new_tokens": r.output_len, "temperature": 0, "ignore_eos": True})
        s.add_request(Req(rid=str(i), input_ids=list(r.input_ids), sampling=sp))
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
    p.add_argument("--context-length", type=POS, default=32768)
    p.add_argument("--schedule-policy", nargs="+", choices=POLICIES, default=[_DEFAULTS["schedule_policy"]],
                   help="one run per policy, side by side")
    for name in ("max_running_requests", "chunked_prefill_size", "max_prefill_tokens", "page_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=_DEFAULTS[name])
    p.add_argument("--schedule-conservativeness", type=float, default=_DEFAULTS["schedule_conservativeness"])
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--enable-mixed-chunk", action="store_true")
    p.add_argument("--output-file", default=None, type=out_file)
    ns = p.parse_args(argv)
    reqs = make_dataset(ns, ns.vocab_size)
    too_long = [i for i, r in enumerate(reqs) if len(r.input_ids) + r.output_len > min(ns.context_length,
                                                                                         ns.max_total_tokens)]
    if too_long:
        p.error(f"{len(too_long)} requests do not fit the context length or the pool "
                f"(prompt + output > {min(ns.context_length, ns.max_total_tokens)})")
    flags = {k: getattr(ns, k) for k in ("max_total_tokens", "max_running_requests", "chunked_prefill_size",
                                         "max_prefill_tokens", "page_size", "schedule_conservativeness",
                                         "disable_radix_cache", "enable_mixed_chunk")}
    results = {}
    for policy in ns.schedule_policy:
        args = ServerArgs(**flags, schedule_policy=policy)
        try:
            args.validate()
        except ValueError as e:
            p.error(str(e))
        results[policy] = replay(reqs, args, ns.context_length)
    print(f"# {ns.dataset}: {len(reqs)} requests, {sum(len(r.input_ids) for r in reqs)} prompt tokens, "
          f"{sum(r.output_len for r in reqs)} output tokens; pool {ns.max_total_tokens} tokens, "
          f"max running {ns.max_running_requests}, chunk {ns.chunked_prefill_size}")
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
