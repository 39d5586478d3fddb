"""Admission orders (--schedule-policy) and `bench schedule`, the scheduler replayed with
no model.  References: the order the requests' max_new_tokens prescribe, and the step
counts of the engine itself on the same dataset and pool."""
from __future__ import annotations

import pytest

from portaserve.bench.datasets import random_dataset
from portaserve.core.request_builder import build_req
from portaserve.runtime import build_runtime
from portaserve.server_args import ServerArgs

GREEDY = {"temperature": 0, "ignore_eos": True}


def _finish_order(path, lengths, **kw):
    """Requests with these max_new_tokens, queued at once, one running at a time: the
    order they finish in is the order they were admitted in."""
    rt = build_runtime(ServerArgs(model_path=str(path), skip_tokenizer_init=True, grammar_backend="none",
                                  device="cpu", max_running_requests=1, **kw))
    s = rt.scheduler
    for i, n in enumerate(lengths):
        s.add_request(build_req(rt.limits(), None, None, [5 + i, 7, 9], {"max_new_tokens": n, **GREEDY},
                                rid=str(i)))
    order = []
    steps = 0
    while s.has_work():
        order += [int(r.rid) for r in s.step() if r.finished_reason is not None]
        steps += 1
        assert steps < 500
    return order


LENGTHS = [3, 8, 5, 8, 2, 6]


def test_lof_admits_the_longest_output_first(tiny_models):
    path = tiny_models("llama3")
    want = sorted(range(len(LENGTHS)), key=lambda i: -LENGTHS[i])  # stable: arrival order among equals
    assert want == [1, 3, 5, 2, 0, 4]
    assert _finish_order(path, LENGTHS, schedule_policy="lof") == want
    assert _finish_order(path, LENGTHS, schedule_policy="lof", disable_radix_cache=True) == want
    assert _finish_order(path, LENGTHS, schedule_policy="fcfs") == list(range(len(LENGTHS)))


def test_lof_keeps_started_requests_ahead(tiny_models):
    """A request that has run already (retracted, or re-queued by jump-forward; both go
    back to the front of the queue) is not sorted behind longer requests that have not
    started: it holds output the client is waiting on, and under fcfs it goes first too."""
    rt = build_runtime(ServerArgs(model_path=str(tiny_models("llama3")), skip_tokenizer_init=True,
                                  grammar_backend="none", device="cpu", schedule_policy="lof"))
    s = rt.scheduler
    for i, n in enumerate([3, 8, 5, 9]):
        s.add_request(build_req(rt.limits(), None, None, [5 + i, 7, 9], {"max_new_tokens": n, **GREEDY},
                                rid=str(i)))
    s.waiting[0].admitted_once = True  # as a retracted request: it ran before
    s._order_waiting()
    assert [r.rid for r in s.waiting] == ["0", "3", "1", "2"]


def test_random_policy_applies_without_a_radix_cache(tiny_models):
    """random is cache-agnostic (as in SGLang): it used to fall back to arrival order
    whenever --disable-radix-cache was set."""
    path = tiny_models("llama3")
    order = _finish_order(path, LENGTHS, schedule_policy="random", disable_radix_cache=True)
    assert sorted(order) == list(range(len(LENGTHS)))
    assert order != list(range(len(LENGTHS)))  # the seeded shuffle (random_seed 0) is not the identity


@pytest.mark.parametrize("policy,overlap", [("fcfs", False), ("lof", False), ("lpm", False),
                                            ("fcfs", True), ("lof", True)])
def test_replay_takes_the_engines_steps(tiny_models, policy, overlap):
    """bench schedule's counts are the engine's: the same dataset through a real Engine
    (tiny model, CPU) on a pool small enough that decode batches are memory-bound and
    requests get retracted.  With overlap, as on an accelerator, after bench offline's
    warm-up (whose decode steps lower the new-token estimate the timed run starts from)."""
    from portaserve import Engine
    from portaserve.bench.datasets import BenchRequest
    from portaserve.bench.offline import run_engine
    from portaserve.bench.schedule import replay

    path = tiny_models("llama3")
    reqs = random_dataset(40, 200, 60, 0.0, 512, seed=3)
    flags = dict(max_total_tokens=400, chunked_prefill_size=128, max_running_requests=32,
                 schedule_policy=policy)
    warmup = 1 if overlap else 0
    with Engine(str(path), skip_tokenizer_init=True, device="cpu", **flags) as eng:
        assert eng.rt.scheduler.cfg.overlap is False  # the CPU's loop, unless switched on here
        eng.rt.scheduler.overlap = overlap  # on the CPU it runs synchronously: the same steps
        if warmup:
            run_engine(eng, [BenchRequest(r.input_ids[:16], 4) for r in reqs[:4]])
            eng.flush_cache()
        before = eng.get_server_info()["counters"]["retractions"]
        steps = run_engine(eng, reqs)["steps"]
        retractions = eng.get_server_info()["counters"]["retractions"] - before
        context = eng.rt.scheduler.cfg.context_len
    sim = replay(reqs, ServerArgs(**flags), context, overlap=overlap, warmup=warmup, vocab_size=512)
    assert sim["decode_steps"] == steps["decode_steps"]
    assert sim["extend_steps"] == steps["extend_steps"]
    assert sim["mean_decode_batch"] == steps["mean_decode_batch"]
    assert sim["retractions"] == retractions
    assert retractions > 0  # the pool is small enough for the retraction path to count
    if overlap:  # the loops differ: a replay of the other one would not pass for this one
        other = replay(reqs, ServerArgs(**flags), context, overlap=False, warmup=warmup, vocab_size=512)
        assert (other["decode_steps"], other["extend_steps"]) != (sim["decode_steps"], sim["extend_steps"])


def test_replay_refuses_what_the_engine_refuses():
    """A request the engine would refuse (here: 35 + 1 tokens in a pool of 40 slots, which
    is two whole pages of 16, 32 slots) is an error, not a replay that never ends."""
    from portaserve.bench.datasets import BenchRequest
    from portaserve.bench.schedule import replay

    args = ServerArgs(max_total_tokens=40, page_size=16)
    with pytest.raises(ValueError, match="request 0 .*KV cache holds 32 tokens"):
        replay([BenchRequest(list(range(100, 135)), 1)], args, 4096)
    with pytest.raises(ValueError, match=r"request 0 .*\(33\) exceeds the KV pool \(32 tokens\)"):
        replay([BenchRequest(list(range(100, 131)), 2)], args, 4096)
    with pytest.raises(ValueError, match="maximum context length"):
        replay([BenchRequest(list(range(100, 120)), 1)], ServerArgs(max_total_tokens=400), 20)
    ok = replay([BenchRequest(list(range(100, 130)), 2)], args, 4096)  # 32 slots: fits
    assert ok["decode_steps"] == 1 and ok["extend_steps"] == 1


def test_every_policy_is_a_serve_flag_choice():
    import dataclasses

    from portaserve.core.scheduler import POLICIES

    field = next(f for f in dataclasses.fields(ServerArgs) if f.name == "schedule_policy")
    assert sorted(field.metadata["choices"]) == sorted(POLICIES)
