"""Bad input gets a 400 with an OpenAI-style error naming the problem; the server keeps serving."""
from __future__ import annotations

import json

import pytest
import requests

C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
MSG = [{"role": "user", "content": "hi"}]

# (path, body: dict -> JSON, or bytes sent as is, words the message must contain, param)
CASES = [
    (C, b'{"prompt": "x", ', "not valid JSON", None),
    (C, b'{"prompt": "caf\xe9"}', "UTF-8", None),
    (C, b"", "empty", None),
    (C, b"[1, 2]", "JSON object", None),
    (C, {"prompt": 123}, "prompt must be", "prompt"),
    (C, {"prompt": ""}, "empty", "prompt"),
    (C, {"prompt": []}, "empty", "prompt"),
    (C, {}, "prompt is required", "prompt"),
    (C, {"prompt": "x", "model": "gpt-4"}, "does not exist", "model"),
    (C, {"prompt": "x", "model": 7}, "model must be a string", "model"),
    (C, {"prompt": "x", "max_tokens": "ten"}, "max_tokens must be an integer", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 100000}, "context length", "max_tokens"),
    (C, {"prompt": "hello " * 9000, "max_tokens": 1}, "context length", "prompt"),
    (C, {"prompt": "x", "temperature": -0.5}, "temperature", "temperature"),
    (C, b'{"prompt": "x", "temperature": NaN}', "temperature must be a finite number", "temperature"),
    (C, {"prompt": "x", "temperature": "hot"}, "temperature must be a number", "temperature"),
    (C, {"prompt": "x", "top_p": 0}, "top_p", "top_p"),
    (C, {"prompt": "x", "top_p": 1.5}, "top_p", "top_p"),
    (C, {"prompt": "x", "presence_penalty": 5}, "presence_penalty", "presence_penalty"),
    (C, {"prompt": "x", "seed": "abc"}, "seed must be an integer", "seed"),
    (C, {"prompt": "x", "stop": 5}, "stop must be", "stop"),
    (C, {"prompt": "x", "stop": ["a", 1]}, "stop must be", "stop"),
    (C, {"prompt": "x", "n": 0}, "n must be", "n"),
    (C, {"prompt": "x", "logprobs": 50}, "logprobs", "logprobs"),
    (C, {"prompt": "x", "stream": "yes"}, "stream must be a boolean", "stream"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream_options"),
    (C, {"prompt": "x", "top_k": 0}, "top_k", "top_k"),
    (C, {"prompt": [1, 2, 99999999]}, "vocabulary", "input_ids"),
    (C, {"prompt": "x", "regex": "[unclosed"}, "regex", "regex"),
    (C, {"prompt": "x", "json_schema": "{not json"}, "json_schema", "json_schema"),
    (CHAT, {"model": "default"}, "messages", "messages"),
    (CHAT, {"messages": []}, "messages", "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "role", "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "content", "messages"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs requires logprobs", "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": "yes"}, "logprobs must be a boolean", "logprobs"),
    (CHAT, {"messages": MSG, "model": "nope"}, "does not exist", "model"),
    (GEN, {"sampling_params": {"max_new_tokens": 2}}, "text or input_ids", "text"),
    (GEN, {"text": 5}, "text must be", "text"),
    (GEN, {"input_ids": [1, "a"]}, "input_ids must be a list of integers", "input_ids"),
    (GEN, {"input_ids": [-1]}, "vocabulary", "input_ids"),
    (GEN, {"text": "x", "sampling_params": {"bogus": 1}}, "unknown sampling parameter", "bogus"),
    (GEN, {"text": "x", "sampling_params": {"temperature": -1}}, "temperature", "temperature"),
    (GEN, {"text": "x", "sampling_params": {"max_new_tokens": 9000}}, "context length", "max_new_tokens"),
    (GEN, {"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params", "sampling_params"),
    (GEN, {"text": "x", "top_logprobs_num": -1, "return_logprob": True}, "top_logprobs_num", "top_logprobs_num"),
]


@pytest.mark.parametrize("path,body,words,param", CASES,
                         ids=[f"{p.split('/')[-1]}-{i}" for i, (p, *_rest) in enumerate(CASES)])
def test_bad_input(server, path, body, words, param):
    kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    if path == C and isinstance(body, dict) and "max_tokens" not in body:
        body.setdefault("max_tokens", 2)
    r = requests.post(server.url + path, timeout=60, **kw)
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert words.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err


def test_server_healthy_after_bad_input(server):
    assert server.get("/health").status_code == 200
    r = server.post(C, json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_unknown_route_is_openai_shaped_404(server):
    r = server.get("/v1/nope")
    assert r.status_code == 404 and "message" in r.json()["error"]
