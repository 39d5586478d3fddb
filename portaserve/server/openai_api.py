"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

Choices: an unknown ``model`` is a 404 (``code: model_not_found``, as OpenAI and vLLM
answer).  Unknown body fields are ignored (as vLLM and SGLang do); known fields
are type-checked.  ``n`` fans out into n engine requests.  ``usage.prompt_tokens`` counts
each prompt once (not once per choice), ``completion_tokens`` sums every choice.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from portaserve.core.request_builder import copy_params
from portaserve.core.sampling_params import MAX_N
from portaserve.server.common import (SSE_DONE, abort_event, check_abort, check_constraints, dead_error, failed,
                                      follow, make_req, sse, sse_error, start_stream, submit, wait_all)
from portaserve.server.errors import APIError, bad_request, get, read_json_object, refuse_unsupported
from portaserve.server import reasoning, tool_calls
from portaserve.server.manager import ReqState, SchedulerDead

router = APIRouter()

MAX_TOP_LOGPROBS = 20


def _check_top(c, top: int, name: str) -> None:
    """OpenAI's range (0-20), narrowed by --max-top-logprobs-num."""
    cap = min(MAX_TOP_LOGPROBS, c.limits.max_top_logprobs)
    if not 0 <= top <= cap:
        why = "" if cap == MAX_TOP_LOGPROBS else " (this server's --max-top-logprobs-num)"
        raise bad_request(f"{name} must be between 0 and {cap}{why}, got {top}", name)


def _client(request: Request):
    return request.app.state.client


def model_names(client) -> list[str]:
    """Names a request may give: the served name, the --model-path as given (SGLang and
    vLLM serve under it) and as resolved."""
    names = [client.info.get("served_model_name"), client.info.get("model_path_arg"),
             client.info.get("model_path")]
    return [n for n in names if n]


def serves(client, model: str) -> bool:
    """Whether ``model`` names this server's model: one of model_names, or a Hugging Face
    id (org/name) or a path ending in the served name."""
    served = client.info.get("served_model_name")
    return (model in model_names(client)
            or ("/" not in served and model.rstrip("/").rsplit("/", 1)[-1] == served))


def _check_model(client, body: dict) -> str:
    model = get(body, "model", str)
    served = client.info.get("served_model_name")
    if model is None or model in ("default", "") or serves(client, model):
        return served
    # 404 with code model_not_found, as OpenAI and vLLM answer (the openai client raises NotFoundError)
    raise APIError(404, f"the model {model!r} does not exist; this server serves {served!r}",
                   "invalid_request_error", "model", "model_not_found")


def _finish(fr: Optional[dict]) -> Optional[str]:
    if fr is None:
        return None
    return fr["type"]


def _matched(fr: Optional[dict]):
    return None if fr is None else fr.get("matched")


