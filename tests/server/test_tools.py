"""Tool calling on /v1/chat/completions through the openai client."""
from __future__ import annotations

import json

import jsonschema
import pytest

from conftest import ServerProc
from portaserve.server import tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
                   "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
MSGS = [{"role": "user", "content": "What's the weather like in Paris right now?"}]


def _check_calls(calls, allowed):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_always_parses(oai, temperature):
    for seed in range(3):
        r = oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER, TIME],
                                        tool_choice="required", temperature=temperature, seed=seed,
                                        max_tokens=200)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        _check_calls(ch.message.tool_calls, {"get_weather", "get_time"})


def test_named_function(oai):
    r = oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER, TIME],
                                    tool_choice={"type": "function", "function": {"name": "get_time"}},
                                    max_tokens=60)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and r.choices[0].finish_reason == "stop"
    _check_calls(calls, {"get_time"})


def test_a_function_may_be_named_like_a_tool_choice_keyword(oai):
    """tool_choice {"function": {"name": "auto"}} names the function "auto": the answer is
    constrained to one call of it (it was taken for tool_choice "auto", free text)."""
    fn = {"type": "function", "function": {**TIME["function"], "name": "auto"}}
    for name in ("auto", "none", "required"):
        tool = {"type": "function", "function": {**TIME["function"], "name": name}}
        r = oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER, tool],
                                        tool_choice={"type": "function", "function": {"name": name}},
                                        max_tokens=60, temperature=0)
        calls = r.choices[0].message.tool_calls
        assert calls and len(calls) == 1 and calls[0].function.name == name, r
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["get_time"])
    assert tool_calls.parse_tool_choice("auto", [fn]) == ("auto", None)


def _stream(client, **kw):
    """Reassemble a streamed chat answer as a client would; also checks the delta shapes:
    a call's first delta carries id, type, name and empty arguments, the later ones only
    argument fragments.  Returns (content, {index: call}, finish_reason, order of deltas)."""
    content, calls, finish, order = "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            d = c.delta
            if d.content:
                content += d.content
                order.append("content")
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    assert tc.function.arguments == "", tc
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "fragments": []}
                    order.append(("call", tc.index))
                else:
                    assert tc.id is None and tc.function.name is None, tc
                    calls[tc.index]["fragments"].append(tc.function.arguments)
            finish = c.finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))
    return content, calls, finish, order


def _same_as_unstreamed(client, expect_calls, expect_finish="tool_calls", **kw):
    """Stream and don't stream the same (deterministic) request: the argument fragments
    concatenate to the unstreamed arguments, the calls and the content are the same."""
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    content, calls, finish, order = _stream(client, **kw)
    assert finish == r.choices[0].finish_reason == expect_finish
    assert [c.function.name for c in msg.tool_calls] == [calls[i]["name"] for i in range(len(calls))]
    assert len(calls) == expect_calls
    for i, call in enumerate(msg.tool_calls):
        streamed = "".join(calls[i]["fragments"])
        assert streamed == call.function.arguments
        assert json.loads(streamed) == json.loads(call.function.arguments)
        jsonschema.validate(json.loads(streamed), SCHEMAS[call.function.name])
        assert len(calls[i]["fragments"]) > 1  # streamed as generated, not in one piece
    assert content == (msg.content or "")
    return content, order


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_tool_call_deltas_required(oai, seed):
    _same_as_unstreamed(oai, 1, model="default", messages=MSGS, tools=[WEATHER], tool_choice="required",
                        max_tokens=60, temperature=1.0, seed=seed)


def test_streaming_tool_call_deltas_named(oai):
    # a named tool_choice ends with "stop" (OpenAI's API, vLLM); auto and required with "tool_calls"
    _same_as_unstreamed(oai, 1, "stop", model="default", messages=MSGS, tools=[WEATHER, TIME],
                        tool_choice={"type": "function", "function": {"name": "get_time"}},
                        max_tokens=60, temperature=0)


# The default model rarely calls a tool on its own; a regex makes its free ("auto") output
# take a parser's format, with the city, unit and timezone still written by the model.
CITY = r'"city": "[A-Za-z]{2,10}", "unit": "(celsius|fahrenheit)"'
HERMES_OUT = (r'Sure, let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{' + CITY
              + r'\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "[A-Z]{3}"\}\}'
              r'\n</tool_call>')
