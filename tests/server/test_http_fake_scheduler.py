"""The HTTP layer over a scripted scheduler (no model, no process): how each kind of
abort the scheduler reports reaches the client on every endpoint, and an /abort_request
that arrives while its request is still being built.

The scheduler's side is played by FakeScheduler: it answers each "add" with the finish
the test scripts, through the client's real output path (SchedulerClient._on_output)."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from portaserve.core.request_builder import Limits
from portaserve.server.app import create_app
from portaserve.server.manager import SchedulerClient
from portaserve.server_args import ServerArgs

OOM = {"type": "abort", "message": "out of KV cache memory", "status_code": 500}
REFUSED = {"type": "abort", "message": "the grammar matches nothing", "status_code": 400}
ABORTED = {"type": "abort", "message": "aborted by /abort_request"}  # no status: a plain abort


class FakeScheduler:
    """Stands in for the ZMQ socket to the scheduler: "add" answers (on the event loop)
    with two tokens and the scripted finish; "abort" of a request not yet answered
    finishes it as aborted, as the scheduler does for a waiting request."""

    def __init__(self, client: SchedulerClient, finish: dict, split: bool = False):
        self.client, self.finish, self.sent = client, finish, []
        self.split = split  # the tokens in one message, the finish in the next
        self.loop = asyncio.get_event_loop()
        self.open: set[str] = set()

    def send_pyobj(self, obj):
        self.sent.append(obj)
        if obj[0] == "add":
            self.open.add(obj[1].rid)
            if self.finish is not None:  # None: the request stays queued
                self.loop.call_soon(self._answer, obj[1].rid, self.finish)
        elif obj[0] == "abort" and obj[1] in self.open:
            self._answer(obj[1], ABORTED, tokens=[])

    def _answer(self, rid, finish, tokens=(5, 6)):
        if rid not in self.open:
            return
        if self.split and tokens:
            self.client._on_output({"rid": rid, "new_ids": list(tokens), "meta": {"completion_tokens": len(tokens)},
                                    "finished_reason": None}, 0.0)
            self.loop.call_later(0.05, self._answer, rid, finish, ())
            return
        self.open.discard(rid)
        self.client._on_output({"rid": rid, "new_ids": list(tokens), "meta": {"completion_tokens": len(tokens)},
                                "finished_reason": finish}, 0.0)


def _client(finish: dict, split: bool = False) -> tuple[SchedulerClient, FakeScheduler]:
    c = SchedulerClient(ServerArgs())
    c.limits = Limits(context_len=512, vocab_size=100, pool_tokens=4096)
    c.info = {"served_model_name": "fake"}
    c._send = FakeScheduler(c, finish, split)
    return c, c._send


def _run(finish: dict, fn, split: bool = False):
    async def main():
        c, fake = _client(finish, split)
        transport = httpx.ASGITransport(app=create_app(c))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await fn(http, c, fake)
    return asyncio.run(main())


GEN = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}
CMPL = {"model": "fake", "prompt": [1, 2, 3], "max_tokens": 4}


@pytest.mark.parametrize("finish,status", [(OOM, 500), (REFUSED, 400), (ABORTED, 200)])
def test_each_abort_kind_answers_the_same_status_on_every_endpoint(finish, status):
    """A scheduler fault (status 500) is an HTTP 500 with an error body, a refusal for the
    input (400) a 400, and a plain abort (no status: /abort_request) a 200 whose finish is
    "abort" with the tokens so far -- on /generate as on /v1/completions, as SGLang's
    tokenizer manager raises for aborts that carry a status."""
    async def fn(http, c, fake):
        return await http.post("/generate", json=GEN), await http.post("/v1/completions", json=CMPL)

    native, oai = _run(finish, fn)
    assert native.status_code == status and oai.status_code == status, (native.text, oai.text)
    if status != 200:
        for r in (native, oai):
            err = r.json()["error"]
            assert finish["message"] in err["message"]
            assert err["type"] == ("server_error" if status == 500 else "invalid_request_error")
    else:
        assert native.json()["meta_info"]["finish_reason"]["type"] == "abort"
        assert native.json()["output_ids"] == [5, 6]
        assert oai.json()["choices"][0]["finish_reason"] == "abort"


CONSTRAINED_GEN = {**GEN, "sampling_params": {**GEN["sampling_params"], "regex": "[ab]+"}}
CONSTRAINED_CMPL = {**CMPL, "regex": "[ab]+"}


@pytest.mark.parametrize("finish,status", [(OOM, 500), (REFUSED, 400)])
def test_a_constrained_stream_that_fails_before_its_first_token_gets_the_http_status(finish, status):
    """A constrained stream's headers wait for its first token (its grammar compiles in
    the scheduler): a failure before it is the HTTP error the unstreamed request gets, and
    the request is released.  An unconstrained stream starts at once (its failure is an
    event in the stream: the next test)."""
    async def fn(http, c, fake):
        c.limits = Limits(context_len=512, vocab_size=100, pool_tokens=4096, grammar=True)
        native = await http.post("/generate", json={**CONSTRAINED_GEN, "stream": True})
        oai = await http.post("/v1/completions", json={**CONSTRAINED_CMPL, "stream": True})
        plain = await http.post("/generate", json={**GEN, "stream": True})
        return native, oai, plain, dict(c.states)

    native, oai, plain, left = _run(finish, fn)
    for r in (native, oai):
        assert r.status_code == status, r.text
        assert finish["message"] in r.json()["error"]["message"]
    assert plain.status_code == 200 and finish["message"] in plain.text
    assert left == {}


def test_a_streamed_fault_ends_with_the_finish_it_carries():
    """A failure after the stream began (200, tokens sent): /generate's last chunk
    carries the abort with its status and message; /v1/completions sends an error event,
    then [DONE]."""
    async def fn(http, c, fake):
        native = await http.post("/generate", json={**GEN, "stream": True})
        oai = await http.post("/v1/completions", json={**CMPL, "stream": True})
        return native, oai

    native, oai = _run(OOM, fn, split=True)
    assert native.status_code == oai.status_code == 200
    events = [ln[6:] for ln in native.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["meta_info"]["finish_reason"] == OOM
    events = [ln[6:] for ln in oai.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert OOM["message"] in json.loads(events[-2])["error"]["message"]


def test_abort_request_while_the_request_is_being_built_is_not_lost():
    """/abort_request naming a request whose body is still being built (its long prompt
    tokenizing on the builder thread) used to find no such request and do nothing: the
    request then ran to the end.  Now submit sends the abort right after the add."""
    async def fn(http, c, fake):
        gate, entered = threading.Event(), threading.Event()
        real = c.off_loop

        async def slow_off_loop(f, *args):  # hold the build until the abort has been sent
            def held():
                entered.set()
                gate.wait(10)
                return f(*args)
            return await real(held)

        c.off_loop = slow_off_loop
        fake.finish = {"type": "length"}
        fake.loop = asyncio.get_running_loop()
        # the fake answers an add on the next loop turn; the abort it meets first wins
        gen = asyncio.create_task(http.post("/generate", json={**GEN, "rid": "r1"}))
        cmpl = asyncio.create_task(http.post("/v1/completions", json={**CMPL, "rid": "r2", "n": 2}))
        other = asyncio.create_task(http.post("/generate", json={**GEN, "rid": "r3"}))
        while not (entered.is_set() and {"r1", "r2", "r3"} <= {x for names, _ in c.building for x in names}):
            await asyncio.sleep(0.01)
        for rid in ("r1", "r2"):
            assert (await http.post("/abort_request", json={"rid": rid})).status_code == 200
        gate.set()
        return await gen, await cmpl, await other, c

    gen, cmpl, other, c = _run(ABORTED, fn)
    assert gen.json()["meta_info"]["finish_reason"]["type"] == "abort", gen.json()
    assert [ch["finish_reason"] for ch in cmpl.json()["choices"]] == ["abort", "abort"]
    assert other.json()["meta_info"]["finish_reason"] == {"type": "length"}  # not named: runs
    assert not c.building  # nothing kept after the requests


def test_an_early_abort_is_scoped_to_the_request_being_built():
    """An abort named while a request is built applies to that request's ids only: not to
    another request submitted meanwhile whose id looks like a copy of the name, and one
    choice named ("b-1") aborts that choice only (found by review)."""
    async def main():
        c, fake = _client({"type": "length"})
        from portaserve.core.request import Req
        from portaserve.core.sampling_params import SamplingParams

        with c.building_request("a") as aborted_a:
            c.abort("a")
            c.submit([Req("a-7", [1, 2], SamplingParams())])  # another request, not built under "a"
            c.submit([Req("a", [1, 2], SamplingParams())], aborted=aborted_a)
        with c.building_request("b") as aborted_b:
            c.abort("b-1")
            c.submit([Req("b-0", [1, 2], SamplingParams()), Req("b-1", [1, 2], SamplingParams())],
                     aborted=aborted_b)
        return [m[1] for m in fake.sent if m[0] == "abort"], c

    aborts, c = asyncio.run(main())
    assert "a-7" not in aborts and "a" in aborts
    assert "b-1" in aborts and "b-0" not in aborts
    assert not c.building


def test_an_abort_for_an_unknown_id_is_not_kept():
    """An id no request is being built under (one that finished, or a typo) leaves no
    trace: a later request reusing the id runs normally."""
    async def fn(http, c, fake):
        fake.finish = {"type": "length"}
        await http.post("/abort_request", json={"rid": "done-before"})
        return await http.post("/generate", json={**GEN, "rid": "done-before"})

    r = _run(ABORTED, fn)
    assert r.json()["meta_info"]["finish_reason"] == {"type": "length"}


def test_a_prompt_longer_than_the_kv_pool_is_context_length_exceeded():
    """A pool smaller than the context: a prompt that alone does not fit names the prompt
    with OpenAI's code (clients trim and retry on it), not the max_tokens it never sent."""
    async def fn(http, c, fake):
        c.limits = Limits(context_len=512, vocab_size=100, pool_tokens=8)
        long = list(range(1, 11))
        cmpl = await http.post("/v1/completions", json={**CMPL, "prompt": long, "max_tokens": 1})
        gen = await http.post("/generate", json={"input_ids": long, "sampling_params": {"max_new_tokens": 1}})
        fits = await http.post("/generate", json={"input_ids": long[:5], "sampling_params": {"max_new_tokens": 9}})
        return cmpl, gen, fits, len(fake.sent)

    cmpl, gen, fits, sent = _run(ABORTED, fn)
    for r in (cmpl, gen):
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", err
        assert err["param"] in ("prompt", "text"), err
        assert "KV cache holds 8 tokens" in err["message"] and "the prompt has 10 tokens" in err["message"]
    assert fits.status_code == 400 and fits.json()["error"]["param"] == "max_new_tokens"  # its sum
    assert sent == 0


