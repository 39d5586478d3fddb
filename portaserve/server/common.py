"""Helpers shared by the OpenAI and native endpoints: building requests, waiting for
them, streaming them, token texts for logprobs."""
from __future__ import annotations

import asyncio
import json
import re
from typing import AsyncIterator, Optional

from portaserve.core.request import Req
from portaserve.core.request_builder import build_req
from portaserve.core.sampling_params import InvalidRequest
from portaserve.server.errors import APIError, from_invalid
from portaserve.server.manager import Overloaded, ReqState, SchedulerClient, SchedulerDead


def overloaded_error(e: Exception) -> APIError:
    return APIError(503, str(e), "server_error", None, "overloaded", headers={"Retry-After": "1"})


def dead_error(message: str) -> APIError:
    return APIError(503, f"the engine is unavailable: {message}", "server_error", None,
                    "engine_dead")


def make_req(client: SchedulerClient, prompt, input_ids, sp: dict, return_logprob=False,
             logprob_start_len=None, top_logprobs_num=None, rid=None, rename=None,
             prefix: str = "", param_rename=None) -> Req:
    """build_req with the engine's limits; InvalidRequest -> 400 (names renamed for the
    API at hand, e.g. max_new_tokens -> max_tokens; param_rename: only the param)."""
    try:
        return build_req(client.limits, client.tokenizer, prompt, input_ids, sp, return_logprob,
                         logprob_start_len, top_logprobs_num, rid)
    except InvalidRequest as e:
        err = from_invalid(e, prefix)
        for old, new in (rename or {}).items():  # whole words: a property json_schema_v stays
            err.message = re.sub(rf"\b{re.escape(old)}\b", new, err.message)
            if err.param == old:
                err.param = new
        err.param = (param_rename or {}).get(err.param, err.param)
        raise err


async def check_constraints(client: SchedulerClient, sps) -> None:
    """Check the constraints of these sampling params (dicts; others are the build's to
    refuse) on the checking threads (grammar.check_ahead) before the request is built: the
    build then finds each verdict, and other requests are not built behind a large
    constraint's check.  Called inside building_request, so an /abort_request meanwhile
    still applies."""
    if client.limits is None or not client.limits.grammar:
        return
    from portaserve.core.grammar import KINDS, check_ahead

    work = [(k, sp[k]) for sp in sps if isinstance(sp, dict) for k in KINDS if sp.get(k) is not None]
    futures = check_ahead(work) if work else []
    if not futures:
        return
    client.checks.update(futures)
    waits = [asyncio.wrap_future(f) for f in futures]
    for w in waits:  # a check's outcome is the build's to report: read here only so that
        w.add_done_callback(_quiet)  # asyncio does not log a refused constraint's traceback
    try:
        await asyncio.wait(waits)
    finally:
        client.checks.difference_update(futures)


def _quiet(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def submit(client: SchedulerClient, reqs: list[Req], aborted: Optional[set] = None) -> list[ReqState]:
    try:
        return client.submit(reqs, aborted=aborted)
    except Overloaded as e:
        raise overloaded_error(e)
    except SchedulerDead as e:
        raise dead_error(str(e))


def check_errors(client: SchedulerClient, states: list[ReqState]) -> None:
    """503 if the engine died, 500 if a request's output could not be processed."""
    for st in states:
        if st.error is not None:
            if client.dead is not None:
                raise dead_error(st.error)
            raise APIError(500, st.error, "server_error", None, "internal_error")


async def wait_all(client: SchedulerClient, states: list[ReqState], request=None) -> None:
    """Wait until every state finished; abort them all if the client goes away."""
    event = states[0].event
    loop = asyncio.get_running_loop()
    next_check = loop.time() + 1.0
    try:
        while not all(st.finished for st in states):
            try:
                await asyncio.wait_for(event.wait(), timeout=1.0)
                event.clear()
            except asyncio.TimeoutError:
                pass
            # check about once a second whether tokens are flowing or not: a busy request
            # sets the event every step and would otherwise never look
            if request is not None and loop.time() >= next_check:
                next_check = loop.time() + 1.0
                if await request.is_disconnected():
                    return
        check_errors(client, states)
    finally:
        for st in states:
            client.release(st)


HOLD_HEADERS_S = 10.0


async def start_stream(client: SchedulerClient, states: list[ReqState], request) -> bool:
    """Hold a constrained stream's headers until its first token or its end, for up to
    HOLD_HEADERS_S: its constraint compiles in the scheduler, and one that fails to (or
    matches nothing) then gets a 400 with an error body, as unstreamed, not a 200 whose
    stream carries the error.  Other streams start at once (their headers tell a client
    it is queued), as do constrained ones still waiting after the hold; a failure after
    that ends the stream with an error event.  False if the client went away meanwhile
    (the requests are aborted)."""
    if not any(st.req.constraint() for st in states):
        return True
    event = states[0].event
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HOLD_HEADERS_S
    while not any(st.output_ids or st.finished for st in states) and loop.time() < deadline:
        event.clear()  # (set again by the next output; follow() then starts from it)
        try:
            await asyncio.wait_for(event.wait(), timeout=min(1.0, max(deadline - loop.time(), 0.0)))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                for st in states:
                    client.release(st)
                return False
    if any(st.error is not None or failed(st.finished_reason) for st in states):
        try:
            check_errors(client, states)
            check_abort(states)
        finally:
            for st in states:
                client.release(st)
    return True


async def follow(client: SchedulerClient, states: list[ReqState]) -> AsyncIterator[None]:
    """Yield each time any of states progressed; the caller reads the states.  Stops
    after all finished.  Leaving early (client disconnect) aborts the unfinished ones."""
    event = states[0].event
    try:
        while True:
            await event.wait()
            event.clear()
            for st in states:
                if st.error is not None:
                    raise SchedulerDead(st.error)
            yield
            if all(st.finished for st in states):
                return
    finally:
        for st in states:
            client.release(st)


def failed(fr: Optional[dict]) -> bool:
    """An abort with a status is a failure (400: refused for its input, found in the
    scheduler; 500: a server fault).  One without (an /abort_request) ends the answer like
    any finish, with finish_reason "abort" and the text so far, as in SGLang."""
    return fr is not None and fr.get("type") == "abort" and fr.get("status_code") is not None


def abort_event(fr: dict) -> bytes:
    if fr.get("status_code") == 400:
        return sse_error(fr.get("message", ""), "invalid_request_error")
    return sse_error(f"the request was aborted: {fr.get('message', '')}", code="aborted")


def check_abort(states: list[ReqState]) -> None:
    for st in states:
        fr = st.finished_reason
        if failed(fr):
            if fr.get("status_code") == 400:
                raise APIError(400, fr.get("message", ""), "invalid_request_error", fr.get("param"))
            raise APIError(500, f"the request was aborted: {fr.get('message', '')}", "server_error",
                           None, "aborted")


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(message: str, type_: str = "server_error", code: Optional[str] = None) -> bytes:
    return sse({"error": {"message": message, "type": type_, "param": None, "code": code}})


class TokenTexts:
    """Text of single tokens (for logprobs), cached."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        s = self.cache.get(tid)
        if s is None:
            if self.tok is None:
                return ""
            s = self.tok.decode([tid], skip_special_tokens=False)
            if len(self.cache) < 200_000:
                self.cache[tid] = s
        return s