LLAMA3_OUT = (r'<\|python_tag\|>\{"name": "get_weather", "parameters": \{' + CITY
              + r'\}\}; \{"name": "get_time", "parameters": \{"tz": "[A-Z]{3}"\}\}')


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_hermes_calls_among_text(oai, seed):
    content, order = _same_as_unstreamed(
        oai, 2, model="default", messages=MSGS, tools=[WEATHER, TIME], tool_choice="auto", max_tokens=100,
        temperature=1.0, seed=seed, extra_body={"regex": HERMES_OUT})
    # the text before the calls streams as content, ahead of the calls
    assert content == "Sure, let me check."
    assert order[0] == "content" and order[-2:] == [("call", 0), ("call", 1)]


@pytest.mark.parametrize("written", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": True}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": null}\n</tool_call>',
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"',  # cut short by EOS
])
def test_a_call_that_does_not_parse_leaves_the_answer_as_text(oai, written):
    """A free ("auto") answer whose call is not JSON, or stops part-way, comes back whole as
    content with no tool_calls (as vLLM answers), not as a call a client cannot json.loads;
    a well-formed call in the same form is a call (the parse is what decides)."""
    import re

    kw = dict(model="default", messages=MSGS, tools=[WEATHER, TIME], tool_choice="auto", max_tokens=60,
              temperature=0)
    r = oai.chat.completions.create(extra_body={"regex": re.escape(written)}, **kw).choices[0]
    assert r.message.tool_calls is None and r.message.content == written and r.finish_reason == "stop"
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    r = oai.chat.completions.create(extra_body={"regex": re.escape(good)}, **kw).choices[0]
    assert [c.function.name for c in r.message.tool_calls] == ["get_weather"]
    assert json.loads(r.message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert r.finish_reason == "tool_calls"


def test_parallel_tool_calls_false_keeps_one_call(oai):
    """The same two-call output (a regex makes the model write two hermes calls) comes back
    as two calls, and as one with parallel_tool_calls false, streamed or not; tool_choice
    required then constrains the output to a single call."""
    kw = dict(model="default", messages=MSGS, tools=[WEATHER, TIME], tool_choice="auto", max_tokens=100,
              temperature=1.0, seed=0, extra_body={"regex": HERMES_OUT})
    two = oai.chat.completions.create(**kw).choices[0].message.tool_calls
    assert [c.function.name for c in two] == ["get_weather", "get_time"]
    r = oai.chat.completions.create(parallel_tool_calls=False, **kw)
    one = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in one] == [
        (two[0].function.name, two[0].function.arguments)]
    _, calls, finish, _ = _stream(oai, parallel_tool_calls=False, **kw)
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["get_weather"]
    assert "".join(calls[0]["fragments"]) == one[0].function.arguments
    assert tool_calls.constraint_schema([WEATHER, TIME], "required", parallel=False)["maxItems"] == 1
    for seed in range(3):
        r = oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER, TIME],
                                        tool_choice="required", temperature=1.0, seed=seed,
                                        max_tokens=200, parallel_tool_calls=False)
        assert len(r.choices[0].message.tool_calls) == 1


def _parser_client(tmp_path_factory, parser):
    """An OpenAI client of a server started with --tool-call-parser parser (a generator)."""
    openai = pytest.importorskip("openai")
    s = ServerProc(["--max-total-tokens", "4096", "--tool-call-parser", parser],
                   tmp_path_factory.mktemp(parser) / "server.log")
    try:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def llama3_oai(tmp_path_factory):
    yield from _parser_client(tmp_path_factory, "llama3")


def test_streaming_llama3_calls(llama3_oai):
    content, _ = _same_as_unstreamed(
        llama3_oai, 2, model="default", messages=MSGS, tools=[WEATHER, TIME], tool_choice="auto",
        max_tokens=100, temperature=1.0, seed=3, extra_body={"regex": LLAMA3_OUT})
    assert content == ""


V11_CALLS = ('[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris"}'
             '[TOOL_CALLS]get_weather[CALL_ID]def456UVW[ARGS]{"city": "Rome"}')
V13_CALLS = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'


