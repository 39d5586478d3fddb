"""SGLang's native API: /generate, /get_model_info, /server_info, /flush_cache, /start_profile,
/stop_profile, /health,
/health_generate, /abort_request.  Shapes follow SGLang 0.5 so that its frontend client
(``sgl.RuntimeEndpoint``) works unmodified."""
from __future__ import annotations

import asyncio
import os
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from portaserve.core.request_builder import copy_params
from portaserve.core.sampling_params import MAX_N, lax_int
from portaserve.server.common import (SSE_DONE, check_abort, check_constraints, dead_error, follow, make_req, sse,
                                      sse_error, start_stream, submit, wait_all)
from portaserve.server.errors import APIError, bad_request, get, read_json_object, refuse_unsupported
from portaserve.server.manager import ReqState, SchedulerDead

router = APIRouter()


def _client(request: Request):
    return request.app.state.client


def _per_item(value, i: int, n: int, name: str):
    """SGLang lets several fields be a single value or one per batch item."""
    if isinstance(value, list):
        if len(value) != n:
            raise bad_request(f"{name} has {len(value)} entries for {n} prompts", name)
        return value[i]
    return value


def _logprob_list(entries, texts, with_text: bool):
    if not with_text:
        return [list(e) for e in entries]
    return [[lp, tid, texts(tid)] for lp, tid, _ in entries]


def _top_list(entries, texts, with_text: bool):
    return [None if pos is None else _logprob_list(pos, texts, with_text) for pos in entries]


def native_result(st: ReqState, texts, with_text: bool, cumulative_text: str = None) -> dict:
    meta = {"id": st.rid, "finish_reason": st.finished_reason,
            "prompt_tokens": st.meta["prompt_tokens"],
            "completion_tokens": st.meta["completion_tokens"],
            "cached_tokens": st.meta["cached_tokens"],
            "e2e_latency": time.perf_counter() - st.created}
    if st.req.return_logprob:
        lp = st.logprobs
        meta["input_token_logprobs"] = _logprob_list(lp["input_token_logprobs"], texts, with_text)
        meta["output_token_logprobs"] = _logprob_list(lp["output_token_logprobs"], texts, with_text)
        if st.req.top_logprobs_num:
            meta["input_top_logprobs"] = _top_list(lp["input_top_logprobs"], texts, with_text)
            meta["output_top_logprobs"] = _top_list(lp["output_top_logprobs"], texts, with_text)
    text = st.text if cumulative_text is None else cumulative_text
    return {"text": text, "output_ids": list(st.output_ids), "meta_info": meta}


# SGLang's /generate fields this server cannot honour: refused, not ignored
UNSUPPORTED_FIELDS = {
    "input_embeds": "input_embeds is not supported; give text or input_ids",
    "image_data": "image inputs are not supported", "audio_data": "audio inputs are not supported",
    "video_data": "video inputs are not supported", "lora_path": "LoRA adapters are not supported",
    "lora_id": "LoRA adapters are not supported", "session_params": "sessions are not supported",
    "custom_logit_processor": "custom logit processors are not supported",
    "return_hidden_states": "return_hidden_states is not supported",
    "token_ids_logprob": "token_ids_logprob is not supported; use top_logprobs_num",
}


def _build_reqs(client, body: dict):
    refuse_unsupported(body, UNSUPPORTED_FIELDS)
    text = body.get("text")
    input_ids = body.get("input_ids")
    if text is None and input_ids is None:
        raise bad_request("give text or input_ids", "text")
    if text is not None and input_ids is not None:
        raise bad_request("give text or input_ids, not both", "text")
    if text is not None:
        if not isinstance(text, (str, list)) or (isinstance(text, list)
                                                 and not all(isinstance(t, str) for t in text)):
            raise bad_request("text must be a string or a list of strings", "text")
        batch = isinstance(text, list)
        items = text if batch else [text]
    else:
        if not isinstance(input_ids, list):
            raise bad_request("input_ids must be a list of integers or a list of lists", "input_ids")
        batch = bool(input_ids) and isinstance(input_ids[0], list)
        items = input_ids if batch else [input_ids]
    if batch and not items:
        raise bad_request("the batch is empty", "text" if text is not None else "input_ids")
    n = len(items)
    sps = body.get("sampling_params")
    if sps is not None and not isinstance(sps, (dict, list)):
        raise bad_request("sampling_params must be an object (or a list of them)", "sampling_params")
    rids = body.get("rid")
    if rids is not None and not isinstance(rids, (str, list)):
        raise bad_request("rid must be a string (or a list of strings)", "rid")
    if batch and isinstance(rids, str):  # prompt i runs as "<rid>-i" (SGLang 0.5: "<rid>_i"),
        rids = [f"{rids}-{i}" for i in range(n)]  # so that /abort_request <rid> names them all
    reqs = []
    for i in range(n):
        sp = _per_item(sps, i, n, "sampling_params") or {}
        if not isinstance(sp, dict):
            raise bad_request("sampling_params must be an object", "sampling_params")
        sp = dict(sp)
        copies = lax_int(sp.pop("n", 1))
        if isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= MAX_N:
            raise bad_request(f"n must be an integer from 1 to {MAX_N}, got {copies!r}", "n")
        rl = _per_item(body.get("return_logprob") or False, i, n, "return_logprob")
        lsl = _per_item(body.get("logprob_start_len"), i, n, "logprob_start_len")
        tln = _per_item(body.get("top_logprobs_num"), i, n, "top_logprobs_num")
        rid = _per_item(rids, i, n, "rid")
        if rid is not None and not isinstance(rid, str):
            raise bad_request("rid must be a string", "rid")
        if type(rl) is int and rl in (0, 1):  # as pydantic takes a boolean
            rl = bool(rl)
        if not isinstance(rl, bool):
            raise bad_request("return_logprob must be a boolean", "return_logprob")
        prompt, ids = (items[i], None) if text is not None else (None, items[i])
        for j in range(copies):
            r = make_req(client, prompt, ids, copy_params(sp, j), rl, lsl, tln,
                         (rid if copies == 1 else f"{rid}-{j}") if rid else None,
                         prefix=f"item {i}: " if batch else "")
            prompt, ids = None, r.input_ids  # the copies reuse the first one's tokens
            reqs.append(r)
    return reqs, batch or len(reqs) > 1


