"""Scheduler corner cases under memory pressure and odd flag pairings, found by a review
(each hung a caller or spun the scheduler).  Reference: the same requests run alone on
a roomy pool."""
from __future__ import annotations

import pytest

from portaserve.core.request_builder import build_req
from portaserve.runtime import build_runtime
from portaserve.server_args import ServerArgs

GREEDY = {"temperature": 0, "ignore_eos": True}


def _runtime(path, **kw):
    return build_runtime(ServerArgs(model_path=str(path), skip_tokenizer_init=True, grammar_backend="none", **kw))


def _req(rt, ids, sp, rid, **kw):
    return build_req(rt.limits(), None, None, ids, sp, rid=rid, **kw)


def _drain(s, limit=2000):
    reported = {}
    n = 0
    while s.has_work():
        for r in s.step():
            if r.finished_reason is not None:
                reported[r.rid] = r
        n += 1
        assert n < limit, "the scheduler never finished its work"
    return reported


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_chunked_prompt_that_runs_out_of_room_goes_back_to_the_queue(tiny_models, page_size):
    """--enable-mixed-chunk: the running request rides along in each chunk of a long
    prompt and takes the room the prompt's next chunk needs.  The lone running request
    used to be aborted "out of KV cache memory", and its finish was never reported (its
    caller waited forever).  Now the part-prefilled prompt is retracted, and both finish
    with the tokens and logprobs they get on a roomy pool."""
    path = tiny_models("llama3")
    rt = _runtime(path, max_total_tokens=200, chunked_prefill_size=16, enable_mixed_chunk=True,
                  max_running_requests=4, page_size=page_size)
    s = rt.scheduler
    s.new_token_ratio = s.cfg.min_new_token_ratio = 0.05  # a long-serving scheduler's reserve
    a_ids = list(range(10, 20))
    room = s._available() - 11 - 1
    c_ids = [7 + (i % 400) for i in range(room - 12)]
    # the same prompt, cached by an earlier request: the retracted prompt must not take
    # this longer prefix on resuming (its input logprobs there are not recorded yet)
    D = _req(rt, c_ids, {"max_new_tokens": 1, **GREEDY}, "D")
    s.add_request(D)
    _drain(s)
    A = _req(rt, a_ids, {"max_new_tokens": 100, **GREEDY}, "A")
    s.add_request(A)
    for _ in range(5):
        s.step()
    assert len(c_ids) < s._available() - s._reserved_for_running()
    C = _req(rt, c_ids, {"max_new_tokens": 1, **GREEDY}, "C", return_logprob=True, logprob_start_len=0)
    s.add_request(C)
    reported = _drain(s)
    assert set(reported) == {"A", "C"} and C.cached_tokens == 0
    assert A.finished_reason["type"] == "length" and C.finished_reason["type"] == "length"
    assert s.counters.retractions >= 1  # the case under test happened

    ref = _runtime(path, max_total_tokens=4000, page_size=page_size)
    A2 = _req(ref, a_ids, {"max_new_tokens": 100, **GREEDY}, "A2")
    C2 = _req(ref, c_ids, {"max_new_tokens": 1, **GREEDY}, "C2", return_logprob=True, logprob_start_len=0)
    ref.scheduler.add_request(A2)
    ref.scheduler.add_request(C2)
    _drain(ref.scheduler)
    assert A.output_ids == A2.output_ids and C.output_ids == C2.output_ids
    assert [t for _, t, _ in C.input_token_logprobs] == [t for _, t, _ in C2.input_token_logprobs] == c_ids
    for (a, _, _), (b, _, _) in zip(C.input_token_logprobs[1:], C2.input_token_logprobs[1:]):
        assert abs(a - b) < 1e-3
    kv = s.kv_stats()
    s.flush_cache()
    assert s.kv_stats()["free"] == kv["max_total_tokens"]  # nothing leaked


def test_chunk_smaller_than_a_page(tiny_models):
    """--chunked-prefill-size below --page-size rounded every chunk down to no page: the
    prompt was never admitted and the scheduler spun.  The CLI refuses the pairing; the
    scheduler takes a page per chunk at least."""
    path = tiny_models("llama3")
    with pytest.raises(ValueError, match="chunked-prefill-size"):
        ServerArgs(model_path=str(path), page_size=32, chunked_prefill_size=16).validate()
    rt = _runtime(path, max_total_tokens=2000, page_size=32, chunked_prefill_size=32)
    rt.scheduler.cfg.chunked_prefill_size = 16  # as a config built without the CLI's check
    ids = list(range(3, 43))
    r = _req(rt, ids, {"max_new_tokens": 4, **GREEDY}, "r")
    rt.scheduler.add_request(r)
    _drain(rt.scheduler)
    ref = _runtime(path, max_total_tokens=2000)
    r2 = _req(ref, ids, {"max_new_tokens": 4, **GREEDY}, "r2")
    ref.scheduler.add_request(r2)
    _drain(ref.scheduler)
    assert r.output_ids == r2.output_ids and len(r.output_ids) == 4


def test_a_resumed_prompt_does_not_skip_unrecorded_logprobs(tiny_models):
    """A prompt retracted part-way (admitted once, some input logprobs recorded) must not
    match a longer cached prefix on resuming: the logprobs there were never recorded."""
    rt = _runtime(tiny_models("llama3"), max_total_tokens=2000)
    s = rt.scheduler
    ids = list(range(5, 105))
    s.add_request(_req(rt, ids, {"max_new_tokens": 1, **GREEDY}, "D"))  # caches the prompt
    _drain(s)
    C = _req(rt, ids, {"max_new_tokens": 1, **GREEDY}, "C", return_logprob=True, logprob_start_len=0)
    C.admitted_once = True
    C.input_token_logprobs = [(-1.0, t, None) for t in ids[1:41]]  # positions 0..39 recorded
    s._match(C)
    assert len(C.prefix_indices) == 40  # resumes at the first unrecorded position