def test_stream_parser_any_split():
    """Whatever the pieces the text arrives in, the deltas add up to the whole-text parse."""
    import random

    names = {"get_weather", "get_time"}
    rng = random.Random(0)
    for text, fmt in [
        ('Hi <b>there</b>\n<tool_call>\n{"arguments": {"city": "Pa\\"ris}", "x": [1, {"a": "]"}]}, '
         '"name": "get_weather"}\n</tool_call> bye', "hermes"),
        ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', "hermes"),
        ('{"name": "get_time", "parameters": {"tz": "UTC"}}; {"name": "get_weather", "parameters": {}}', "llama3"),
        ('[{"name": "get_weather", "arguments": {"city": "Par', "constrained"),
        ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"tz": "UTC"}}, '
         '{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "mistral"),
        ('[{"name": "get_time", "arguments": {"tz": "CET"}}]', "mistral"),  # the tag decoded away
        ('[TOOL_CALLS is not a call', "mistral"),
        ('[1, 2] is a list, not calls', "mistral"),
        ('[TOOL_CALLS] [{"nom": "x"}] no name', "mistral"),
        ('[{"name": "get_time", "arguments": {"tz": "CET"}}] and some words after', "mistral"),
        # Mistral tokenizer v11+ (one head per call), as mistral_common 1.12's own v11 and v13
        # chat templates (build_chat_template) render an assistant turn with two calls
        (V11_CALLS, "mistral"),
        (V13_CALLS, "mistral"),
        ('get_time{"tz": "EST"}', "mistral"),  # v13, the special tokens decoded away
        ('[TOOL_CALLS]get_time[ARGS]{"tz": "CET"} and some words after', "mistral"),
        ('[TOOL_CALLS]unknown[ARGS]{"tz": "XYZ"}', "mistral"),
        ('get_time is not a call', "mistral"),
        ('[TOOL_CALLS] get_time [ARGS] {"tz": "CET"}', "mistral"),  # spaces between special tokens
        ('[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Par', "mistral"),
        # a call without arguments: "{}" (as SGLang), not "" (which clients cannot json.loads)
        ('<tool_call>\n{"name": "get_time"}\n</tool_call>', "hermes"),
        ('{"name": "get_time"}', "llama3"),
    ]:
        content, calls, complete = tool_calls.parse(text, fmt, names)
        for _ in range(20):
            p = tool_calls.ToolCallStream(fmt, names)
            i, deltas = 0, []
            while i < len(text):
                n = rng.randint(1, 6)
                deltas += p.feed(text[i:i + n])
                i += n
            deltas += p.finish()
            for d in deltas:  # a call's header carries no arguments yet
                assert all(tc["function"]["arguments"] == "" for tc in d.get("tool_calls", []) if "id" in tc)
            got = "".join(d.get("content", "") for d in deltas) or None
            args = {}
            for d in deltas:
                for tc in d.get("tool_calls", []):
                    args[tc["index"]] = args.get(tc["index"], "") + tc["function"]["arguments"]
            assert got == content
            assert [args[i] for i in sorted(args)] == [c["function"]["arguments"] for c in calls]
        if fmt == "hermes" and calls and "Hi" in text:
            assert content == "Hi <b>there</b> bye"
            assert json.loads(calls[0]["function"]["arguments"])["city"] == 'Pa"ris}'
        if "unknown" in text:
            assert calls == [] and content == text  # not a tool: the text stays content
        if fmt == "llama3" and "UTC" in text:
            assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"] and complete
        if fmt == "constrained":
            assert not complete and calls[0]["function"]["arguments"] == '{"city": "Par'
        if fmt == "mistral" and "Oslo" in text:
            assert content is None and complete
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
                ("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Oslo"})]
        if fmt == "mistral" and calls:  # Mistral's templates take 9-character ids only
            assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
        if fmt == "mistral" and "CET" in text:
            assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "CET"}
            assert content == (" and some words after" if "after" in text else None)
        if fmt == "mistral" and ("not a call" in text or "not calls" in text or "no name" in text
                                 or "unknown" in text):
            assert calls == [] and content == text
        if text in (V11_CALLS, V13_CALLS):
            assert content is None and complete
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
                ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
            if text == V11_CALLS:  # the model's own ids (which the template takes back)
                assert [c["id"] for c in calls] == ["abc123XYZ", "def456UVW"]
        if '{"name": "get_time"}' in text:
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_time", "{}")]
            assert complete
        if "EST" in text:
            assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"tz": "EST"}
        if "Par" in text and "CALL_ID" in text and "Rome" not in text:  # cut short
            assert not complete and calls[0]["function"]["arguments"] == '{"city": "Par'