@router.api_route("/generate", methods=["POST", "PUT"])
async def generate(request: Request):
    client = _client(request)
    body = await read_json_object(request)
    stream = get(body, "stream", bool, False)
    with_text = get(body, "return_text_in_logprobs", bool, False)
    sps = body.get("sampling_params")
    with client.building_request(body.get("rid")) as aborted:  # an /abort_request meanwhile
        await check_constraints(client, sps if isinstance(sps, list) else [sps])
        reqs, batch = await client.off_loop(_build_reqs, client, body)
        states = submit(client, reqs, aborted)
    texts = request.app.state.token_texts
    if not stream:
        await wait_all(client, states, request)
        # refused in the scheduler for its input (400: a grammar that matches nothing) or
        # failed there (500: out of KV memory), as SGLang raises for such aborts
        check_abort(states)
        def render():  # off the event loop: with many top logprobs a response runs to megabytes
            out = [native_result(st, texts, with_text) for st in states]
            return JSONResponse(out if batch else out[0])

        return await client.off_loop(render)

    async def gen():
        try:
            async for _ in follow(client, states):
                for i, st in enumerate(states):
                    if st.detok is not None:
                        delta = st.detok.pop_delta(st.finished_reason is not None)
                    else:
                        delta = ""
                    new_ids = len(st.output_ids) > st.sent_ids
                    if not (delta or new_ids or st.finished_reason is not None) or st.sent_ids < 0:
                        continue
                    st.sent_ids = len(st.output_ids) if st.finished_reason is None else -1
                    text = st.detok.text[:st.detok.sent] if st.detok is not None else ""
                    chunk = native_result(st, texts, with_text, text)
                    if batch:
                        chunk["index"] = i
                    yield sse(chunk)
        except SchedulerDead as e:
            yield sse_error(str(dead_error(str(e))), code="engine_dead")
        yield SSE_DONE

    if not await start_stream(client, states, request):
        return Response(status_code=499)  # the client left before the first token
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/get_model_info")
@router.get("/model_info")
async def get_model_info(request: Request):
    c = _client(request)
    a = c.args
    return {"model_path": c.info.get("model_path"),
            "tokenizer_path": a.tokenizer_path or c.info.get("model_path"),
            "served_model_name": c.info.get("served_model_name"),
            "is_generation": True,
            "preferred_sampling_params": c.limits.sampling_defaults or None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": c.model_type,
            "architectures": [c.info.get("architecture")],
            "context_length": c.info.get("context_length"),
            # lets clients (portaserve.lang's RuntimeEndpoint) render roles like the server
            "chat_template": getattr(c.tokenizer, "chat_template", None),
            "bos_token": getattr(c.tokenizer, "bos_token", None),
            "eos_token": getattr(c.tokenizer, "eos_token", None)}


def _public_args(args) -> dict:
    import dataclasses

    d = dataclasses.asdict(args)
    if d.get("api_key"):
        d["api_key"] = "***"
    return d


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(request: Request):
    from portaserve import __version__

    c = _client(request)
    stats = await _stats_or_503(c)
    return {**_public_args(c.args), **c.info, "version": __version__,
            "kv": stats["kv"], "counters": stats["counters"],
            "internal_states": [{"num_waiting": stats["num_waiting"],
                                 "num_running": stats["num_running"],
                                 "cache_hit_rate": stats["cache_hit_rate"],
                                 "kv": stats["kv"]}],
            "http": {"in_flight": c.num_inflight, "queued": c.num_queued,
                     "pid": os.getpid(), "scheduler_pid": c.proc.pid if c.proc else None},
            "limits": {"context_len": c.limits.context_len, "vocab_size": c.limits.vocab_size,
                       "pool_tokens": c.limits.pool_tokens, "grammar": c.limits.grammar}}