def test_top_logprobs_are_capped_by_the_server_limit():
    """--max-top-logprobs-num narrows OpenAI's 0-20 on /v1/completions and bounds
    /generate's top_logprobs_num; within it the request runs."""
    async def fn(http, c, fake):
        c.limits = Limits(context_len=512, vocab_size=100, pool_tokens=4096, max_top_logprobs=2)
        over = await http.post("/v1/completions", json={**CMPL, "logprobs": 3})
        gen_over = await http.post("/generate", json={**GEN, "return_logprob": True, "top_logprobs_num": 3})
        ok = await http.post("/generate", json={**GEN, "return_logprob": True, "top_logprobs_num": 2})
        return over, gen_over, ok, len(fake.sent)

    over, gen_over, ok, sent = _run(ABORTED, fn)
    assert over.status_code == 400 and over.json()["error"]["param"] == "logprobs"
    assert "between 0 and 2" in over.json()["error"]["message"]
    assert "--max-top-logprobs-num" in over.json()["error"]["message"]
    assert gen_over.status_code == 400 and gen_over.json()["error"]["param"] == "top_logprobs_num"
    assert ok.status_code == 200 and sent == 1  # only the request within the limit was sent


def test_a_body_over_the_size_limit_is_a_413_whether_or_not_its_length_is_declared():
    async def main():
        c, fake = _client(ABORTED)
        c.args = ServerArgs(max_request_body_mb=1)
        big = json.dumps({**GEN, "text": "x" * (1 << 20)}).encode()

        async def chunks():  # no Content-Length: chunked transfer
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        transport = httpx.ASGITransport(app=create_app(c))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            declared = await http.post("/generate", content=big, headers={"content-type": "application/json"})
            chunked = await http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
            small = await http.post("/generate", json=GEN)
        return declared, chunked, small, len(fake.sent)

    declared, chunked, small, sent = asyncio.run(main())
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and "--max-request-body-mb" in err["message"]
    assert small.status_code == 200 and sent == 1