def test_auto_and_none(oai):
    r = oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER], tool_choice="auto",
                                    max_tokens=60, temperature=0)
    m = r.choices[0].message
    if m.tool_calls:  # the model chose to call: then the call parses
        assert r.choices[0].finish_reason == "tool_calls"
        for call in m.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert isinstance(m.content, str)
    r = oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER], tool_choice="none",
                                    max_tokens=8)
    assert r.choices[0].message.tool_calls is None


ADDR = {"$defs": {"Addr": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                           "required": ["city"], "additionalProperties": False}},
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Addr"}}, "required": ["to"],
        "additionalProperties": False}
TREE = {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "child": {"$ref": "#"}},
        "required": ["v"], "additionalProperties": False}


@pytest.mark.parametrize("choice", ["required", "send", "tree", "free"])
def test_constrained_calls_follow_schemas_with_refs(oai, choice):
    """Parameters using $defs / $ref (pydantic's schemas always do) under tool_choice
    required or named: they were nested in the list-of-calls schema unchanged, so
    "#/$defs/Addr" was not found (a 400) and "#" meant the whole list (the model had to
    write calls inside the arguments).  Each call's arguments validate against the
    tool's own schema; parameters {} give an object."""
    tools = [{"type": "function", "function": {"name": "send", "parameters": ADDR}},
             {"type": "function", "function": {"name": "tree", "parameters": TREE}},
             {"type": "function", "function": {"name": "free", "parameters": {}}}]
    schemas = {"send": ADDR, "tree": TREE, "free": {"type": "object"}}
    tc = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    whole = 0
    for seed in range(3):
        r = oai.chat.completions.create(model="default", messages=MSGS, tools=tools, tool_choice=tc,
                                        temperature=1.0, seed=seed, max_tokens=300)
        ch = r.choices[0]
        if ch.finish_reason == "length":
            continue  # cut short: not a whole call
        whole += 1
        assert ch.message.tool_calls, ch
        for call in ch.message.tool_calls:
            assert choice == "required" or call.function.name == choice
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert whole >= 2


