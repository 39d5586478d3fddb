"""--reasoning-parser on /v1/chat/completions: thinking in reasoning_content, the answer in
content, streamed or not; separate_reasoning false gives the whole text back, which the
split parts must rebuild exactly.  A regex makes the default model write a think block."""
from __future__ import annotations

import json

import pytest

from conftest import ServerProc

THINKING = r"<think>\n[a-z]{2,8}( [a-z]{2,8}){2,6}\.\n</think>\n\n[A-Z][a-z]{2,8}( [a-z]{2,8}){1,5}\."
BASE = {"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 120, "temperature": 1.0, "regex": THINKING}


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory):
    s = ServerProc(["--max-total-tokens", "4096", "--reasoning-parser", "qwen3"],
                   tmp_path_factory.mktemp("reasoning") / "server.log")
    yield s
    s.stop()


def _stream(server, body):
    r = server.post("/v1/chat/completions", json={**body, "stream": True}, stream=True)
    assert r.status_code == 200, r.text
    thought, content, finish, order = "", "", None, []
    for line in r.iter_lines(decode_unicode=True):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for ch in json.loads(line[6:])["choices"]:
            d = ch["delta"]
            if d.get("reasoning_content"):
                thought += d["reasoning_content"]
                order.append("r")
            if d.get("content"):
                content += d["content"]
                order.append("c")
            finish = ch["finish_reason"] or finish
    return thought, content, finish, order


@pytest.mark.parametrize("seed", [0, 1])
def test_thinking_separated_streamed_and_not(qwen3_server, seed):
    body = {**BASE, "seed": seed}
    whole = qwen3_server.post("/v1/chat/completions", json={**body, "separate_reasoning": False}).json()
    text = whole["choices"][0]["message"]["content"]
    assert text.startswith("<think>\n") and "\n</think>\n\n" in text
    msg = qwen3_server.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert "<think>" not in msg["content"] and "</think>" not in msg["reasoning_content"]
    assert "<think>" + msg["reasoning_content"] + "</think>\n\n" + msg["content"] == text
    thought, content, finish, order = _stream(qwen3_server, body)
    assert (thought, content, finish) == (msg["reasoning_content"], msg["content"], "stop")
    assert order.count("r") > 1 and order.count("c") > 1  # both streamed token by token
    assert order == sorted(order, key="rc".index)  # all thinking before the answer
    # stream_reasoning false: the thinking arrives in one piece, before the answer
    thought, content, _, order = _stream(qwen3_server, {**body, "stream_reasoning": False})
    assert (thought, content) == (msg["reasoning_content"], msg["content"])
    assert order[0] == "r" and order.count("r") == 1


def test_no_think_block_is_all_content(qwen3_server):
    msg = qwen3_server.post("/v1/chat/completions", json={
        **BASE, "regex": "[A-Z][a-z]{2,8}( [a-z]{2,8}){1,4}\\.", "seed": 3}).json()["choices"][0]["message"]
    assert msg["reasoning_content"] is None and msg["content"]