def test_a_client_gone_before_the_first_token_releases_its_requests():
    """While a constrained stream's headers wait for its first token, a client that went
    away is noticed (within a second) and its requests are aborted."""
    from portaserve.server.common import make_req, start_stream, submit

    class GoneRequest:
        async def is_disconnected(self):
            return True

    async def main():
        c, fake = _client(None)  # the scheduler never answers: the request stays queued
        c.limits = Limits(context_len=512, vocab_size=100, pool_tokens=4096, grammar=True)
        states = submit(c, [make_req(c, None, [1, 2, 3], {"max_new_tokens": 4, "regex": "[ab]+"})])
        started = await start_stream(c, states, GoneRequest())
        return started, dict(c.states), fake.sent

    started, left, sent = asyncio.run(main())
    assert started is False and left == {}
    assert [m[0] for m in sent] == ["add", "abort"]


def test_a_constrained_stream_still_queued_after_the_hold_starts(monkeypatch):
    """The hold is bounded: a constrained request still queued after it streams as usual
    (headers out, tokens when they come)."""
    import time

    from portaserve.server import common
    from portaserve.server.common import make_req, start_stream, submit

    class Here:
        async def is_disconnected(self):
            return False

    monkeypatch.setattr(common, "HOLD_HEADERS_S", 0.3)

    async def main():
        c, fake = _client(None)
        c.limits = Limits(context_len=512, vocab_size=100, pool_tokens=4096, grammar=True)
        states = submit(c, [make_req(c, None, [1, 2, 3], {"max_new_tokens": 4, "regex": "[ab]+"})])
        t0 = time.monotonic()
        started = await start_stream(c, states, Here())
        return started, time.monotonic() - t0, len(c.states)

    started, waited, live = asyncio.run(main())
    assert started is True and 0.25 < waited < 2.0 and live == 1