def test_hoisted_parameters_keep_their_meaning():
    """The rewrite of $refs (offline, against jsonschema): a definition named "root", the
    same name under $defs and definitions, and a $ref-shaped value inside const are each
    kept apart (found by review)."""
    params = {"type": "object", "properties": {
        "r": {"$ref": "#/$defs/root"}, "d": {"$ref": "#/definitions/X"}, "x": {"$ref": "#/$defs/X"},
        "c": {"const": {"$ref": "#/x"}}},
        "required": ["r", "d", "x", "c"],
        "$defs": {"root": {"type": "integer"}, "X": {"type": "string"}}, "definitions": {"X": {"type": "boolean"}}}
    schema = tool_calls.constraint_schema([{"type": "function", "function": {"name": "f", "parameters": params}}],
                                          "function", name="f")
    good = {"r": 5, "d": True, "x": "s", "c": {"$ref": "#/x"}}
    jsonschema.validate(good, params)  # the reference itself
    jsonschema.validate([{"name": "f", "arguments": good}], schema)
    for bad in ({**good, "r": {"r": 5}}, {**good, "d": "s"}, {**good, "x": True}, {**good, "c": {"$ref": "#/$defs/x"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([{"name": "f", "arguments": bad}], schema)


def test_bad_tools_are_400(server):
    for body, param in [({"tools": "x"}, "tools"),
                        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        # arguments are an object: OpenAI refuses other parameter types too
                        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                            "type": "string"}}}]}, "tools"),
                        # constrained calls could break a schema feature the grammar does not
                        # enforce (core/schema_check.py): refused, naming the tool
                        ({"tools": [WEATHER, UNIQUE], "tool_choice": "required"}, "tools"),
                        ({"tools": [WEATHER, UNIQUE], "tool_choice": {"type": "function",
                                                                      "function": {"name": "tag"}}}, "tools"),
                        ({"response_format": {"type": "json_schema", "json_schema": {
                            "name": "x", "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}},
                         "response_format")]:
        r = server.post("/v1/chat/completions", json={"model": "default", "messages": MSGS, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    r = server.post("/v1/chat/completions", json={"model": "default", "messages": MSGS,
                                                  "tools": [WEATHER, UNIQUE], "tool_choice": "required"})
    assert "tools[1].function.parameters at /properties/tags: 'uniqueItems'" in r.json()["error"]["message"]
    # only the constrained tool's schema matters: naming the other one, or auto, is served
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "auto"):
        r = server.post("/v1/chat/completions", json={"model": "default", "messages": MSGS, "max_tokens": 8,
                                                      "tools": [WEATHER, UNIQUE], "tool_choice": choice})
        assert r.status_code == 200, r.text


UNIQUE = {"type": "function", "function": {"name": "tag", "parameters": {
    "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    "required": ["tags"]}}}


def test_parsers():
    names = {"get_weather"}
    # tool_choice required / named on a Mistral model: the constrained list, with the
    # 9-character ids Mistral's templates take back on the next turn
    _, calls, _ = tool_calls.parse('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
                                   "constrained", names, id_style="mistral")
    assert len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()
    _, calls, _ = tool_calls.parse('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "constrained", names)
    assert calls[0]["id"].startswith("call_")
    content, calls = tool_calls.parse_free(
        'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "hermes", names)
    assert content == "Sure." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    content, calls = tool_calls.parse_free(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "llama3", names)
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    content, calls = tool_calls.parse_free("Just text.", "llama3", names)
    assert content == "Just text." and calls == []
    assert tool_calls.detect_parser("{{ '<|python_tag|>' }}", None) == "llama3"
    assert tool_calls.detect_parser("<tool_call>", None) == "hermes"
    assert tool_calls.detect_parser("{{ '[AVAILABLE_TOOLS]' }} ... [TOOL_CALLS]", None) == "mistral"


MISTRAL_OUT = (r'\[TOOL_CALLS\]get_weather\[ARGS\]\{' + CITY
               + r'\}\[TOOL_CALLS\]get_time\[ARGS\]\{"tz": "[A-Z]{3}"\}')


@pytest.fixture(scope="module")
def mistral_oai(tmp_path_factory):
    yield from _parser_client(tmp_path_factory, "mistral")


def test_streaming_mistral_v13_calls(mistral_oai):
    """Mistral's newer call format end to end (a regex makes the model write it): two calls,
    streamed as unstreamed; the answer's special tokens are kept for the parser, and the
    end-of-sequence token that ended it is not left in the text."""
    content, _ = _same_as_unstreamed(
        mistral_oai, 2, model="default", messages=MSGS, tools=[WEATHER, TIME], tool_choice="auto",
        max_tokens=100, temperature=1.0, seed=3, extra_body={"regex": MISTRAL_OUT})
    assert content == ""
    r = mistral_oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER, TIME],
                                            tool_choice="auto", max_tokens=100, temperature=1.0, seed=3,
                                            extra_body={"regex": MISTRAL_OUT})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]


def _random_json(rng, depth=0):
    kind = rng.choice(["obj", "arr", "str", "int", "float", "lit"] if depth < 3 else ["str", "int", "float", "lit"])
    if kind == "obj":
        return {rng.choice(["a", "b\"c", "é\n", "k\\", "\u2028"]) + str(i): _random_json(rng, depth + 1)
                for i in range(rng.randint(0, 3))}
    if kind == "arr":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "str":
        return "".join(rng.choice(['x', '"', '\\', '\t', '/', 'ü', '\x01', '😀', ' ']) for _ in range(rng.randint(0, 4)))
    if kind == "int":
        return rng.choice([0, -1, 7, 12345678901234567890, -0])
    if kind == "float":
        return rng.choice([0.5, -2.25e-7, 1e300, 3.0])
    return rng.choice([True, False, None])


def _checked(text: str):
    """(every character accepted, the object closed at the last one)."""
    v = tool_calls._JSONObject()
    for i, ch in enumerate(text):
        if not v.feed(ch):
            return False, False
        if v.done and i != len(text) - 1:
            return False, False
    return True, v.done


def test_arguments_json_check_agrees_with_the_json_module():
    """The incremental check a call's arguments pass through (streamed only as far as they
    are JSON) against json.loads: every serialised object passes whole and closes at its
    last character; of mutated texts, those that pass and close are objects json.loads
    reads, and every text json.loads reads as an object passes."""
    import random

    rng = random.Random(0)
    passed = failed = 0
    for _ in range(3000):
        obj = {"k": _random_json(rng)} if rng.random() < 0.5 else {
            f"p{i}": _random_json(rng) for i in range(rng.randint(0, 3))}
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]),
                          separators=rng.choice([None, (",", ":")]))
        assert _checked(text) == (True, True), text
        for _ in range(3):
            t = list(text)
            i = rng.randrange(len(t))
            op = rng.choice(["del", "ins", "rep"])
            c = rng.choice(list('{}[]",:\\ 0-1.eE+tnaxu\n'))
            if op == "del":
                del t[i]
            elif op == "ins":
                t.insert(i, c)
            else:
                t[i] = c
            m = "".join(t)
            try:
                ref = json.loads(m)
                ok = isinstance(ref, dict) and m == m.strip() and not any(
                    w in m for w in ("NaN", "Infinity"))
            except ValueError:
                ok = False
            accepted, done = _checked(m)
            assert (accepted and done) == ok, m
            passed += ok
            failed += not ok
    assert passed > 100 and failed > 1000  # both sides were exercised


def test_calls_with_arguments_that_are_not_json_are_cut_where_they_stop_being_json():
    """A model's malformed arguments are streamed only as far as they are JSON: the call
    ends there, incomplete (finish_reason stays stop, not tool_calls), never concatenated
    into text no client can parse; stream and whole-text parse agree."""
    names = {"get_weather", "get_time"}
    cases = [
        ('<tool_call>{"name": "get_weather", "arguments": {"city": Paris}}</tool_call> ok', "hermes",
         '{"city": ', " ok"),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}, "arguments": {"x": 1}}'
         '</tool_call>', "hermes", '{"city": "Paris"}', None),
        ('<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>', "hermes", "", None),
        ('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', "hermes", "", None),
        ('<tool_call>{"name": "get_weather", "arguments": {"n": 01}}</tool_call>', "hermes", '{"n": 0', None),
        ('{"name": "get_weather", "parameters": {"city": \'Oslo\'}}', "llama3", '{"city": ', None),
        # a second name (the same or another) does not start a second call
        ('<tool_call>{"name": "get_weather", "name": "get_weather", "arguments": {"a": 1}}</tool_call>',
         "hermes", "", None),
        ('<tool_call>{"name": "get_weather", "arguments": {"a": 1}, "name": "get_time"}</tool_call>',
         "hermes", '{"a": 1}', None),
    ]
    for text, fmt, args, content in cases:
        got_content, calls, complete = tool_calls.parse(text, fmt, names)
        assert [c["function"]["name"] for c in calls] == ["get_weather"], text
        assert calls[0]["function"]["arguments"] == args and not complete, text
        if content is not None:
            assert got_content == content
        p = tool_calls.ToolCallStream(fmt, names)
        deltas = [d for ch in text for d in p.feed(ch)] + p.finish()
        streamed = "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", []))
        assert streamed == args
    # a well-formed call written as a JSON string is still read
    _, calls, complete = tool_calls.parse(
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', "hermes", names)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"} and complete


def test_parameters_that_are_a_ref_or_a_union_are_constrained():
    """Parameters written as a bare $ref (a self-referencing pydantic model) or anyOf (a
    RootModel of a union): wrapping them with "type": "object" put an assertion beside the
    combinator, which the structured-output check refuses (found by review)."""
    from portaserve.core.grammar import validate_constraint

    node = {"$ref": "#/$defs/N", "$defs": {"N": {"type": "object", "properties": {
        "v": {"type": "integer"}, "child": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}},
        "required": ["v"]}}}
    union = {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                       {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]}
    tools = [{"type": "function", "function": {"name": "node", "parameters": node}},
             {"type": "function", "function": {"name": "pick", "parameters": union}}]
    tool_calls.check_enforceable(tools)
    for choice, name in (("required", None), ("function", "node"), ("function", "pick")):
        schema = tool_calls.constraint_schema(tools, choice, True, name)
        validate_constraint("json_schema", json.dumps(schema))
        call = {"name": "node", "arguments": {"v": 1, "child": {"v": 2, "child": None}}} if name != "pick" \
            else {"name": "pick", "arguments": {"b": "x"}}
        jsonschema.validate([call], schema)