def busy_error(seconds: int) -> APIError:
    """A command the scheduler, alive, did not answer in time (a long step holds it)."""
    return APIError(503, f"the scheduler is busy and did not answer within {seconds} s; try again",
                    "server_error", None, "scheduler_busy")


async def _stats_or_503(c):
    try:
        return await c.call("stats")
    except SchedulerDead as e:
        raise dead_error(str(e))
    except asyncio.TimeoutError:
        raise busy_error(30)


@router.api_route("/flush_cache", methods=["POST", "GET"])
async def flush_cache(request: Request):
    c = _client(request)
    try:
        ok = await c.call("flush_cache")
    except SchedulerDead as e:
        raise dead_error(str(e))
    except asyncio.TimeoutError:
        raise busy_error(30)
    if ok:
        return Response("Cache flushed.\nPlease check backend logs for more details. "
                        "(When there are running or waiting requests, the operation will not be performed.)\n",
                        status_code=200)
    return Response("Cache not flushed: requests are in flight.\n", status_code=400)


@router.api_route("/start_profile", methods=["POST", "GET"])
async def start_profile(request: Request):
    """torch.profiler over the scheduler's next steps (SGLang's /start_profile). Optional
    JSON body: output_dir (default $PORTASERVE_TORCH_PROFILER_DIR, else
    /tmp/portaserve-profile), num_steps (stop by itself after that many steps),
    activities (e.g. ["cpu", "cuda"]), record_shapes, with_stack (Python functions too)."""
    body = await read_json_object(request) if (await request.body()).strip() else {}
    known = {"output_dir", "num_steps", "activities", "record_shapes", "with_stack"}
    extra = sorted(set(body) - known)
    if extra:
        raise bad_request(f"unknown field(s) {extra}; /start_profile takes {sorted(known)}", extra[0])
    opts = {"output_dir": get(body, "output_dir", str), "num_steps": get(body, "num_steps", int),
            "activities": get(body, "activities", list), "record_shapes": get(body, "record_shapes", bool, False),
            "with_stack": get(body, "with_stack", bool, False)}
    return await _profile_call(request, "start_profile", opts)


@router.api_route("/stop_profile", methods=["POST", "GET"])
async def stop_profile(request: Request):
    """Stop the profiler: each rank writes <output_dir>/<stamp>-pid<P>-rank<R>.trace.json.gz and a summary
    of device time per step kind (extend / mixed / decode) beside it."""
    return await _profile_call(request, "stop_profile")


async def _profile_call(request, kind: str, *args):
    c = _client(request)
    try:
        # stopping writes and summarises the trace on the scheduler: allow it time
        res = await c.call(kind, *args, timeout=600)
    except SchedulerDead as e:
        raise dead_error(str(e))
    except asyncio.TimeoutError:
        raise busy_error(600)
    if "error" in res:
        if res.get("status") == 500:
            raise APIError(500, res["error"], "internal_error", None, "profiler")
        raise bad_request(res["error"], None, "profiler")
    return JSONResponse(res["ok"])


@router.api_route("/health", methods=["GET", "POST"])
async def health(request: Request):
    c = _client(request)
    if c.dead is not None:
        return Response(f"unhealthy: {c.dead}\n", status_code=503)
    return Response(status_code=200)


@router.api_route("/health_generate", methods=["GET", "POST"])
async def health_generate(request: Request):
    """Runs one real token through the whole path (SGLang does the same)."""
    c = _client(request)
    if c.dead is not None:
        return Response(f"unhealthy: {c.dead}\n", status_code=503)
    req = make_req(c, None, [0], {"max_new_tokens": 1, "temperature": 0},
                   rid=f"HEALTH_CHECK_{uuid.uuid4().hex}")
    try:
        states = c.submit([req])
    except Exception as e:  # noqa: BLE001 - dead or overloaded
        return Response(f"unhealthy: {e}\n", status_code=503)
    try:
        await asyncio.wait_for(wait_all(c, states), timeout=20)
    except Exception as e:  # noqa: BLE001 - any failure means unhealthy
        return Response(f"unhealthy: {e}\n", status_code=503)
    return Response(status_code=200)


@router.post("/abort_request")
async def abort_request(request: Request):
    c = _client(request)
    body = await read_json_object(request)
    if get(body, "abort_all", bool, False):
        for rid in list(c.states):
            c.abort(rid)
        return Response(status_code=200)
    rid = get(body, "rid", str)
    if not rid:
        raise bad_request("give rid (or abort_all: true)", "rid")
    c.abort(rid)
    return Response(status_code=200)