class HeldCheck:
    """A constraint (text) whose check blocks until release(); entered is set once it runs.
    Fresh per test: verdicts are cached per text."""

    def __init__(self, monkeypatch):
        import uuid

        from portaserve.core import grammar

        self.tag = uuid.uuid4().hex[:8]
        self.text = f"slow{self.tag}[a-z]+"
        self.gate, self.entered = threading.Event(), threading.Event()
        real = grammar._validate

        def held(kind, text):
            if text == self.text:
                self.entered.set()
                assert self.gate.wait(20)
            return real(kind, text)

        monkeypatch.setattr(grammar, "_validate", held)

    async def running(self):
        while not self.entered.is_set():
            await asyncio.sleep(0.01)

    def release(self):
        self.gate.set()


def _grammar_on(c, fake):
    c.limits = Limits(context_len=512, vocab_size=100, pool_tokens=4096, grammar=True)
    fake.finish = {"type": "length"}
    fake.loop = asyncio.get_running_loop()


def test_a_slow_constraint_check_holds_only_its_own_request(monkeypatch):
    """Constraints are checked before their request is built, off the one building thread
    (common.check_constraints): while one constraint's check runs (held here; seconds for a
    regex near the 1 MiB limit), an unconstrained request and one with another constraint
    are built, answered, and the held one is answered after.  A bad constraint is refused
    with the build's wording, whether its verdict is new or cached."""
    check = HeldCheck(monkeypatch)
    slow, other, bad = check.text, f"fast{check.tag}[0-9]+", f"bad{check.tag}[a-z"

    async def fn(http, c, fake):
        _grammar_on(c, fake)
        try:
            held_req = asyncio.create_task(http.post("/generate", json={
                **GEN, "sampling_params": {"max_new_tokens": 4, "regex": slow}}))
            await check.running()
            plain = await http.post("/v1/completions", json=CMPL)
            constrained = await http.post("/v1/completions", json={**CMPL, "regex": other})
            refused = [await http.post("/generate", json={**GEN, "sampling_params": {"regex": bad}})
                       for _ in range(2)]  # the second finds the first's verdict
            still_held = not held_req.done()
        finally:
            check.release()
        return plain, constrained, refused, still_held, await held_req, fake

    plain, constrained, refused, still_held, held_r, fake = _run(ABORTED, fn)
    assert still_held
    assert plain.status_code == 200 and constrained.status_code == 200, (plain.text, constrained.text)
    assert held_r.status_code == 200, held_r.text
    assert held_r.json()["meta_info"]["finish_reason"] == {"type": "length"}
    for r in refused:
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "regex" and err["message"].startswith("invalid regex"), err
    assert refused[0].json() == refused[1].json()
    added = [m[1].sampling.regex for m in fake.sent if m[0] == "add"]
    assert added[-1] == slow and set(added) == {None, other, slow}  # the held one was added last


def test_abort_request_during_a_constraint_check_is_not_lost(monkeypatch):
    """An /abort_request naming a request whose constraint is still being checked (before
    its build) aborts it: the check runs inside building_request (found by review)."""
    check = HeldCheck(monkeypatch)

    async def fn(http, c, fake):
        _grammar_on(c, fake)
        try:
            held_req = asyncio.create_task(http.post("/generate", json={
                **GEN, "rid": "r-checked", "sampling_params": {"max_new_tokens": 4, "regex": check.text}}))
            await check.running()
            assert (await http.post("/abort_request", json={"rid": "r-checked"})).status_code == 200
        finally:
            check.release()
        return await held_req

    r = _run(ABORTED, fn)
    assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "abort", r.text
