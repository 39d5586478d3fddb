"""Randomised differential test of the scheduler's loops: the plain loop, the overlap
scheduler without and with overlapped prompt passes, driven step by step over random
workloads (prompt and output lengths, stop tokens, seeded sampling, max_new_tokens 0..many,
page sizes, chunk sizes, pools small enough to retract, mixed chunk, admission orders,
aborts at random steps).  Every loop must give each request the tokens and finish reason
the plain loop gives it, and leave no KV slot or request row behind.  On the CPU each step runs
synchronously, so this checks the bookkeeping, not device ordering."""
import random

import pytest

from tests.conftest import random_prompts


def _workload(seed):
    rnd = random.Random(seed)
    n = rnd.randint(4, 10)
    prompts = random_prompts(n, 512, 3, 90, seed=seed)
    sps = []
    for i in range(n):
        sp = {"max_new_tokens": rnd.choice([1, 2, 5, 9, 17, 30, 60]), "temperature": 0, "ignore_eos": True}
        kind = rnd.random()
        if kind < 0.2:
            sp = {**sp, "ignore_eos": False, "stop_token_ids": rnd.sample(range(3, 512), 40)}
        elif kind < 0.4:
            sp = {**sp, "temperature": 0.9, "top_p": 0.9, "sampling_seed": seed * 100 + i}
        sps.append(sp)
    config = {"page_size": rnd.choice([1, 1, 4]), "chunked_prefill_size": rnd.choice([16, 48, 8192]),
              "max_total_tokens": rnd.choice([260, 400, 3000]), "max_running_requests": rnd.choice([2, 4, 16]),
              "enable_mixed_chunk": rnd.random() < 0.3}
    aborts = {rnd.randrange(1, 30): rnd.randrange(n) for _ in range(rnd.randint(0, 2))}
    # a long-serving scheduler reserves little for running requests' future tokens, so
    # admission is optimistic and decode steps retract (0.7 is a fresh one's share)
    config["reserve"] = rnd.choice([0.7, 0.05])
    # admission orders that reorder the queue without the radix cache's help (drawn last, so
    # the draws above match the workloads this test had before)
    config["schedule_policy"] = rnd.choice(["fcfs", "fcfs", "lof", "random"])
    return prompts, sps, config, aborts


def _run(path, prompts, sps, config, aborts, mode, monkeypatch):
    from portaserve.core.request_builder import build_req
    from portaserve.platforms.cpu import CpuPlatform
    from portaserve.runtime import build_runtime
    from portaserve.server_args import ServerArgs

    config = dict(config)
    reserve = config.pop("reserve")
    # configured by the runtime as on an accelerator
    monkeypatch.setattr(CpuPlatform, "overlap_schedule", mode != "plain")
    rt = build_runtime(ServerArgs(model_path=str(path), skip_tokenizer_init=True, grammar_backend="none",
                                  disable_overlap_prefill=mode != "overlap", **config))
    sched = rt.scheduler
    sched.new_token_ratio = sched.cfg.min_new_token_ratio = reserve
    assert (sched.overlap, sched.overlap_prefill) == (mode != "plain", mode == "overlap")
    reqs = [build_req(rt.limits(), None, None, p, sp, rid=str(i)) for i, (p, sp) in enumerate(zip(prompts, sps))]
    for r in reqs:
        sched.add_request(r)
    aborted, step = set(), 0
    while sched.has_work():
        sched.step()
        step += 1
        assert len(sched.running) <= sched.cfg.max_running_requests
        if step in aborts and sched.abort(str(aborts[step])) is not None:
            aborted.add(aborts[step])
        assert step < 3000, "the scheduler stopped making progress"
    assert sched.flush_cache()
    kv = sched.kv_stats()
    assert kv["free"] == kv["max_total_tokens"], kv  # every slot back
    assert sched.req_pool.available() == sched.req_pool.size  # every request row back
    return {i: (r.output_ids, r.finished_reason) for i, r in enumerate(reqs)}, aborted, sched.counters


@pytest.mark.parametrize("seed", range(8))
def test_loops_agree_on_random_workloads(tiny_models, seed, monkeypatch):
    path = tiny_models("llama3")
    prompts, sps, config, aborts = _workload(seed)
    plain, _, _ = _run(path, prompts, sps, config, {}, "plain", monkeypatch)
    for mode in ("overlap-decode-only", "overlap"):
        got, aborted, counters = _run(path, prompts, sps, config, aborts, mode, monkeypatch)
        for i, (ids, reason) in got.items():
            if i in aborted:  # whatever it had before the abort is a prefix of its tokens
                assert reason["type"] == "abort" and plain[i][0][:len(ids)] == ids, (mode, i)
            else:
                assert (ids, reason) == plain[i], (mode, i, config)
