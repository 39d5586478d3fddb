"""Request fields SGLang and vLLM users send, honoured: checked against the tokenizer's own
chat template and against the native API given the same tokens."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from portaserve.models.loader import load_tokenizer, resolve_model_path

MSGS = [{"role": "user", "content": "Write a short poem about the sea."},
        {"role": "assistant", "content": "The waves roll in"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path(None))


def _greedy_from_ids(server, ids, n):
    r = server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("how", ["continue_final_message", "chat_template_kwargs"])
def test_template_switches_render_like_transformers(server, tok, how):
    """continue_final_message renders the last assistant message open (no end of turn, no
    new turn); add_generation_prompt false (in chat_template_kwargs) ends the prompt after
    the last message.  Each prompt is the tokenizer's own rendering, and the answer is the
    native API's on those very tokens."""
    if how == "continue_final_message":
        extra = {"continue_final_message": True}
        ref = tok.apply_chat_template(MSGS, tokenize=False, continue_final_message=True)
        assert ref.rstrip().endswith("The waves roll in")
    else:
        extra = {"chat_template_kwargs": {"add_generation_prompt": False}}
        ref = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=False)
    opened = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert ref != opened
    ids = tok.encode(ref, add_special_tokens=False)
    r = server.post("/v1/chat/completions", json={"model": "default", "messages": MSGS, "max_tokens": 8,
                                                  "temperature": 0, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"]["content"] == _greedy_from_ids(server, ids, 8)["text"]


def test_continuous_usage_stats(server):
    r = server.post("/v1/completions", stream=True, json={
        "model": "default", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices and all(c["usage"] is not None for c in chunks)
    done = [c["usage"]["completion_tokens"] for c in with_choices]
    assert done == sorted(done) and done[-1] == 6  # the count so far, in every chunk
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in chunks)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_count_each_choice(server, path):
    """With n choices, a chunk's usage is its own choice's (its prompt and its tokens so
    far, as vLLM reports it); the last chunk sums them all."""
    body = {"model": "default", "max_tokens": 5, "temperature": 1.0, "seed": 3, "ignore_eos": True, "n": 2,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"prompt": "Once upon a time"} if "chat" not in path else
                {"messages": [{"role": "user", "content": "Tell me a story"}]})
    r = server.post(path, stream=True, json=body)
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    seen = {0: [], 1: []}
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        seen[ch["index"]].append(c["usage"]["completion_tokens"])
        if ch["finish_reason"] is not None:
            assert c["usage"]["completion_tokens"] == 5
    prompt = chunks[-1]["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks)
    for counts in seen.values():  # each choice counts up to its own 5
        assert counts == sorted(counts) and counts[-1] == 5 and counts[0] <= 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_vllm_structured_output_fields(server, tok):
    """vLLM's guided_* fields and structured_outputs constrain the answer as the equivalent
    regex / json_schema / ebnf fields do (the same greedy text), and what comes back
    belongs to the language each describes."""
    chat = {"model": "default", "messages": [{"role": "user", "content": "Pick a colour."}], "max_tokens": 24}

    def ask(path, **extra):
        r = server.post(path, json={**(chat if "chat" in path else {"model": "default", "prompt": "Colour:",
                                                                      "max_tokens": 24}), **extra})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"]
        return [c["message"]["content"] if "chat" in path else c["text"] for c in ch]

    CHAT, C = "/v1/chat/completions", "/v1/completions"
    options = ["red", "dark blue", "x-ray (green)?", "naïve|tab\t"]
    for got in (ask(CHAT, guided_choice=options, temperature=1.0, seed=1, n=6),
                ask(C, structured_outputs={"choice": options}, temperature=1.0, seed=2, n=6)):
        assert all(g in options for g in got), got
    rx = "[a-z]{3,8}(, [a-z]{3,8}){2}"
    for path in (CHAT, C):
        plain = ask(path, regex=rx, temperature=0)
        assert re.fullmatch(rx, plain[0])
        assert ask(path, guided_regex=rx, temperature=0) == plain
        assert ask(path, structured_outputs={"regex": rx}, temperature=0) == plain
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}},
              "required": ["colour"], "additionalProperties": False}
    plain = ask(CHAT, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
                temperature=0)
    jsonschema.validate(json.loads(plain[0]), schema)
    assert ask(CHAT, guided_json=schema, temperature=0) == plain
    assert ask(CHAT, guided_json=json.dumps(schema), temperature=0) == plain
    assert ask(CHAT, structured_outputs={"json": schema}, temperature=0) == plain
    obj = ask(CHAT, structured_outputs={"json_object": True}, temperature=0)
    assert obj == ask(CHAT, response_format={"type": "json_object"}, temperature=0) and obj[0].startswith("{")
    grammar = 'root ::= "yes" | "no" | "maybe"'
    assert ask(C, guided_grammar=grammar, temperature=0) == ask(C, ebnf=grammar, temperature=0)
    assert all(g in ("yes", "no", "maybe") for g in ask(CHAT, guided_grammar=grammar, temperature=1.0, n=4, seed=5))


