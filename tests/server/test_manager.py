"""The HTTP side's scheduler client without a scheduler process: its receive loop keeps
serving every other request when processing one request's output fails."""
from __future__ import annotations

import asyncio
import types

import zmq

from portaserve.core.request import Req
from portaserve.core.sampling_params import SamplingParams
from portaserve.server.manager import SchedulerClient


ARGS = types.SimpleNamespace(max_running_requests=4, max_queued_requests=None, log_requests=False)


class FakeRecv:
    def __init__(self, messages):
        self.messages = list(messages)

    async def recv_pyobj(self):
        if not self.messages:
            raise zmq.ZMQError()  # the socket closed: the loop ends
        return self.messages.pop(0)


class FakeSend:
    def __init__(self):
        self.sent = []

    def send_pyobj(self, obj):
        self.sent.append(obj)


def test_a_failing_output_fails_only_its_request():
    async def main():
        c = SchedulerClient(ARGS)
        c._send = FakeSend()
        bad, good, done = (Req(rid, [1, 2], SamplingParams()) for rid in ("bad", "good", "done"))
        states = {st.rid: st for st in c.submit([bad, good, done])}

        def boom(msg):
            raise TypeError("simulated: cannot process this output")

        states["bad"].absorb = boom  # processing "bad"'s output raises
        states["done"].absorb = lambda msg: (setattr(states["done"], "finished_reason", {"type": "length"}),
                                             boom(msg))  # ... after its finish was recorded
        c._recv = FakeRecv([("out", [{"rid": "bad", "new_ids": [5]}, {"rid": "done", "new_ids": [6]},
                                     {"rid": "good", "new_ids": [7], "meta": {}, "finished_reason": None}]),
                            ("out", [{"rid": "good", "new_ids": [8], "meta": {}, "finished_reason": {"type": "length"}}])])
        await c._recv_loop()
        return c, states

    c, states = asyncio.run(main())
    assert "processing the output failed" in states["bad"].error and "simulated" in states["bad"].error
    assert ("abort", "bad") in c._send.sent  # the scheduler frees its KV
    assert states["done"].error is not None and ("abort", "done") not in c._send.sent  # already finished there
    assert states["good"].error is None and states["good"].output_ids == [7, 8]
    assert states["good"].finished_reason == {"type": "length"}
    for st in states.values():
        c.release(st)
    assert c.num_inflight == 0 and not c.states


def test_scheduler_process_exits_after_its_loop_crashes(tmp_path, monkeypatch):
    """A crash in the scheduler loop sends "fatal" and the process ends. (Its receiving
    socket was left open, and ctx.term() then blocked for good: the crashed process held
    its memory, on a GPU its device memory, after the server had gone.)"""
    import threading

    import portaserve.runtime
    from portaserve.server import scheduler_process as sp

    from portaserve.core.request_builder import Limits

    rt = types.SimpleNamespace(limits=lambda: Limits(context_len=8, vocab_size=8, pool_tokens=8),
                               info=lambda: {}, startup_report=lambda: "",
                               model_config=types.SimpleNamespace(architecture="x", model_type="x"))

    def crash(*a):
        raise RuntimeError("simulated crash in the loop")

    monkeypatch.setattr(portaserve.runtime, "build_runtime", lambda args: rt)
    monkeypatch.setattr(sp, "_loop", crash)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(f"ipc://{tmp_path}/out")
    push.bind(f"ipc://{tmp_path}/in")
    ended = []

    def run():
        try:
            sp.run_scheduler_process(types.SimpleNamespace(log_level="warning"), f"ipc://{tmp_path}/in",
                                     f"ipc://{tmp_path}/out", 0)
        except SystemExit as e:
            ended.append(e.code)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert pull.poll(10000) and "ready" in pull.recv_pyobj()
        assert pull.poll(10000) and pull.recv_pyobj()[0] == "fatal"
        t.join(timeout=10)
        assert not t.is_alive(), "the scheduler process hung after its loop crashed"
        assert ended == [1]
    finally:
        pull.close(linger=0)
        push.close(linger=0)
        ctx.term()


def test_a_scheduler_too_busy_to_answer_is_not_called_dead():
    """A command the live scheduler does not answer in time (a long prefill holds it) is a
    503 saying it is busy, not engine_dead; /flush_cache's once escaped as a 500."""
    import pytest

    from portaserve.server import native_api
    from portaserve.server.errors import APIError

    class Busy:
        async def call(self, *a, **k):
            raise asyncio.TimeoutError

    with pytest.raises(APIError) as e:
        asyncio.run(native_api._stats_or_503(Busy()))
    assert e.value.status == 503 and e.value.code == "scheduler_busy"
    req = types.SimpleNamespace(app=types.SimpleNamespace(state=types.SimpleNamespace(client=Busy())))
    with pytest.raises(APIError) as e:
        asyncio.run(native_api.flush_cache(req))
    assert e.value.status == 503 and e.value.code == "scheduler_busy"


def test_a_released_id_stays_taken_until_its_last_message():
    """A request released unfinished (its client went away) is aborted; the scheduler's
    messages for it may still be on their way, so a new request reusing the id (a retry)
    is refused until the last one arrives, and never receives the old request's tokens."""
    from portaserve.server.errors import APIError

    async def main():
        c = SchedulerClient(ARGS)
        c._send = FakeSend()
        old = c.submit([Req("x", [1, 2], SamplingParams())])[0]
        c.release(old)
        assert ("abort", "x") in c._send.sent
        try:
            c.submit([Req("x", [1, 2], SamplingParams())])
            raise AssertionError("the id was reused while the old request's messages were in flight")
        except APIError as e:
            assert e.status == 400 and "already in use" in e.message
        c._recv = FakeRecv([("out", [{"rid": "x", "new_ids": [5], "meta": {}, "finished_reason": None}]),
                            ("out", [{"rid": "x", "new_ids": [], "meta": {},
                                      "finished_reason": {"type": "abort"}}])])
        await c._recv_loop()
        new = c.submit([Req("x", [1, 2], SamplingParams())])[0]  # the id is free again
        c._recv = FakeRecv([("out", [{"rid": "x", "new_ids": [9], "meta": {},
                                      "finished_reason": {"type": "length"}}])])
        await c._recv_loop()
        return new

    new = asyncio.run(main())
    assert new.output_ids == [9] and new.finished_reason == {"type": "length"}
