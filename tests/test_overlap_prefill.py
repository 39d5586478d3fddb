"""Overlapped prompt passes: a prompt pass is launched before the previous step's tokens
are read, and the decode step after it before the pass's own tokens are read (its new
requests' first tokens gathered on the device beside the host's last tokens of the
others).  On the CPU every step runs synchronously, which still exercises the
bookkeeping; the reference is the plain loop (no overlap) on the same engine config."""
import threading

import pytest

from tests.conftest import random_prompts

LOGPROB_SP = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


def _run(path, overlap, prefill, prompts, sps, spy=None, lp_prompt=None, **kw):
    """outs of prompts; with lp_prompt, a request for input and output logprobs submitted
    beside them (its pass runs the plain way) is appended."""
    from portaserve import Engine

    with Engine(str(path), skip_tokenizer_init=True, **kw) as e:
        sched = e.rt.scheduler
        sched.overlap, sched.overlap_prefill = overlap, prefill
        if spy is not None:
            spy(sched)
        lp = []
        t = threading.Thread(target=lambda: lp.append(e.generate(
            input_ids=lp_prompt, sampling_params=LOGPROB_SP, return_logprob=True, logprob_start_len=0)))
        if lp_prompt is not None:
            t.start()
        outs = e.generate(input_ids=prompts, sampling_params=sps)
        if lp_prompt is not None:
            t.join()
            outs = outs + lp
        counters = e.get_server_info()["counters"]
        assert e.flush_cache()
        kv = e.get_server_info()["kv"]
        assert kv["free"] == kv["max_total_tokens"]  # nothing leaked, in flight or not
        assert sched.inflight is None and not sched.running
    return outs, counters


def _spy(seen):
    def install(sched):
        launch, next_ids = sched._launch_extend, sched._next_ids
        passes = []  # the in-flight steps prompt passes launched (the rest are decode steps)

        def launch_spy(batch, prev=None):
            kind = None if prev is None else "extend" if any(p is prev for p in passes) else "decode"
            seen["launched"].append((len(batch), kind))
            out = launch(batch, prev)
            passes.append(sched.inflight)
            return out

        def ids_spy(prev, batch, pending):
            seen["decode_after_pass"] += any(id(r) not in pending for r in batch)
            return next_ids(prev, batch, pending)

        sched._launch_extend, sched._next_ids = launch_spy, ids_spy
    return install


def _sampling_mix(n):
    sps = [{"max_new_tokens": 4 + 5 * (i % 5), "temperature": 0, "ignore_eos": True} for i in range(n)]
    sps[1] = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}  # done at its prompt pass
    sps[2] = {"max_new_tokens": 30, "temperature": 0, "stop_token_ids": list(range(3, 60))}
    sps[3] = {"max_new_tokens": 20, "temperature": 0.9, "top_p": 0.9, "sampling_seed": 5, "ignore_eos": True}
    return sps


@pytest.mark.parametrize("chunk", [48, 8192])
def test_overlapped_prompt_passes_same_tokens(tiny_models, chunk):
    """Requests arriving while others decode (max 4 running), prompts chunked or whole:
    the same tokens, finish reasons and logprobs as the plain loop and as the overlap
    scheduler with --disable-overlap-prefill, and both overlapped paths really ran."""
    path = tiny_models("llama3")
    prompts = random_prompts(12, 512, 5, 150, seed=41)
    sps = _sampling_mix(12)
    kw = dict(max_total_tokens=3000, max_running_requests=4, chunked_prefill_size=chunk,
              lp_prompt=random_prompts(1, 512, 40, 40, seed=42)[0])
    plain, _ = _run(path, False, False, prompts, sps, **kw)
    seen = {"launched": [], "decode_after_pass": 0}
    over, _ = _run(path, True, True, prompts, sps, spy=_spy(seen), **kw)
    old, _ = _run(path, True, False, prompts, sps, **kw)
    for outs in (over, old):
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in plain]
        assert [o["meta_info"]["finish_reason"] for o in outs] == [o["meta_info"]["finish_reason"] for o in plain]
    lp = lambda o: o["meta_info"]["input_token_logprobs"] + o["meta_info"]["output_token_logprobs"]  # noqa: E731
    # (it joins batches at times set by a thread: the float sums' order may differ)
    a, b = lp(plain[-1]), lp(over[-1])
    assert len(a) == 40 + 6 and [t for _, t, _ in a] == [t for _, t, _ in b]
    assert all((x is None and y is None) or abs(x - y) < 1e-4 for (x, _, _), (y, _, _) in zip(a, b))
    assert plain[1]["meta_info"]["completion_tokens"] == 1
    # passes launched with a decode step in flight, and with a pass in flight (chunks
    # whose last one completes a prompt), and decode steps launched with a pass in flight
    assert {k for _, k in seen["launched"]} >= {"decode", "extend", None}, seen
    assert seen["decode_after_pass"] > 0, seen