# ---- sampling parameters -------------------------------------------------------------------
def sampling_params(body: dict, chat: bool) -> tuple[dict, dict]:
    """OpenAI + SGLang-extra fields -> SGLang sampling params; also the renames used to
    translate engine messages back to the field names this request used."""
    sp: dict = {}
    rename = {"sampling_seed": "seed", "min_new_tokens": "min_tokens"}
    mt_name = "max_tokens"
    max_tokens = get(body, "max_tokens", int)
    if chat and get(body, "max_completion_tokens", int) is not None:
        max_tokens = get(body, "max_completion_tokens", int)
        mt_name = "max_completion_tokens"
    rename["max_new_tokens"] = mt_name
    if max_tokens is not None:
        if max_tokens < (1 if chat else 0):
            raise bad_request(f"{mt_name} must be >= {1 if chat else 0}, got {max_tokens}", mt_name)
        sp["max_new_tokens"] = max_tokens
    elif not chat:
        sp["max_new_tokens"] = 16  # OpenAI's default for completions
    for name, typ, key in (("temperature", float, "temperature"), ("top_p", float, "top_p"),
                           ("presence_penalty", float, "presence_penalty"),
                           ("frequency_penalty", float, "frequency_penalty"),
                           ("seed", int, "sampling_seed"), ("top_k", int, "top_k"),
                           ("min_p", float, "min_p"),
                           ("repetition_penalty", float, "repetition_penalty"),
                           ("ignore_eos", bool, "ignore_eos"), ("regex", str, "regex"),
                           ("ebnf", str, "ebnf"), ("min_tokens", int, "min_new_tokens"),
                           ("skip_special_tokens", bool, "skip_special_tokens"),
                           ("spaces_between_special_tokens", bool, "spaces_between_special_tokens"),
                           ("no_stop_trim", bool, "no_stop_trim")):
        v = get(body, name, typ)
        if v is not None:
            sp[key] = v
    if get(body, "include_stop_str_in_output", bool, False):  # vLLM's name for it
        sp["no_stop_trim"] = True
    for name in ("stop", "stop_regex"):  # stop_regex: SGLang's extra
        stop = get(body, name, (str, list))
        if stop is not None:
            if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
                raise bad_request(f"{name} must be a string or a list of strings", name)
            sp[name] = stop
    lb = get(body, "logit_bias", dict)
    if lb:
        sp["logit_bias"] = lb
    sti = get(body, "stop_token_ids", list)
    if sti is not None:
        sp["stop_token_ids"] = sti
    js = get(body, "json_schema", (str, dict))
    if js is not None:
        sp["json_schema"] = js if isinstance(js, str) else json.dumps(js)
    rf = get(body, "response_format", dict)  # chat and (as SGLang) completions
    if rf is not None:
        kind = rf.get("type")
        if kind in ("json_schema", "json_object") and js is not None:  # one constraint, as for regex
            raise bad_request("only one of json_schema, regex, ebnf may be set (got json_schema and "
                              f"response_format {kind})", "response_format")
        if kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict):
                raise bad_request("response_format.json_schema must be an object holding the schema "
                                  "under \"schema\"", "response_format")
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be an object",
                                  "response_format")
            sp["json_schema"] = json.dumps(schema)
            rename["json_schema"] = "response_format"  # its errors name the field the client set
        elif kind == "json_object":
            sp["json_schema"] = json.dumps({"type": "object"})
            rename["json_schema"] = "response_format"
        elif kind != "text":
            raise bad_request(f"response_format.type must be text, json_object or json_schema, "
                              f"got {kind!r}", "response_format")
    vllm = _vllm_constraint(body)
    if vllm is not None:
        kind, text, field = vllm
        others = [k for k in ("json_schema", "regex", "ebnf") if k in sp]
        if others:
            raise bad_request(f"only one output constraint may be set (got {field} and "
                              f"{rename.get(others[0], others[0])})", field)
        sp[kind] = text
        rename[kind] = field  # its errors name the field the client set
    refuse_unsupported(body, UNSUPPORTED_FIELDS)
    return sp, rename


# vLLM's structured-output fields, onto the same constraints: guided_json, guided_regex,
# guided_choice and guided_grammar (vLLM up to 0.10), and structured_outputs {json, regex,
# choice, grammar, json_object} (later releases).  guided_decoding_backend and
# guided_whitespace_pattern are ignored, as other unknown fields (xgrammar decides both).
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_STRUCTURED = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _regex_literal(text: str) -> str:
    """A regex (xgrammar's syntax) matching exactly text: metacharacters escaped, nothing
    else (xgrammar warns on escapes it does not know, such as a space's)."""
    return "".join("\\" + ch if ch in "\\.^$|?*+()[]{}-/" else ch for ch in text)


def _vllm_constraint(body: dict) -> Optional[tuple[str, str, str]]:
    """(kind, text, field) of the vLLM structured-output field the body sets, if any: kind
    is json_schema, regex or ebnf; field names it in errors."""
    found = [(what, body[name], name) for name, what in _GUIDED.items() if body.get(name) is not None]
    so = get(body, "structured_outputs", dict)
    for what in _STRUCTURED if so else ():
        if so.get(what) not in (None, False):
            found.append((what, so[what], f"structured_outputs.{what}"))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request("only one output constraint may be set (got "
                          + ", ".join(f for _, _, f in found) + ")", found[1][2])
    what, value, field = found[0]
    if what == "json":
        if isinstance(value, dict):
            return "json_schema", json.dumps(value), field
        if isinstance(value, str):
            return "json_schema", value, field
        raise bad_request(f"{field} must be a JSON schema (an object or its text)", field)
    if what == "json_object":
        if value is not True:
            raise bad_request(f"{field} must be a boolean", field)
        return "json_schema", json.dumps({"type": "object"}), field
    if what in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise bad_request(f"{field} must be a non-empty string", field)
        return ("regex" if what == "regex" else "ebnf"), value, field
    if what == "choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(x, str) and x for x in value)):
            raise bad_request(f"{field} must be a non-empty list of non-empty strings", field)
        return "regex", "(" + "|".join(_regex_literal(x) for x in value) + ")", field
    raise bad_request(f"{field} is not supported (use json, regex, choice or grammar)", field)


