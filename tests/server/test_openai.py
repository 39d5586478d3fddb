"""The OpenAI-compatible API, driven by the real `openai` client."""
from __future__ import annotations

import pytest

MULTIBYTE_PROMPT = "日本語で「こんにちは」は"  # the default model answers in multi-byte UTF-8
MODEL = "default"


def _stream_completion(oai, **kw):
    parts, finish, usage = {}, {}, None
    for ch in oai.completions.create(stream=True, **kw):
        for c in ch.choices:
            parts.setdefault(c.index, []).append(c.text)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if ch.usage:
            usage = ch.usage
    return {i: "".join(p) for i, p in parts.items()}, finish, usage


def test_models(oai, server):
    models = oai.models.list().data
    assert len(models) == 1
    info = server.get("/get_model_info").json()
    assert models[0].id == "SmolLM2-135M-Instruct"
    assert models[0].root == info["model_path"]


def test_completion_basic_and_usage(oai):
    r = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                               temperature=0)
    assert r.object == "text_completion"
    assert len(r.choices) == 1
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens == 5 and u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


@pytest.mark.parametrize("prompt", ["Once upon a time, there was a", MULTIBYTE_PROMPT])
def test_completion_stream_equals_nonstream(oai, prompt):
    kw = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    full = oai.completions.create(**kw)
    texts, finish, usage = _stream_completion(oai, stream_options={"include_usage": True}, **kw)
    assert texts[0] == full.choices[0].text
    assert finish[0] == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    if prompt == MULTIBYTE_PROMPT:
        assert any(ord(ch) > 127 for ch in full.choices[0].text)


def test_chat_stream_equals_nonstream(oai):
    kw = dict(model=MODEL, messages=[{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "Name three fruits."}],
              max_tokens=16, temperature=0)
    full = oai.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    parts, roles, finish, usage = [], [], None, None
    for ch in oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(parts) == msg.content
    assert roles == ["assistant"]
    assert finish == full.choices[0].finish_reason
    assert usage.total_tokens == full.usage.total_tokens


def test_chat_template_applied(oai):
    # the chat template adds SmolLM's system prompt: far more tokens than the message
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > 10


def test_n_choices_and_seed(oai):
    kw = dict(model=MODEL, prompt="My favourite animal is the", max_tokens=8, temperature=1.0,
              seed=1234, n=3)
    r = oai.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 3 * 8  # summed over the choices
    one = oai.completions.create(model=MODEL, prompt=kw["prompt"], max_tokens=1)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # counted once, not per choice
    again = oai.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded
    # streaming n>1: every choice finishes, texts interleave by index
    texts, finish, _ = _stream_completion(oai, **kw)
    assert sorted(texts) == [0, 1, 2] and sorted(finish) == [0, 1, 2]
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, n=2)
    assert len(chat.choices) == 2
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy


def test_completion_logprobs_and_echo(oai):
    prompt = "Hello, my name is"
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                               logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and len(top) == 2
        assert max(top.values()) == pytest.approx(val, abs=1e-4)  # greedy took the best
    e = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                               logprobs=1, echo=True)
    elp = e.choices[0].logprobs
    assert e.choices[0].text == prompt + r.choices[0].text
    n_prompt = e.usage.prompt_tokens
    assert len(elp.tokens) == n_prompt + e.usage.completion_tokens
    assert elp.token_logprobs[0] is None and all(v <= 0 for v in elp.token_logprobs[1:])
    assert elp.text_offset[n_prompt] == len(prompt)
    assert elp.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    # scoring only: max_tokens=0 with echo returns the prompt's logprobs
    s = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    assert s.choices[0].text == prompt and s.usage.completion_tokens == 0
    assert s.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        elp.token_logprobs[1:n_prompt], abs=1e-4)


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                    max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    # streamed logprobs cover the same tokens
    toks = []
    for ch in oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, stream=True):
        for c in ch.choices:
            if c.logprobs and c.logprobs.content:
                toks += [t.token for t in c.logprobs.content]
    assert toks == [t.token for t in content]


def test_stop_strings(oai):
    base = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert " 6" in text, text
    r = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                               stop=[" 6"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(" 6")]
    texts, finish, _ = _stream_completion(oai, model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                          temperature=0, stop=[" 6"])
    assert texts[0] == r.choices[0].text and finish[0] == "stop"


def test_cached_tokens_on_repeated_prefix(oai):
    prefix = "You are a helpful assistant. " * 30 + "Here is a list of facts about owls: "
    first = oai.completions.create(model=MODEL, prompt=prefix + "Owls are", max_tokens=4, temperature=0)
    second = oai.completions.create(model=MODEL, prompt=prefix + "Owls can", max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens > 150
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 4, (cached, first.usage.prompt_tokens)
    assert cached < second.usage.prompt_tokens


def test_sglang_extra_params(oai, server):
    r = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0.7,
                               extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                           "ignore_eos": True, "min_tokens": 8},
                               presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9, seed=7)
    assert r.usage.completion_tokens == 8
    # regex passes through: enforced where structured output is available, else a 400
    import re

    import openai

    if server.server_info()["limits"]["grammar"]:
        r = oai.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"regex": "[ab]+"})
        assert re.fullmatch("[ab]+", r.choices[0].text)
    else:
        with pytest.raises(openai.BadRequestError) as ei:
            oai.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"regex": "[ab]+"})
        assert "regex" in str(ei.value)