def test_overlapped_prompt_passes_under_memory_pressure(tiny_models):
    """A pool too small for every request to grow: admission counts a launched pass's
    requests as running, decode steps retract as before, and the tokens stay the plain
    loop's."""
    path = tiny_models("llama3")
    prompts = random_prompts(10, 512, 20, 60, seed=43)
    sps = [{"max_new_tokens": 40, "temperature": 0, "ignore_eos": True} for _ in prompts]
    kw = dict(max_total_tokens=400, chunked_prefill_size=64)
    plain, c0 = _run(path, False, False, prompts, sps, **kw)
    seen = {"launched": [], "decode_after_pass": 0}
    over, c1 = _run(path, True, True, prompts, sps, spy=_spy(seen), **kw)
    assert [o["output_ids"] for o in over] == [o["output_ids"] for o in plain]
    assert c0["retractions"] > 0 and c1["retractions"] > 0
    assert seen["launched"] and seen["decode_after_pass"] > 0


def test_mixed_chunk_with_overlap_same_tokens(tiny_models):
    """--enable-mixed-chunk with the overlap scheduler: passes with riders run the plain
    way, passes with nothing running overlap; the tokens are the plain loop's."""
    path = tiny_models("llama3")
    prompts = random_prompts(8, 512, 5, 120, seed=44)
    sps = [{"max_new_tokens": 3 + 4 * i, "temperature": 0, "ignore_eos": True} for i in range(8)]
    kw = dict(max_total_tokens=3000, max_running_requests=3, chunked_prefill_size=64, enable_mixed_chunk=True)
    plain, c0 = _run(path, False, False, prompts, sps, **kw)
    seen = {"launched": [], "decode_after_pass": 0}
    over, c1 = _run(path, True, True, prompts, sps, spy=_spy(seen), **kw)
    assert [o["output_ids"] for o in over] == [o["output_ids"] for o in plain]
    assert c1["forward_mixed"] > 0 and seen["launched"]


def _drive(rt, prompts, sps, abort_at=None):
    """Step rt's scheduler by hand; abort_at: (step index, request index) to abort right
    after that step returns.  Returns the requests."""
    from portaserve.core.request_builder import build_req

    sched = rt.scheduler
    reqs = [build_req(rt.limits(), None, None, p, sp) for p, sp in zip(prompts, sps)]
    for r in reqs:
        sched.add_request(r)
    n = 0
    while sched.has_work():
        sched.step()
        if abort_at is not None and n == abort_at[0]:
            assert sched.abort(reqs[abort_at[1]].rid) is not None
        n += 1
        assert n < 1000
    return reqs


@pytest.mark.parametrize("when", ["pass", "decode after pass"])
def test_abort_while_a_prompt_pass_is_in_flight(tiny_models, when):
    """A request aborted while its prompt pass (or the decode step launched on its unread
    first token) is in flight: no token reaches it afterwards, its KV comes back, and the
    other requests' tokens are the plain loop's."""
    from portaserve.runtime import build_runtime
    from portaserve.server_args import ServerArgs

    path = tiny_models("llama3")
    prompts = random_prompts(3, 512, 20, 40, seed=45)
    sps = [{"max_new_tokens": 12, "temperature": 0, "ignore_eos": True} for _ in prompts]
    outs = []
    for overlap in (False, True):
        rt = build_runtime(ServerArgs(model_path=str(path), skip_tokenizer_init=True, max_total_tokens=2000,
                                      grammar_backend="none"))
        sched = rt.scheduler
        sched.overlap = sched.overlap_prefill = overlap
        # the pass is launched at step 0 and its tokens read at step 1, which launches the
        # decode step on them; that one is read at step 2
        step = 0 if when == "pass" else 1
        reqs = _drive(rt, prompts, sps, abort_at=(step, 1) if overlap else None)
        if overlap:
            victim = reqs[1]
            assert victim.finished_reason["type"] == "abort"
            assert len(victim.output_ids) == step, victim.output_ids
        outs.append([r.output_ids for i, r in enumerate(reqs) if i != 1])
        assert sched.flush_cache()
        assert sched.kv_stats()["free"] == sched.allocator.size
    assert outs[0] == outs[1]