def test_return_tokens_as_token_ids(server, tok):
    """vLLM's return_tokens_as_token_ids: logprobs name each token "token_id:<id>", and
    those ids are the answer's tokens (they decode to its text)."""
    r = server.post("/v1/completions", json={
        "model": "default", "prompt": "The sea is", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "logprobs": 2, "return_tokens_as_token_ids": True}).json()["choices"][0]
    ids = [int(re.fullmatch(r"token_id:(\d+)", t).group(1)) for t in r["logprobs"]["tokens"]]
    assert len(ids) == 8 and tok.decode(ids) == r["text"]
    assert all(re.fullmatch(r"token_id:\d+", k) for top in r["logprobs"]["top_logprobs"] for k in top)
    c = server.post("/v1/chat/completions", json={
        "model": "default", "messages": MSGS[:1], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}).json()["choices"][0]
    content = c["logprobs"]["content"]
    ids = [int(e["token"].split(":")[1]) for e in content]
    assert tok.decode(ids) == c["message"]["content"]
    assert all(bytes(e["bytes"]).decode() == e["token"] and len(e["top_logprobs"]) == 2 for e in content)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server, tok):
    """vLLM's truncate_prompt_tokens: the answer is the native API's on the prompt's last k
    tokens (of the tokenizer's own encoding, or of the rendered chat)."""
    prompt = "one two three four five six seven eight nine ten"
    ids = tok.encode(prompt, add_special_tokens=True)
    r = server.post("/v1/completions", json={"model": "default", "prompt": prompt, "max_tokens": 6,
                                             "temperature": 0, "ignore_eos": True, "truncate_prompt_tokens": 4,
                                             "echo": True}).json()
    assert r["usage"]["prompt_tokens"] == 4
    tail = tok.decode(ids[-4:])
    assert r["choices"][0]["text"] == tail + _greedy_from_ids(server, ids[-4:], 6)["text"]
    chat = tok.encode(tok.apply_chat_template(MSGS[:1], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)
    r = server.post("/v1/chat/completions", json={"model": "default", "messages": MSGS[:1], "max_tokens": 6,
                                                  "temperature": 0, "ignore_eos": True,
                                                  "truncate_prompt_tokens": 7}).json()
    assert r["usage"]["prompt_tokens"] == 7
    assert r["choices"][0]["message"]["content"] == _greedy_from_ids(server, chat[-7:], 6)["text"]


def test_chat_echo_prepends_the_assistant_message_it_continues(server):
    """vLLM's chat echo: with the last message the assistant's, the answer starts with it;
    the rest is the answer without echo, streamed or not."""
    base = {"model": "default", "messages": MSGS, "continue_final_message": True, "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    plain = server.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    echoed = server.post("/v1/chat/completions", json={**base, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == MSGS[-1]["content"] + plain
    r = server.post("/v1/chat/completions", stream=True, json={**base, "echo": True, "stream": True})
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(d.get("content") or "" for d in deltas) == MSGS[-1]["content"] + plain
    # a new turn (the last message the user's) has nothing to echo
    user_last = {**base, "messages": MSGS[:1], "continue_final_message": False, "echo": True}
    r = server.post("/v1/chat/completions", json=user_last).json()["choices"][0]["message"]["content"]
    assert r == server.post("/v1/chat/completions", json={**user_last, "echo": False}).json()[
        "choices"][0]["message"]["content"]


def test_response_format_on_completions(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = server.post("/v1/completions", json={
        "model": "default", "prompt": "A person, as JSON:", "max_tokens": 60, "temperature": 1.0, "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)


def test_rid_on_openai_requests_reaches_abort(server):
    """An /abort_request ends an OpenAI answer like any finish, with finish_reason "abort"
    and the text so far (SGLang's behaviour: only an abort with a status is an error)."""
    body = {"model": "default", "messages": MSGS[:1], "max_tokens": 400, "ignore_eos": True,
            "temperature": 0}
    r = server.abort_while_running(lambda: server.post("/v1/chat/completions", json={
        **body, "rid": "oai-abort-me"}), "oai-abort-me")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "abort"
    n = out["usage"]["completion_tokens"]
    assert 0 < n < 400
    # the text so far is the first n tokens of the same greedy answer
    full = server.post("/v1/chat/completions", json={**body, "max_tokens": n}).json()
    assert out["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"]

    def streamed():
        resp = server.post("/v1/completions", json={
            "model": "default", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
            "stream": True, "rid": "oai-abort-stream"}, stream=True)
        return resp, [x for x in resp.iter_lines(decode_unicode=True) if x]

    resp, lines = server.abort_while_running(streamed, "oai-abort-stream")
    assert resp.status_code == 200
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"

    def streamed_chat():
        resp = server.post("/v1/chat/completions", json={**body, "stream": True, "rid": "chat-abort-stream"},
                           stream=True)
        return resp, [x for x in resp.iter_lines(decode_unicode=True) if x]

    resp, lines = server.abort_while_running(streamed_chat, "chat-abort-stream")
    assert resp.status_code == 200
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "abort" and finishes.count("abort") == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    greedy = full["choices"][0]["message"]["content"]  # the same greedy answer, cut elsewhere
    m = min(len(text), len(greedy))
    assert text and text[:m] == greedy[:m]
    server.wait_idle()


def test_logit_bias_on_the_openai_endpoints(server, tok):
    """+100 on one token: every generated token is that one (the unbiased answer is not)."""
    target = tok.encode(" sea", add_special_tokens=False)[0]
    kw = {"model": "default", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = server.post("/v1/completions", json={**kw, "prompt": "Tell me", "logprobs": 0}).json()
    r = server.post("/v1/completions", json={**kw, "prompt": "Tell me", "logit_bias": {str(target): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode([target] * 5) != plain["choices"][0]["text"]
    r = server.post("/v1/chat/completions", json={**kw, "messages": MSGS[:1], "logit_bias": {target: 100}})
    assert r.json()["choices"][0]["message"]["content"] == tok.decode([target] * 5)


def test_stop_regex_on_the_openai_endpoints(server):
    """SGLang's stop_regex extra: the answer ends at the first match, which stays in the
    text; finish_reason stop, matched_stop the pattern; streamed the same."""
    kw = {"model": "default", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "prompt": "Count: 1, 2, 3,"}
    full = server.post("/v1/completions", json=kw).json()["choices"][0]["text"]
    m = re.search(r"[6-9],", full)
    assert m, full
    r = server.post("/v1/completions", json={**kw, "stop_regex": [r"[6-9],"]}).json()["choices"][0]
    assert r["text"] == full[:m.end()] and r["finish_reason"] == "stop" and r["matched_stop"] == "[6-9],"
    events = server.post("/v1/completions", json={**kw, "stop_regex": r"[6-9],", "stream": True}).text
    chunks = [json.loads(ln[6:]) for ln in events.splitlines() if ln.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_tokenize_and_detokenize_match_the_tokenizer(server, tok):
    texts = ["Hello world", "日本語のテキスト", " spaces  and\\nlines"]
    r = server.post("/v1/tokenize", json={"model": "default", "prompt": texts[0]}).json()
    assert r["tokens"] == tok.encode(texts[0]) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    r = server.post("/tokenize", json={"prompt": texts, "add_special_tokens": False}).json()
    assert r["tokens"] == [tok.encode(t, add_special_tokens=False) for t in texts]
    assert r["count"] == [len(x) for x in r["tokens"]]
    back = server.post("/v1/detokenize", json={"tokens": r["tokens"]}).json()["text"]
    assert back == [tok.decode(x, skip_special_tokens=True) for x in r["tokens"]] == texts
    one = server.post("/detokenize", json={"tokens": r["tokens"][1]}).json()["text"]
    assert one == texts[1]


def test_seeded_n_choices_are_different_reproducible_samples(server):
    """n copies of a seeded request draw from seed, seed + 1, ... (as vLLM's): n different
    samples, choice k equal to the n = 1 request with seed + k."""
    kw = {"model": "default", "prompt": "My favourite animal is the", "max_tokens": 8, "temperature": 1.0,
          "ignore_eos": True}
    texts = [c["text"] for c in server.post("/v1/completions", json={**kw, "n": 3, "seed": 1234}).json()["choices"]]
    assert len(set(texts)) == 3
    for k in range(3):
        one = server.post("/v1/completions", json={**kw, "seed": 1234 + k}).json()["choices"][0]["text"]
        assert one == texts[k]
    gen = server.post("/generate", json={"text": kw["prompt"], "sampling_params": {
        "max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 1234, "n": 2}}).json()
    assert [g["text"] for g in gen] == texts[:2]


def test_messages_as_clients_send_them(server, tok):
    """The openai client's message.model_dump() sends tool_calls, name, ... as null: they
    are left out, as SGLang and vLLM do (templates test `'tool_calls' in message`).  Text
    parts are joined with a newline, as vLLM does.  Reference: the tokenizer's own template
    on the messages as they should reach it."""
    def prompt_tokens(messages):
        r = server.post("/v1/chat/completions", json={"model": "default", "messages": messages,
                                                      "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    def want(messages):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))

    dumped = [MSGS[0], {**MSGS[1], "tool_calls": None, "name": None, "function_call": None,
                        "refusal": None, "audio": None}, {"role": "user", "content": "More."}]
    plain = [MSGS[0], MSGS[1], {"role": "user", "content": "More."}]
    assert prompt_tokens(dumped) == want(plain)
    from portaserve.server.openai_api import _messages

    assert _messages({"messages": dumped}) == plain  # what the template gets (Llama 3.1's
    # `'tool_calls' in message` then `message.tool_calls|length` failed on a null)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]}]
    assert prompt_tokens(parts) == want([{"role": "user", "content": "Hello\nWorld"}])
    assert want([{"role": "user", "content": "Hello\nWorld"}]) != want([{"role": "user", "content": "HelloWorld"}])


def _streamed_logprobs(server, body):
    """Per choice: the streamed chunks' logprobs joined, and the text."""
    events = server.post("/v1/completions", json={**body, "stream": True}).text
    out: dict = {}
    for ln in events.splitlines():
        if not ln.startswith("data: {"):
            continue
        for ch in json.loads(ln[6:])["choices"]:
            o = out.setdefault(ch["index"], {"text": "", "tokens": [], "token_logprobs": [], "text_offset": [],
                                             "top_logprobs": []})
            o["text"] += ch["text"]
            for key in ("tokens", "token_logprobs", "text_offset", "top_logprobs"):
                o[key] += (ch["logprobs"] or {}).get(key) or []
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("extra", [
    {"echo": True, "n": 2},  # choice 1 was once visited before its prompt's logprobs came: it lost them
    {"echo": True, "prompt": ["The capital of France is", "One two three"]},
    {"stop": ["xyzzy"]},  # text held back for a stop string shifted the streamed offsets
    {"prompt": "Emoji: \U0001F600\U0001F680 and"},  # characters split over tokens, held back too
])
def test_streamed_completion_logprobs_equal_the_unstreamed_ones(server, extra):
    body = {"model": "default", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": 1, **extra}
    whole = server.post("/v1/completions", json=body).json()["choices"]
    for _ in range(3):  # (the lost prompt logprobs depended on timing)
        _compare_streamed(_streamed_logprobs(server, body), whole)


def _compare_streamed(streamed, whole):
    assert len(streamed) == len(whole)
    for s, w in zip(streamed, whole):
        assert s["text"] == w["text"]
        for key in ("tokens", "text_offset"):
            assert s[key] == w["logprobs"][key], key
        # (values to float noise: the two runs' prompt passes are batched differently)
        assert s["token_logprobs"] == pytest.approx(w["logprobs"]["token_logprobs"], abs=1e-3, nan_ok=True)
        assert [t and sorted(t) for t in s["top_logprobs"]] == [t and sorted(t) for t in w["logprobs"]["top_logprobs"]]
        # the offsets index the text: each token's text sits at its offset (up to a token
        # holding part of a character, whose text is U+FFFD: offsets count that, as vLLM's)
        for t, off in zip(w["logprobs"]["tokens"], w["logprobs"]["text_offset"]):
            if "\ufffd" in t:
                break
            assert w["text"][off:off + len(t)] == t


def test_completion_top_logprobs_hold_the_chosen_token(server, tok):
    """As OpenAI's legacy completions and vLLM: top_logprobs has the chosen token too when
    it is not among the top ones (here forced by logit_bias, which logprobs ignore)."""
    target = tok.encode(" sea", add_special_tokens=False)[0]
    r = server.post("/v1/completions", json={"model": "default", "prompt": "Tell me", "max_tokens": 3,
                                            "temperature": 0, "logprobs": 1, "logit_bias": {str(target): 100}})
    lp = r.json()["choices"][0]["logprobs"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert token == tok.decode([target]) and top[token] == pytest.approx(value)
        assert len(top) == 2 and max(top.values()) > value  # the top one, and the chosen one


def test_stop_strings_kept_with_either_name(server):
    """A stop string is trimmed from the text; SGLang's no_stop_trim and vLLM's
    include_stop_str_in_output keep it (the latter was ignored)."""
    kw = {"model": "default", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "prompt": "Count: 1, 2, 3,"}
    full = server.post("/v1/completions", json=kw).json()["choices"][0]["text"]
    stop = full[4:7]
    cut = server.post("/v1/completions", json={**kw, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    for flag in ("no_stop_trim", "include_stop_str_in_output"):
        kept = server.post("/v1/completions", json={**kw, "stop": [stop], flag: True}).json()["choices"][0]
        assert kept["text"] == full[:full.index(stop) + len(stop)], flag


def test_a_request_chat_template_renders_only_when_the_server_trusts_it(tok):
    """vLLM's rule: a template sent with a request (chat_template, or inside
    chat_template_kwargs) is code the server would run, so it is refused unless the server
    was started with --trust-request-chat-template; trusted, it renders as transformers
    renders it."""
    from types import SimpleNamespace

    from portaserve.server.errors import APIError
    from portaserve.server.openai_api import _chat_prompt_ids

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "hi"}]
    want = tok.encode(tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)
    assert want == tok.encode("<user>hi", add_special_tokens=False)
    for trusted in (False, True):
        c = SimpleNamespace(tokenizer=tok, args=SimpleNamespace(trust_request_chat_template=trusted))
        for body, param in (({"messages": msgs, "chat_template": template}, "chat_template"),
                            ({"messages": msgs, "chat_template_kwargs": {"chat_template": template}},
                             "chat_template_kwargs")):
            if trusted:
                assert _chat_prompt_ids(c, body) == want
            else:
                with pytest.raises(APIError) as ei:
                    _chat_prompt_ids(c, body)
                assert ei.value.status == 400 and ei.value.param == param
                assert "--trust-request-chat-template" in ei.value.message
    # the server's own template is unaffected
    c = SimpleNamespace(tokenizer=tok, args=SimpleNamespace(trust_request_chat_template=False))
    own = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert _chat_prompt_ids(c, {"messages": msgs}) == tok.encode(own, add_special_tokens=False) != want


def test_earlier_tool_calls_reach_a_template_that_knows_no_tools(tok):
    """SmolLM2's template renders no tools: the server describes them in a system message
    (tool_calls.tools_system_prompt), and earlier assistant calls are written into the turn
    in that same <tool_call> form, where the template used to drop them and the model saw a
    tool result answering nothing (found by probing, session 17)."""
    from types import SimpleNamespace

    from portaserve.server import tool_calls
    from portaserve.server.openai_api import _chat_prompt_ids

    assert not tool_calls.template_knows_tools(tok.chat_template)
    assert not tool_calls.template_renders_calls(tok.chat_template)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22C sunny"}]
    as_text = [history[0], {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                            '{"city": "Paris"}}\n</tool_call>'}, history[2]]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    c = SimpleNamespace(tokenizer=tok, args=SimpleNamespace())
    for t in (None, tools):
        got = _chat_prompt_ids(c, {"messages": history}, t)
        assert got == _chat_prompt_ids(c, {"messages": as_text}, t)
        assert got != _chat_prompt_ids(c, {"messages": [history[0], {"role": "assistant", "content": ""},
                                                        history[2]]}, t)
        assert '"name": "get_weather"' in tok.decode(got)
    # a template that writes tool_calls itself keeps them, in its own format
    own = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% for c in m.tool_calls or [] %}"
           "[CALL {{ c.function.name }}]{% endfor %}{% endfor %}")
    assert tool_calls.template_renders_calls(own) and tool_calls.template_renders_calls({"default": own})
    c = SimpleNamespace(tokenizer=tok, args=SimpleNamespace(trust_request_chat_template=True))
    got = tok.decode(_chat_prompt_ids(c, {"messages": history, "chat_template": own}))
    assert "[CALL get_weather]" in got and "<tool_call>" not in got