# Fields of OpenAI's or SGLang's request bodies that this server cannot honour: a request
# that sets one gets a 400 rather than an answer that silently ignored it (other unknown
# fields are ignored, as vLLM and SGLang do).
UNSUPPORTED_FIELDS = {
    "lora_path": "LoRA adapters are not supported",
    "return_hidden_states": "return_hidden_states is not supported",
    "custom_logit_processor": "custom logit processors are not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    # vLLM's
    "use_beam_search": "beam search is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported (a logit_bias or a regex can restrict the output)",
    "bad_words": "bad_words is not supported",
    "prompt_logprobs": "prompt_logprobs is not supported (use echo with logprobs on /v1/completions, or "
                       "return_logprob with logprob_start_len on /generate)",
}



def _set_rids(body: dict, reqs: list) -> None:
    """SGLang's rid field on the OpenAI endpoints (so /abort_request can name the request):
    a string for one request (with several choices or prompts, choice k is "<rid>-<k>"),
    or a list of one string per choice."""
    rid = body.get("rid")
    if rid is None:
        return
    if isinstance(rid, str) and rid:
        rids = [rid] if len(reqs) == 1 else [f"{rid}-{k}" for k in range(len(reqs))]
    elif (isinstance(rid, list) and len(rid) == len(reqs)
          and all(isinstance(r, str) and r for r in rid)):
        rids = rid
    else:
        raise bad_request(f"rid must be a non-empty string or a list of {len(reqs)} of them "
                          "(one per choice)", "rid")
    for r, x in zip(reqs, rids):
        r.rid = x


def _n(body: dict) -> int:
    n = get(body, "n", int, 1)
    if n < 1 or n > MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {n}", "n")
    best_of = get(body, "best_of", int)
    if best_of is not None and best_of != n:
        raise bad_request("best_of other than n is not supported", "best_of")
    return n


def _stream_opts(body: dict) -> tuple[bool, str]:
    """(stream, usage): usage is "" (none), "last" (include_usage: a final chunk with the
    usage) or "every" (also continuous_usage_stats: every chunk carries the usage so far)."""
    stream = get(body, "stream", bool, False)
    so = get(body, "stream_options", dict)
    usage = ""
    if so is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if get(so, "include_usage", bool, False):
            usage = "every" if get(so, "continuous_usage_stats", bool, False) else "last"
    return stream, usage


