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
    (C, {"prompt": "x", "top_k": -2}, "top_k", "top_k"),
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
    (GEN, {"sampling_params": {"max_new_tokens": 2}}, "text or input_ids", "text"),
    (GEN, {"text": 5}, "text must be", "text"),
    (GEN, {"input_ids": [1, "a"]}, "input_ids must be a list of integers", "input_ids"),
    (GEN, {"input_ids": [-1]}, "vocabulary", "input_ids"),
    (GEN, {"text": "x", "sampling_params": {"bogus": 1}}, "unknown sampling parameter", "bogus"),
    (GEN, {"text": "x", "sampling_params": {"temperature": -1}}, "temperature", "temperature"),
    (GEN, {"text": "x", "sampling_params": {"max_new_tokens": 9000}}, "context length", "max_new_tokens"),
    (GEN, {"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params", "sampling_params"),
    (GEN, {"text": "x", "top_logprobs_num": -1, "return_logprob": True}, "top_logprobs_num", "top_logprobs_num"),
    # each of these once crashed the scheduler (the server went down) or wedged the HTTP side
    (GEN, {"text": "x", "top_logprobs_num": 49153, "return_logprob": True}, "vocabulary size", "top_logprobs_num"),
    # each top logprob is returned for every prompt and output token: 49152 of them over
    # a 300-token prompt held 3 GB in the scheduler, a few thousand tokens would exhaust RAM
    (GEN, {"text": "x", "top_logprobs_num": 21, "return_logprob": True}, "--max-top-logprobs-num",
     "top_logprobs_num"),
    (C, {"prompt": "x", "seed": 2 ** 64}, "seed must be in", "seed"),
    (GEN, {"text": "x", "sampling_params": {"sampling_seed": -2 ** 63 - 1}}, "seed must be in", "sampling_seed"),
    (GEN, {"text": "x", "sampling_params": {"skip_special_tokens": "no"}}, "must be a boolean", "skip_special_tokens"),
    (GEN, {"text": "x", "sampling_params": {"ignore_eos": "yes"}}, "must be a boolean", "ignore_eos"),
    # ... or answered 500
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": "x"}},
     "json_schema must be an object", "response_format"),
    (C, b'{"prompt": "\\ud800 lone"}', "lone surrogate", "prompt"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate", "messages"),
    (GEN, b'{"text": "x", "sampling_params": {"sampling_seed": 1' + b"0" * 5000 + b'}}', "cannot be read", None),
    (GEN, b"[" * 100000, "cannot be read", None),
    (GEN, {"text": "x", "sampling_params": [5]}, "sampling_params must be an object", "sampling_params"),
    (GEN, {"text": "x", "sampling_params": {"n": 129}}, "n must be", "n"),
    (C, {"prompt": "x", "regex": "[^\\x00-\\U0010FFFF]"}, "matches no text", None),
    (GEN, {"text": "x", "sampling_params": {"regex": "[^\\x00-\\U0010FFFF]"}}, "matches no text", None),
    # fields the server knows and cannot honour: refused, not silently ignored
    (C, {"prompt": "x", "lora_path": "my-adapter"}, "LoRA", "lora_path"),
    (CHAT, {"messages": MSG, "stop_regex": "(unclosed"}, "not a valid regular expression", "stop_regex"),
    (GEN, {"text": "x", "sampling_params": {"stop_regex": ["a", 5]}}, "stop_regex must be", "stop_regex"),
    (CHAT, {"messages": MSG, "logit_bias": {"five": 10}}, "not a token id", "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"5": 101}}, "from -100 to 100", "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"49152": 1}}, "outside the vocabulary", "logit_bias"),
    (GEN, {"text": "x", "sampling_params": {"logit_bias": [1, 2]}}, "logit_bias must be an object", "logit_bias"),
    (C, {"prompt": "x", "stop_token_ids": [2, 49152]}, "outside the vocabulary", "stop_token_ids"),
    (GEN, {"text": "x", "sampling_params": {"stop_token_ids": [-1]}}, "outside the vocabulary", "stop_token_ids"),
    (GEN, {"text": "x", "image_data": "a.png"}, "image", "image_data"),
    (GEN, {"text": "x", "lora_path": "my-adapter"}, "LoRA", "lora_path"),
    (GEN, {"text": "x", "return_hidden_states": True}, "return_hidden_states", "return_hidden_states"),
    (CHAT, {"messages": MSG, "continue_final_message": True}, "last message", "continue_final_message"),
    (CHAT, {"messages": MSG + [{"role": "assistant", "content": "Sure"}], "continue_final_message": True,
            "add_generation_prompt": True}, "cannot both", "continue_final_message"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"add_generation_prompt": "yes"}}, "boolean",
     "add_generation_prompt"),
    # a template is code the server would run (found by probing, session 17: a nested loop held
    # every other request for seconds); vLLM refuses it too unless trusted
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}},
     "--trust-request-chat-template", "chat_template_kwargs"),
    (CHAT, {"messages": MSG, "chat_template": "{{ 'x' }}"}, "--trust-request-chat-template", "chat_template"),
    (C, {"prompt": "x", "json_schema": '{"anyOf": []}'}, "matches no value", "json_schema"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"oneOf": []}}, "required": ["a"]}}}},
     "matches no value", "response_format"),
    # errors name the field the client set, not the constraint built from it
    (CHAT, {"messages": MSG, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}]},
     "invalid tools", "tools"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"}, "regex": "a+"},
     "only one of response_format, regex", "regex"),
    (C, {"prompt": ["a", "b"], "rid": ["only-one"]}, "rid must be", "rid"),
    ("/v1/tokenize", {"prompt": 5}, "prompt must be", "prompt"),
    ("/v1/detokenize", {"tokens": [1, "a"]}, "tokens must be", "tokens"),
    ("/v1/detokenize", {"tokens": [[1], [99999999]]}, "outside the vocabulary", "tokens"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"continue_final_message": "yes"}}, "boolean",
     "continue_final_message"),
    (C, {"prompt": "x", "response_format": {"type": "yaml"}}, "response_format.type", "response_format"),
    # found by probing (session 12): 500s, a dead scheduler, or a stalled one
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}",
     "out of range", "temperature"),
    (C, b'{"prompt": "hi", "logit_bias": {"1": 1' + b"0" * 400 + b"}}", "from -100 to 100", "logit_bias"),
    (GEN, b'{"text": "x", "sampling_params": {"temperature": 1' + b"0" * 400 + b"}}", "out of range",
     "temperature"),
    (C, {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "must not exceed max_tokens", "min_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 8, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}},
     "matches no finite text", None),
    (CHAT, {"messages": MSG, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}]},
     "matches no finite text", None),
    (GEN, {"text": "x", "sampling_params": {"json_schema": '{"type": "array", "items": {"$ref": "#"}, '
                                                           '"minItems": 1}'}}, "matches no finite text", None),
    (C, {"prompt": "x", "max_tokens": 4, "regex": "a{20000000}"}, "forces a text of 20000000", "regex"),
    (GEN, {"text": "x", "sampling_params": {"ebnf": 'root ::= "a" root'}}, "matches no finite text", None),
    (GEN, {"text": ["a", "b"], "rid": ["same"]}, "rid", "rid"),
    (C, {"prompt": "x", "max_tokens": 4, "json_schema": {"type": "string"},
         "response_format": {"type": "json_object"}}, "only one of", "response_format"),
    # a dead end after the first characters, found while generating (it was a 500)
    (C, {"prompt": "x", "max_tokens": 4, "regex": "a[^\\s\\S]"}, "matches no complete text", "regex"),
    (CHAT, {"messages": MSG, "max_tokens": 8, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "^x[^\\s\\S]$"}}}}, "matches no complete text",
     "json_schema"),
    (GEN, {"text": "x", "sampling_params": {"ebnf": 'root ::= "a" x\nx ::= [^\\x00-\\U0010FFFF]'}},
     "matches no complete text", "ebnf"),
    (GEN, {"text": "x", "return_logprob": True, "logprob_start_len": 100}, "logprob_start_len (100)",
     "logprob_start_len"),
    (GEN, {"text": "x", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len (-2)",
     "logprob_start_len"),
    # pydantic's lax types, as SGLang and vLLM take them, but no further
    (C, {"prompt": "x", "max_tokens": 2.5}, "max_tokens must be an integer", "max_tokens"),
    (CHAT, {"messages": MSG, "logprobs": 2}, "logprobs must be a boolean", "logprobs"),
    (GEN, {"text": "x", "sampling_params": {"max_new_tokens": 2.5}}, "max_new_tokens must be an integer",
     "max_new_tokens"),
    (GEN, {"text": "x", "sampling_params": {"ignore_eos": 2}}, "ignore_eos must be a boolean", "ignore_eos"),
    # vLLM's fields (found by an audit, session 22: each was a 200 that ignored it)
    (CHAT, {"messages": MSG, "use_beam_search": True}, "beam search", "use_beam_search"),
    (C, {"prompt": "x", "allowed_token_ids": [1, 2]}, "allowed_token_ids", "allowed_token_ids"),
    (C, {"prompt": "x", "bad_words": ["a"]}, "bad_words", "bad_words"),
    (C, {"prompt": "x", "prompt_logprobs": 1}, "echo", "prompt_logprobs"),
    (C, {"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be", "truncate_prompt_tokens"),
    (CHAT, {"messages": MSG, "guided_choice": []}, "non-empty list", "guided_choice"),
    (CHAT, {"messages": MSG, "guided_choice": ["a", 5]}, "non-empty list", "guided_choice"),
    (CHAT, {"messages": MSG, "guided_json": {}, "guided_regex": "a"}, "only one output constraint", "guided_regex"),
    (C, {"prompt": "x", "response_format": {"type": "json_object"}, "guided_regex": "a"},
     "only one output constraint may be set (got guided_regex and response_format)", "guided_regex"),
    (C, {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "only one output constraint",
     "structured_outputs.choice"),
    (C, {"prompt": "x", "structured_outputs": {"structural_tag": "{}"}}, "not supported",
     "structured_outputs.structural_tag"),
    (C, {"prompt": "x", "structured_outputs": {"json": 5}}, "JSON schema", "structured_outputs.json"),
    (C, {"prompt": "x", "guided_regex": "(unclosed"}, "guided_regex", "guided_regex"),
    (CHAT, {"messages": MSG, "guided_grammar": 'root ::= "a" root'}, "matches no finite text", None),
    (CHAT, {"messages": [{"role": "assistant", "content": "x", "tool_calls": "oops"}] + MSG},
     "tool_calls must be a list", "messages"),
    (CHAT, {"messages": [{"role": "assistant", "content": "x", "tool_calls": ["oops"]}] + MSG},
     "tool_calls[0] must be an object", "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "name": 5}]}, "name must be a string", "messages"),
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
    server.wait_idle()
    assert server.post("/flush_cache").status_code == 200  # nothing left holding KV


def test_top_k_beyond_any_vocabulary_means_no_limit(server):
    """top_k larger than an int64 once crashed the scheduler; it limits nothing, as -1."""
    body = {"input_ids": [3, 14, 15], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    want = server.post(GEN, json=body).json()["output_ids"]
    body["sampling_params"]["top_k"] = 10 ** 30
    r = server.post(GEN, json=body)
    assert r.status_code == 200 and r.json()["output_ids"] == want


def test_streamed_grammar_that_matches_nothing_is_a_400_before_the_stream_starts(server):
    """Refused in the scheduler (its grammar matches no text) before any token: the
    stream's headers are held until its first token, so the answer is a 400 with an error
    body, as for the same request unstreamed -- on every streaming endpoint."""
    regex = "[^\\x00-\\U0010FFFF]"
    for path, body in ((C, {"prompt": "x", "max_tokens": 4, "regex": regex}),
                       (CHAT, {"messages": MSG, "max_tokens": 4, "regex": regex}),
                       (GEN, {"text": "x", "sampling_params": {"max_new_tokens": 4, "regex": regex}})):
        r = server.post(path, json={**body, "stream": True})
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "matches no text" in err["message"], err
    assert server.post(GEN, json={"text": "x", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_unknown_route_is_openai_shaped_404(server):
    r = server.get("/v1/nope")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_context_overflow_is_openais_context_length_exceeded(server):
    """Clients (agent loops, crewAI, ...) look for OpenAI's code and wording to shorten a
    conversation and retry."""
    long = [{"role": "user", "content": "hello " * 9000}]
    for path, body, param in ((CHAT, {"messages": long, "max_tokens": 1}, "messages"),
                              (C, {"prompt": "x", "max_tokens": 100000}, "max_tokens"),
                              (CHAT, {"messages": MSG, "max_completion_tokens": 100000}, "max_completion_tokens")):
        r = requests.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == param, err
        assert err["message"].startswith("This model's maximum context length is 8192 tokens."), err


def test_lax_json_types_as_pydantic_takes_them(server):
    """16.0 is an integer and 0/1 are booleans to pydantic, which SGLang and vLLM validate
    with; clients written against them send such values."""
    r = requests.post(server.url + C, json={"prompt": "Hello", "max_tokens": 3.0, "ignore_eos": 1,
                                            "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    r = requests.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 2, "logprobs": 1,
                                               "top_logprobs": 2.0}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    r = requests.post(server.url + C, json={"prompt": "Hello", "max_tokens": 3, "top_k": 0,
                                            "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text  # 0 is "off", as in vLLM
    # the native API and the Engine take the same (one validation of sampling params)
    r = requests.post(server.url + GEN, json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 3.0, "ignore_eos": 1, "temperature": 0, "sampling_seed": 5.0}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 3
    r = requests.post(server.url + GEN, json={"text": "Hello", "return_logprob": 1, "top_logprobs_num": 2.0,
                                              "logprob_start_len": 0.0, "sampling_params": {
                                                  "max_new_tokens": 2, "n": 2.0}}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()) == 2 and len(r.json()[0]["meta_info"]["output_top_logprobs"][0]) == 2


def test_model_names_a_client_may_use(server):
    """The served name, and the same model named as a Hugging Face id or a path ending in
    it (SGLang and vLLM serve under the --model-path as given); another model is a 404."""
    served = requests.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    for name in (served, f"HuggingFaceTB/{served}", f"./models/{served}/", "default"):
        r = requests.post(server.url + C, json={"prompt": "x", "max_tokens": 1, "model": name}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == served, (name, r.text)
        if name != "default":  # GET /v1/models/{name} agrees
            assert requests.get(f"{server.url}/v1/models/{name.strip('./')}", timeout=30).status_code == 200
    # another model: 404 model_not_found, as OpenAI and vLLM answer, on both endpoints
    for path, body in ((C, {"prompt": "x", "max_tokens": 1}), (CHAT, {"messages": MSG, "max_tokens": 1})):
        r = requests.post(server.url + path, json={**body, "model": f"{served}-v2"}, timeout=60)
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model" and "does not exist" in err["message"]


def test_a_refused_constraint_leaves_no_traceback_in_the_log(server):
    """A constraint refused while checked ahead (a 400 to its client) is not also logged
    as an unread asyncio exception with a traceback (any client could fill the log)."""
    import time
    import uuid

    for body in ({"prompt": "x", "max_tokens": 2, "regex": f"(unclosed{uuid.uuid4().hex}"},
                 {"prompt": "x", "max_tokens": 2, "json_schema": {"type": f"t{uuid.uuid4().hex}"}}):
        assert requests.post(server.url + C, json=body, timeout=60).status_code == 400
    for _ in range(3):  # the futures go with a cycle (the error's frames): let the collector run
        assert requests.post(server.url + C, json={"prompt": "x", "max_tokens": 1}, timeout=60).status_code == 200
    time.sleep(1.0)
    assert "never retrieved" not in server.log_path.read_text(errors="replace")
