"""Tool calling on /v1/chat/completions.

* ``tools`` are rendered by the model's chat template when it knows about tools;
  otherwise a system message describes them and the Hermes ``<tool_call>`` format.
* ``tool_choice``: ``none`` (tools hidden), ``auto`` (free generation, parsed afterwards),
  ``required`` or a named function: the output is constrained with a JSON schema (through
  the grammar backend) to a list of calls whose arguments follow each function's
  parameters schema, so the arguments always parse.
* Parsers for free output: ``hermes`` (``<tool_call>{"name", "arguments"}</tool_call>``,
  Qwen 2.5/3 and Hermes templates) and ``llama3`` (a bare ``{"name", "parameters"}`` JSON
  object, optionally after ``<|python_tag|>``, several separated by ``;``).  Chosen by
  ``--tool-call-parser`` or detected from the chat template.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Optional

from portaserve.server.errors import bad_request

PARSERS = ("hermes", "llama3")


def validate_tools(tools) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(
                t.get("function"), dict):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, _ . -", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out.append({"type": "function", "function": {"name": name, "description": fn.get("description", ""),
                                                      "parameters": params}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    return out


def parse_tool_choice(choice, tools: list[dict]):
    """-> "none" | "auto" | "required" | a function name."""
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        return name
    raise bad_request("tool_choice must be none, auto, required or {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}", "tool_choice")


def detect_parser(chat_template: Optional[str], configured: Optional[str]) -> str:
    if configured:
        return configured
    t = chat_template or ""
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "hermes"


def template_knows_tools(chat_template: Optional[str]) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tools_system_prompt(tools: list[dict]) -> str:
    specs = "\n".join(json.dumps(t["function"]) for t in tools)
    return ("You can call functions. Their signatures, as JSON schema, are:\n<tools>\n" + specs +
            "\n</tools>\nTo call a function, answer with one <tool_call></tool_call> block per call, each "
            "holding a JSON object with \"name\" and \"arguments\":\n<tool_call>\n"
            "{\"name\": \"<function-name>\", \"arguments\": {...}}\n</tool_call>")


def constraint_schema(tools: list[dict], choice: str) -> dict:
    """JSON schema of the constrained output for required / named tool choice: a list of
    calls (exactly one for a named function)."""
    def call(t):
        f = t["function"]
        return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False}

    if choice == "required":
        # at most one call per tool: bounded, so sampling at high temperature still ends
        return {"type": "array", "minItems": 1, "maxItems": len(tools),
                "items": {"anyOf": [call(t) for t in tools]}}
    tool = next(t for t in tools if t["function"]["name"] == choice)
    return {"type": "array", "minItems": 1, "maxItems": 1, "items": call(tool)}


def _call(name: str, args) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse_constrained(text: str) -> list[dict]:
    return [_call(c["name"], c["arguments"]) for c in json.loads(text)]


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_free(text: str, parser: str, tool_names: set) -> tuple[Optional[str], list[dict]]:
    """(content, tool_calls) from free-form output; text that doesn't parse stays content."""
    calls = []
    if parser == "hermes":
        for m in _HERMES.finditer(text):
            try:
                obj = json.loads(m.group(1))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and obj.get("name") in tool_names:
                calls.append(_call(obj["name"], obj.get("arguments", {})))
        content = _HERMES.sub("", text).strip() if calls else text
        return (content or None), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    for part in body.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            obj = json.loads(part)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or obj.get("name") not in tool_names:
            return text, []
        calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
    return (None if calls else text), calls