def _usage(states: list[ReqState], n: int) -> dict:
    prompt = sum(states[i].meta["prompt_tokens"] for i in range(0, len(states), n))
    cached = sum(states[i].meta["cached_tokens"] for i in range(0, len(states), n))
    completion = sum(st.meta["completion_tokens"] for st in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _choice_usage(st: ReqState) -> dict:
    """continuous_usage_stats: one choice's usage so far (its prompt and its tokens), as
    vLLM reports it on each chunk."""
    prompt, completion = st.meta["prompt_tokens"], st.meta["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_texts(request: Request, body: dict):
    """How logprobs name tokens: by their text, or (vLLM's return_tokens_as_token_ids) as
    "token_id:<id>", which stays unambiguous where a token is part of a character."""
    if get(body, "return_tokens_as_token_ids", bool, False):
        return lambda tid: f"token_id:{tid}"
    return request.app.state.token_texts


def _keep_last(c, body: dict) -> Optional[int]:
    """vLLM's truncate_prompt_tokens: how many of the prompt's last tokens to keep (-1: the
    model's context length), or None."""
    k = get(body, "truncate_prompt_tokens", int)
    if k is None:
        return None
    if k == -1:
        return c.limits.context_len
    if k < 1:
        raise bad_request(f"truncate_prompt_tokens must be -1 or at least 1, got {k}", "truncate_prompt_tokens")
    return k


# ---- /v1/tokenize, /v1/detokenize (SGLang's; also without /v1) --------------------------------
def _tokenizer_or_400(c, param: str):
    if c.tokenizer is None:
        raise bad_request("this server was started without a tokenizer (--skip-tokenizer-init)", param)
    return c.tokenizer


@router.post("/v1/tokenize")
@router.post("/tokenize")
async def tokenize(request: Request):
    c = _client(request)
    body = await read_json_object(request)
    _check_model(c, body)
    prompt = body.get("prompt")
    add_special = get(body, "add_special_tokens", bool, True)
    batch = isinstance(prompt, list)
    items = prompt if batch else [prompt]
    if not items or not all(isinstance(p, str) for p in items):
        raise bad_request("prompt must be a string or a non-empty list of strings", "prompt")
    tok = _tokenizer_or_400(c, "prompt")
    ids = await c.off_loop(lambda: [tok.encode(p, add_special_tokens=add_special) for p in items])
    return {"tokens": ids if batch else ids[0], "count": [len(x) for x in ids] if batch else len(ids[0]),
            "max_model_len": c.limits.context_len}


@router.post("/v1/detokenize")
@router.post("/detokenize")
async def detokenize(request: Request):
    c = _client(request)
    body = await read_json_object(request)
    _check_model(c, body)
    tokens = body.get("tokens")
    skip = get(body, "skip_special_tokens", bool, True)
    batch = isinstance(tokens, list) and bool(tokens) and isinstance(tokens[0], list)
    items = tokens if batch else [tokens]
    vocab = c.limits.vocab_size
    if not isinstance(tokens, list) or not all(
            isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in items):
        raise bad_request("tokens must be a list of token ids or a list of such lists", "tokens")
    bad = [t for x in items for t in x if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary (size {vocab})", "tokens")
    tok = _tokenizer_or_400(c, "tokens")
    texts = await c.off_loop(lambda: [tok.decode(x, skip_special_tokens=skip) for x in items])
    return {"text": texts if batch else texts[0]}


# ---- /v1/models ----------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request):
    c = _client(request)
    return {"object": "list", "data": [_model_card(c)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    c = _client(request)
    if not serves(c, model):
        raise APIError(404, f"the model {model!r} does not exist", "invalid_request_error", "model",
                       "model_not_found")
    return _model_card(c)


def _model_card(c) -> dict:
    return {"id": c.info.get("served_model_name"), "object": "model", "created": c.started,
            "owned_by": "portaserve", "root": c.info.get("model_path"),
            "max_model_len": c.info.get("context_length")}


# ---- /v1/completions -----------------------------------------------------------------------
def _prompts(body: dict) -> list:
    """OpenAI's prompt forms -> list of (text or None, ids or None)."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt is required", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        return [(p, None)]
    if isinstance(p, list):
        if not p:
            raise bad_request("the prompt is empty", "prompt")
        if all(isinstance(x, str) for x in p):
            return [(x, None) for x in p]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [(None, p)]
        if all(isinstance(x, list) for x in p):
            return [(None, x) for x in p]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a "
                      "list of lists of token ids", "prompt")


def _completion_logprobs(st: ReqState, texts, echo: bool, offset0: int, new_from: int = 0,
                         echo_prompt: bool = False):
    """OpenAI completions logprobs for output tokens [new_from:] (plus the prompt's when
    echo_prompt)."""
    tokens, token_lps, tops = [], [], []
    lp = st.logprobs
    want_top = st.req.top_logprobs_num > 0

    def add(entries, top_entries):
        for k, (v, tid, _) in enumerate(entries):
            tokens.append(texts(tid))
            token_lps.append(v)
            if want_top:
                t = top_entries[k] if k < len(top_entries) else None
                top = None if t is None else {texts(b): a for a, b, _ in t}
                if top is not None:  # with the token itself, as OpenAI's legacy API and vLLM
                    top.setdefault(texts(tid), v)
                tops.append(top)
            else:
                tops.append(None)

    if echo_prompt:
        add(lp["input_token_logprobs"], lp["input_top_logprobs"])
    add(lp["output_token_logprobs"][new_from:], lp["output_top_logprobs"][new_from:])
    offsets, pos = [], offset0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps,
            "top_logprobs": tops if want_top else None, "text_offset": offsets}


def _offset_after(lp: dict, start: int) -> int:
    """The text offset after the tokens of a logprobs object that began at start."""
    return lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"] else start


@router.post("/v1/completions")
async def completions(request: Request):
    c = _client(request)
    body = await read_json_object(request)
    model = _check_model(c, body)
    prompts = _prompts(body)
    n = _n(body)
    stream, usage_mode = _stream_opts(body)
    sp, rename = sampling_params(body, chat=False)
    echo = get(body, "echo", bool, False)
    logprobs = get(body, "logprobs", int)
    if logprobs is not None:
        _check_top(c, logprobs, "logprobs")
    if get(body, "suffix", str):
        raise bad_request("suffix is not supported", "suffix")
    want_lp = logprobs is not None
    keep = _keep_last(c, body)

    def build():  # on the request-building thread: it tokenizes
        reqs, prompt_texts = [], []
        for i, (text, ids) in enumerate(prompts):
            if keep is not None:  # the prompt's last tokens (echo shows what is kept)
                if ids is None:
                    ids = _tokenizer_or_400(c, "prompt").encode(text, add_special_tokens=True)
                text, ids = None, ids[-keep:]
            kw = dict(return_logprob=want_lp, logprob_start_len=0 if (want_lp and echo) else None,
                      top_logprobs_num=logprobs or 0, rename=rename,
                      prefix=f"prompt {i}: " if len(prompts) > 1 else "")
            first = make_req(c, text, ids, sp, **kw)  # the n - 1 copies reuse its tokens
            reqs += [first] + [make_req(c, None, first.input_ids, copy_params(sp, j), **kw)
                               for j in range(1, n)]
            if echo:
                prompt_texts.append(text if text is not None else c.tokenizer.decode(ids)
                                    if c.tokenizer is not None else "")
        return reqs, prompt_texts

    with c.building_request(body.get("rid")) as aborted:  # an /abort_request meanwhile
        await check_constraints(c, [sp])
        reqs, prompt_texts = await c.off_loop(build)
        _set_rids(body, reqs)
        states = submit(c, reqs, aborted)
    texts = _token_texts(request, body)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    if not stream:
        await wait_all(c, states, request)
        check_abort(states)
        choices = []
        for k, st in enumerate(states):
            prefix = prompt_texts[k // n] if echo else ""
            ch = {"index": k, "text": prefix + st.text, "logprobs": None,
                  "finish_reason": _finish(st.finished_reason),
                  "matched_stop": _matched(st.finished_reason)}
            if want_lp:
                ch["logprobs"] = _completion_logprobs(st, texts, echo, 0, echo_prompt=echo)
            choices.append(ch)
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(states, n)}

    async def gen():
        # text_offset counts the tokens' texts reported so far, as unstreamed: not the text
        # sent, which lags behind while a possible stop string or a split character is held
        lp_pos = [0] * len(states)
        started = [False] * len(states)
        try:
            async for _ in follow(c, states):
                for k, st in enumerate(states):
                    if st.sent_ids < 0:
                        continue
                    done = st.finished_reason is not None
                    if done and failed(st.finished_reason):
                        yield abort_event(st.finished_reason)
                        st.sent_ids = -1
                        continue
                    first = not started[k]
                    if first and echo and want_lp and not (st.output_ids or done):
                        continue  # its prompt's logprobs come with its first output
                    delta = st.detok.pop_delta(done) if st.detok is not None else ""
                    if first and echo:
                        delta = prompt_texts[k // n] + delta
                    n_new = len(st.output_ids) - st.sent_ids
                    if not (delta or done or (want_lp and n_new)):
                        continue
                    ch = {"index": k, "text": delta, "logprobs": None, "finish_reason": None}
                    if want_lp:
                        ch["logprobs"] = _completion_logprobs(st, texts, echo, lp_pos[k],
                                                              st.sent_ids, echo_prompt=first and echo)
                        lp_pos[k] = _offset_after(ch["logprobs"], lp_pos[k])
                    started[k] = True
                    st.sent_ids = len(st.output_ids)
                    if done:
                        ch["finish_reason"] = _finish(st.finished_reason)
                        ch["matched_stop"] = _matched(st.finished_reason)
                        st.sent_ids = -1
                    chunk = {"id": rid, "object": "text_completion", "created": created,
                             "model": model, "choices": [ch]}
                    if usage_mode:
                        chunk["usage"] = _choice_usage(st) if usage_mode == "every" else None
                    yield sse(chunk)
            if usage_mode:
                yield sse({"id": rid, "object": "text_completion", "created": created,
                           "model": model, "choices": [], "usage": _usage(states, n)})
        except SchedulerDead as e:
            yield sse_error(str(dead_error(str(e))), code="engine_dead")
        yield SSE_DONE

    if not await start_stream(c, states, request):
        return Response(status_code=499)  # the client left before the first token
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- /v1/chat/completions ------------------------------------------------------------------
def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise bad_request("messages must be a list of {role, content} objects", "messages")
    if not msgs:
        raise bad_request("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise bad_request(f"messages[{i}].role must be system, user, assistant, developer "
                              f"or tool, got {role!r}", "messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                    raise bad_request(f"messages[{i}].content: only text parts are supported, got "
                                      f"{kind!r}", "messages")
                parts.append(p["text"])
            content = "\n".join(parts)  # as vLLM joins them
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts",
                              "messages")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        _check_message_fields(m, i)
        for key in ("tool_calls", "tool_call_id", "name"):
            # assistant calls and tool results go to the template as given; a null is left
            # out (the openai client's message.model_dump() sends tool_calls: null, and
            # templates test `'tool_calls' in message`)
            if m.get(key) is not None:
                msg[key] = m[key]
        if "tool_calls" in msg and isinstance(msg["tool_calls"], list):
            for tc in msg["tool_calls"]:  # templates expect arguments as an object
                fn = tc.get("function") if isinstance(tc, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
        out.append(msg)
    return out


def _check_message_fields(m: dict, i: int) -> None:
    """A message's name, tool_call_id and tool_calls, typed as OpenAI's API has them."""
    for key in ("name", "tool_call_id"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise bad_request(f"messages[{i}].{key} must be a string", "messages")
    calls = m.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise bad_request(f"messages[{i}].tool_calls must be a list of tool calls", "messages")
    for j, tc in enumerate(calls):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(
                fn.get("arguments", ""), (str, dict)):
            raise bad_request(f"messages[{i}].tool_calls[{j}] must be an object with a function "
                              "{name, arguments}", "messages")


def _chat_prompt_ids(c, body: dict, tools=None) -> list[int]:
    tok = c.tokenizer
    if tok is None:
        raise bad_request("this server was started without a tokenizer; use /generate with input_ids",
                          "messages")
    msgs = _messages(body)
    if not getattr(tok, "chat_template", None):
        raise bad_request("this model has no chat template; start the server with --chat-template",
                          "messages")
    kwargs = dict(get(body, "chat_template_kwargs", dict, {}))
    template = get(body, "chat_template", str)
    if template is not None or "chat_template" in kwargs:
        # a template is code: rendering a client's Jinja on the one request-building thread
        # lets one request hold every other for as long as its loops run
        if not getattr(c.args, "trust_request_chat_template", False):
            raise bad_request("this server does not render chat templates sent with a request (start it "
                              "with --trust-request-chat-template to allow that)",
                              "chat_template" if template is not None else "chat_template_kwargs")
        if template is not None:
            kwargs["chat_template"] = template
    # vLLM's and SGLang's fields: continue the last (assistant) message instead of opening
    # a new turn; add_generation_prompt may also come in chat_template_kwargs
    cont = kwargs.pop("continue_final_message", get(body, "continue_final_message", bool, False))
    agp = get(body, "add_generation_prompt", bool)
    agp = kwargs.pop("add_generation_prompt", not cont if agp is None else agp)
    for name, v in (("continue_final_message", cont), ("add_generation_prompt", agp)):
        if not isinstance(v, bool):
            raise bad_request(f"{name} must be a boolean", name)
    if cont and agp:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
    if cont and msgs[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be the assistant's",
                          "continue_final_message")
    rendering = kwargs.get("chat_template") or tok.chat_template  # the template that will render
    knows_tools = tool_calls.template_knows_tools(rendering)
    if not tool_calls.template_renders_calls(rendering):  # it would drop them: written as text
        msgs = [tool_calls.calls_as_text(m) for m in msgs]
    if tools:
        if knows_tools:
            kwargs["tools"] = tools
        else:  # describe the tools in a system message the template does render
            prompt = tool_calls.tools_system_prompt(tools)
            if msgs[0]["role"] == "system":
                msgs = [{**msgs[0], "content": msgs[0]["content"] + "\n\n" + prompt}] + msgs[1:]
            else:
                msgs = [{"role": "system", "content": prompt}] + msgs
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp,
                                       continue_final_message=cont, **kwargs)
    except Exception as e:  # noqa: BLE001 - template errors are the caller's input
        raise bad_request(f"the chat template failed on these messages: {e}", "messages")
    return tok.encode(text, add_special_tokens=False)


def _chat_logprobs(st: ReqState, texts, new_from: int = 0) -> dict:
    content = []
    lp = st.logprobs
    tops = lp["output_top_logprobs"]
    for k, (v, tid, _) in enumerate(lp["output_token_logprobs"][new_from:], start=new_from):
        s = texts(tid)
        entry = {"token": s, "logprob": v, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
        if st.req.top_logprobs_num and k < len(tops) and tops[k] is not None:
            entry["top_logprobs"] = [{"token": texts(b), "logprob": a,
                                      "bytes": list(texts(b).encode("utf-8"))} for a, b, _ in tops[k]]
        content.append(entry)
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    c = _client(request)
    body = await read_json_object(request)
    model = _check_model(c, body)
    n = _n(body)
    stream, usage_mode = _stream_opts(body)
    sp, rename = sampling_params(body, chat=True)
    want_lp = get(body, "logprobs", bool, False)
    top = get(body, "top_logprobs", int)
    if top is not None:
        _check_top(c, top, "top_logprobs")
        if top and not want_lp:
            raise bad_request("top_logprobs requires logprobs: true", "top_logprobs")
    tools, choice, named = None, "none", None
    max_calls = None if get(body, "parallel_tool_calls", bool, True) else 1
    if body.get("tools") is not None:
        tools = tool_calls.validate_tools(body["tools"])
        choice, named = tool_calls.parse_tool_choice(body.get("tool_choice"), tools)
        if choice == "none":
            tools = None
    elif body.get("tool_choice") not in (None, "none"):
        raise bad_request("tool_choice needs tools", "tool_choice")
    if tools and choice != "auto":
        if any(k in sp for k in ("json_schema", "regex", "ebnf")):
            raise bad_request("tool_choice required/named cannot be combined with another output "
                              "constraint", "tool_choice")
        # arguments constrained to the functions' schemas: they always parse
        tool_calls.check_enforceable(tools, named)
        sp["json_schema"] = json.dumps(tool_calls.constraint_schema(tools, choice, max_calls is None, named))
        rename["json_schema"] = "tools"  # the schema the client wrote is in its tools
    parser = tool_calls.detect_parser(getattr(c.tokenizer, "chat_template", None),
                                      getattr(c.args, "tool_call_parser", None))
    if tools and choice == "auto" and parser == "mistral":
        # [TOOL_CALLS], [CALL_ID] and [ARGS] are special tokens: without them a v11 call
        # "name[CALL_ID]id[ARGS]{...}" cannot be parsed (vLLM keeps them too)
        sp.setdefault("skip_special_tokens", False)
    # --reasoning-parser: thinking goes to reasoning_content unless the request says
    # separate_reasoning false (SGLang's fields)
    think_parser = getattr(c.args, "reasoning_parser", None)
    if not get(body, "separate_reasoning", bool, True):
        think_parser = None
    think_parser = reasoning.for_request(think_parser, any(k in sp for k in ("json_schema", "regex", "ebnf")))
    stream_reasoning = get(body, "stream_reasoning", bool, True)
    keep = _keep_last(c, body)
    echo = get(body, "echo", bool, False)

    def build():  # on the request-building thread: it renders the template and tokenizes
        ids = _chat_prompt_ids(c, body, tools)
        if keep is not None:
            ids = ids[-keep:]
        if "max_new_tokens" not in sp:
            # no max_tokens: up to the context (and the KV pool), as OpenAI does
            room = min(c.limits.context_len, c.limits.pool_tokens) - len(ids)
            sp["max_new_tokens"] = max(room, 1)
        return [make_req(c, None, ids, copy_params(sp, j), want_lp, None, top or 0, rename=rename,
                         param_rename={"prompt": "messages"})
                for j in range(n)]

    with c.building_request(body.get("rid")) as aborted:  # an /abort_request meanwhile
        await check_constraints(c, [sp])
        reqs = await c.off_loop(build)
        _set_rids(body, reqs)
        states = submit(c, reqs, aborted)
    texts = _token_texts(request, body)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    # vLLM's echo: the answer starts with the last message when it is the assistant's (the
    # message the answer continues)
    last = _messages(body)[-1] if echo else None
    echoed = last["content"] if last is not None and last["role"] == "assistant" else ""
    created = int(time.time())

    tool_names = {t["function"]["name"] for t in tools} if tools else set()
    # auto: the model's own format among free text; required / named: the constrained list
    call_format = parser if choice == "auto" else "constrained"

    def tool_finish(st, calls, complete: bool) -> Optional[str]:
        """tool_calls when the answer made calls and none was cut short; a named
        tool_choice ends with stop, as in OpenAI's API and vLLM."""
        finish = _finish(st.finished_reason)
        if choice not in ("auto", "required"):
            return finish
        return "tool_calls" if calls and complete and finish in ("stop", "length") else finish

    def message(st):
        """(message, finish_reason) of a finished request, thinking and tool calls parsed out."""
        text = st.text
        msg = {"role": "assistant", "content": text}
        if think_parser:
            thought, text = reasoning.split(text, think_parser)
            msg = {"role": "assistant", "content": text, "reasoning_content": thought or None}
        finish = _finish(st.finished_reason)
        if tools:
            content, calls, complete = tool_calls.parse(text, call_format, tool_names, max_calls, parser)
            if calls and choice == "auto" and not (complete and tool_calls.arguments_parse(calls)):
                calls = []  # a call that does not parse: the whole answer is text (as vLLM)
            if calls:
                msg.update(content=content, tool_calls=calls)
                finish = tool_finish(st, calls, complete)
        if echoed:
            msg["content"] = echoed + (msg["content"] or "")
        return msg, finish

    if not stream:
        await wait_all(c, states, request)
        check_abort(states)
        choices = []
        for k, st in enumerate(states):
            msg, finish = message(st)
            choices.append({"index": k, "message": msg,
                            "logprobs": _chat_logprobs(st, texts) if want_lp else None,
                            "finish_reason": finish,
                            "matched_stop": _matched(st.finished_reason)})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(states, n)}

    def chunk(choices, usage=False):
        d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
        if usage_mode:
            d["usage"] = (_usage(states, n) if usage else _choice_usage(states[choices[0]["index"]])
                          if usage_mode == "every" else None)
        return sse(d)

    async def gen():
        # each choice's text goes through the reasoning parser (thinking -> reasoning_content
        # deltas) and, with tools, a tool-call parser: content deltas for text outside calls,
        # a header delta per call, then its argument fragments
        streams = ([tool_calls.ToolCallStream(call_format, tool_names, max_calls, parser) for _ in states]
                   if tools else None)
        thinking = [reasoning.ReasoningStream(think_parser) for _ in states] if think_parser else None
        held_reasoning = [""] * len(states)  # stream_reasoning false: sent in one piece
        try:
            for k in range(n):
                yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
                if echoed:
                    yield chunk([{"index": k, "delta": {"content": echoed}, "logprobs": None,
                                  "finish_reason": None}])
            async for _ in follow(c, states):
                for k, st in enumerate(states):
                    if st.sent_ids < 0:
                        continue
                    done = st.finished_reason is not None
                    if done and failed(st.finished_reason):
                        yield abort_event(st.finished_reason)
                        st.sent_ids = -1
                        continue
                    text = st.detok.pop_delta(done) if st.detok is not None else ""
                    deltas = []
                    if thinking:
                        thought, text = thinking[k].feed(text)
                        if done:
                            more, rest = thinking[k].finish()
                            thought, text = thought + more, text + rest
                        if not stream_reasoning:
                            held_reasoning[k] += thought
                            thought = ""
                            if held_reasoning[k] and (text or done or thinking[k].state != "think"):
                                thought, held_reasoning[k] = held_reasoning[k], ""
                        if thought:
                            deltas.append({"reasoning_content": thought})
                    if tools:
                        ts = streams[k]
                        deltas += ts.feed(text) + (ts.finish() if done else [])
                    elif text:
                        deltas.append({"content": text})
                    n_new = len(st.output_ids) - st.sent_ids
                    if not deltas and (done or (want_lp and n_new)):
                        deltas = [{}]
                    for j, delta in enumerate(deltas):
                        ch = {"index": k, "delta": delta, "logprobs": None, "finish_reason": None}
                        last = j == len(deltas) - 1
                        if last and want_lp:
                            ch["logprobs"] = _chat_logprobs(st, texts, st.sent_ids)
                        if last and done:
                            ch["finish_reason"] = (tool_finish(st, streams[k].message()[1], streams[k].complete())
                                                   if tools else _finish(st.finished_reason))
                            ch["matched_stop"] = _matched(st.finished_reason)
                        yield chunk([ch])
                    if deltas:
                        st.sent_ids = -1 if done else len(st.output_ids)
            if usage_mode:
                yield chunk([], usage=True)
        except SchedulerDead as e:
            yield sse_error(str(dead_error(str(e))), code="engine_dead")
        yield SSE_DONE

    if not await start_stream(c, states, request):
        return Response(status_code=499)  # the client left before the first token
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
