"""Tool calling on /v1/chat/completions through the openai client."""
from __future__ import annotations

import json

import jsonschema
import pytest

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
    assert len(calls) == 1
    _check_calls(calls, {"get_time"})


def test_streaming_tool_call_deltas(oai):
    calls, finish = {}, None
    for ch in oai.chat.completions.create(model="default", messages=MSGS, tools=[WEATHER],
                                          tool_choice="required", max_tokens=60, stream=True):
        for c in ch.choices:
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and calls
    for slot in calls.values():
        assert slot["name"] == "get_weather"
        jsonschema.validate(json.loads(slot["arguments"]), SCHEMAS["get_weather"])


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


def test_bad_tools_are_400(server):
    for body, param in [({"tools": "x"}, "tools"),
                        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice")]:
        r = server.post("/v1/chat/completions", json={"model": "default", "messages": MSGS, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_parsers():
    names = {"get_weather"}
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
