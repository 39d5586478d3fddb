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
* Streaming (``ToolCallStream``): as OpenAI and SGLang stream them, a call's first delta
  carries its index, id, type, name and empty arguments; the following deltas carry
  argument fragments as the model writes them; text outside calls streams as content.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Optional

from portaserve.server.errors import bad_request

PARSERS = ("hermes", "llama3", "mistral")


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
        ptype = params.get("type", "object")
        if ptype != "object" and not (isinstance(ptype, list) and "object" in ptype):
            # arguments are a JSON object (OpenAI refuses this too)
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema of type \"object\", "
                              f"got type {json.dumps(params.get('type'))}", "tools")
        out.append({"type": "function", "function": {"name": name, "description": fn.get("description", ""),
                                                      "parameters": params}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    return out


def parse_tool_choice(choice, tools: list[dict]) -> tuple[str, Optional[str]]:
    """-> (mode, function name): ("none" | "auto" | "required", None) or ("function", name).
    Apart, so that a function may be named "auto"."""
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        return choice, None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        return "function", name
    raise bad_request("tool_choice must be none, auto, required or {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}", "tool_choice")


def check_enforceable(tools: list[dict], name: Optional[str] = None) -> None:
    """400 naming the tool whose parameters (the named one's, else every tool's) use a
    schema feature that constraining the calls would not enforce."""
    from portaserve.core import schema_check

    for i, t in enumerate(tools):
        if name is not None and t["function"]["name"] != name:
            continue
        found = schema_check.unenforced(t["function"]["parameters"])
        if found:
            raise bad_request(f"tools[{i}].function.parameters at {found[1]}: "
                              f"{schema_check.REFUSAL.format(found[0])}", "tools")


def detect_parser(chat_template, configured: Optional[str]) -> str:
    if configured:
        return configured
    t = _template_text(chat_template)
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    return "hermes"


def _template_text(chat_template) -> str:
    # a tokenizer may hold several named templates (a dict): any of them may be used
    if isinstance(chat_template, dict):
        return "\n".join(str(t) for t in chat_template.values())
    return chat_template or ""


def template_knows_tools(chat_template) -> bool:
    return "tools" in _template_text(chat_template)


def template_renders_calls(chat_template) -> bool:
    """Whether the template writes an assistant message's tool_calls itself (in the
    model's own format); if not, calls_as_text writes them into the content."""
    return "tool_calls" in _template_text(chat_template)


def tools_system_prompt(tools: list[dict]) -> str:
    specs = "\n".join(json.dumps(t["function"]) for t in tools)
    return ("You can call functions. Their signatures, as JSON schema, are:\n<tools>\n" + specs +
            "\n</tools>\nTo call a function, answer with one <tool_call></tool_call> block per call, each "
            "holding a JSON object with \"name\" and \"arguments\":\n<tool_call>\n"
            "{\"name\": \"<function-name>\", \"arguments\": {...}}\n</tool_call>")


def calls_as_text(msg: dict) -> dict:
    """An assistant message's tool_calls written into its content the way
    tools_system_prompt teaches: for chat templates that know no tools, which would drop
    them, so the model sees which call each tool result answers."""
    calls = msg.get("tool_calls")
    if not isinstance(calls, list):
        return msg
    blocks = []
    for tc in calls:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            blocks.append("<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments", {})})
                          + "\n</tool_call>")
    out = {k: v for k, v in msg.items() if k != "tool_calls"}
    out["content"] = "\n".join(([msg["content"]] if msg.get("content") else []) + blocks)
    return out


def constraint_schema(tools: list[dict], choice: str, parallel: bool = True,
                      name: Optional[str] = None) -> dict:
    """JSON schema of the constrained output for required / named tool choice: a list of
    calls (exactly one for a named function, or with parallel_tool_calls false)."""
    defs: dict = {}

    def call(i, t):
        f = t["function"]
        args = _arguments_schema(f["parameters"], f"tool{i}_", defs)
        return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": args},
                "required": ["name", "arguments"], "additionalProperties": False}

    if choice == "required":
        # at most one call per tool: bounded, so sampling at high temperature still ends
        schema = {"type": "array", "minItems": 1, "maxItems": len(tools) if parallel else 1,
                  "items": {"anyOf": [call(i, t) for i, t in enumerate(tools)]}}
    else:
        i = next(i for i, t in enumerate(tools) if t["function"]["name"] == name)
        schema = {"type": "array", "minItems": 1, "maxItems": 1, "items": call(i, tools[i])}
    if defs:
        schema["$defs"] = defs
    return schema


_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values, not schemas: no $ref in them


def _arguments_schema(params: dict, prefix: str, defs: dict) -> dict:
    """A tool's parameters as the schema of its call's "arguments", nested in the schema
    of the list of calls.  {} is an object with any properties.  Local $refs ("#",
    "#/$defs/X", "#/definitions/X", "#/properties/...") would point into the list's
    schema there: the parameters move to defs[prefix + "root"], their $defs beside it
    (prefixed, so two tools' definitions cannot clash), and every local $ref is rewritten
    to match, as SGLang and vLLM hoist $defs."""
    # (a copy: $defs are popped below) "type" is left out beside a $ref or a union, where
    # it would not be enforced (schema_check refuses it there)
    params = dict(params) if any(k in params for k in ("$ref", "allOf", "anyOf", "oneOf")) \
        else {"type": "object", **params}
    if '"$ref"' not in json.dumps(params):
        return params
    root = prefix + "root"

    spaces = {"$defs": prefix + "defs_", "definitions": prefix + "definitions_"}  # apart from root

    def move(ref: str) -> str:
        if not ref.startswith("#"):
            return ref  # remote: left to the compiler (which refuses it)
        for key, to in spaces.items():
            if ref.startswith(f"#/{key}/"):
                return "#/$defs/" + to + ref[len(key) + 3:]
        return "#/$defs/" + root + ref[1:]

    def rewrite(node):
        if isinstance(node, dict):
            return {k: (move(v) if k == "$ref" and isinstance(v, str)
                        else v if k in _DATA_KEYWORDS else rewrite(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key, to in spaces.items():
        d = params.pop(key, None) or {}
        if not isinstance(d, dict):
            raise bad_request(f"a tool's parameters.{key} must be an object", "tools")
        for k, v in d.items():
            defs[to + k] = rewrite(v)
    defs[root] = rewrite(params)
    return {"$ref": "#/$defs/" + root}


def _new_id(fmt: str = "") -> str:
    if fmt == "mistral":  # Mistral's chat templates refuse ids other than 9 letters or digits
        return uuid.uuid4().hex[:9]
    return f"call_{uuid.uuid4().hex[:24]}"


_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")
_ID_CHARS = re.compile(r"[A-Za-z0-9]*")


def _named_head(buf: str, tag: str):
    """The head of one call in Mistral's newer format (tokenizer v11+: Mistral Small 3.2,
    Devstral, Magistral): ``[TOOL_CALLS]name[ARGS]{`` or, v11 with ids,
    ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{``; the tags are special tokens, and without them
    (decoded away) ``name{``.  buf ends at the ``{`` that opens the arguments once the
    head is complete.  Returns "more" (a prefix of a head), "no", or (name, call_id)."""
    s = buf.lstrip(" \t\r\n")
    if s.startswith(tag):
        s = s[len(tag):].lstrip(" ")  # (a space after each tag: spaces_between_special_tokens)
    elif tag.startswith(s):
        return "more"
    name = _NAME_CHARS.match(s).group()
    s = s[len(name):]
    if s.startswith(" "):  # a space before a tag or the arguments, not before words
        rest = s.lstrip(" ")
        if rest and rest[0] not in "[{":
            return "no"
        s = rest
    if not s:
        return "more"
    if not name:
        return "no"
    call_id = None
    if s.startswith("[CALL_ID]"):
        call_id = _ID_CHARS.match(s, 9).group()
        s = s[9 + len(call_id):].lstrip(" ")
        if "[ARGS]".startswith(s):
            return "more"
        if not s.startswith("[ARGS]"):
            return "no"
    elif "[CALL_ID]".startswith(s) or "[ARGS]".startswith(s):
        return "more"
    if s.startswith("[ARGS]"):
        s = s[6:].lstrip(" ")
        if not s:
            return "more"
    return (name, call_id) if s == "{" else "no"


# ---- parsing, incremental ------------------------------------------------------------------
# One parser serves streaming and non-streaming answers: a non-streamed message is the sum
# of the deltas a stream of the same text would carry, so the two always agree.  Each
# call's ``arguments`` is the model's own text of the arguments object (not re-serialised),
# streamed in fragments as it is generated: the fragments concatenate to exactly the
# non-streamed ``arguments``.

class _Value:
    """Finds where a JSON value ends, fed one character at a time."""

    def __init__(self):
        self.depth = 0
        self.in_str = self.esc = False
        self.kind = None  # "container" | "string" | "scalar"
        self.done = False

    def feed(self, ch: str) -> bool:
        """True if ch belongs to the value (then self.done says whether it ended it)."""
        if self.kind is None:
            self.kind = "container" if ch in "{[" else "string" if ch == '"' else "scalar"
            if self.kind == "string":
                self.in_str = True
            else:
                self.depth = 1 if self.kind == "container" else 0
            return True
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.kind == "string":
                    self.done = True
            return True
        if self.kind == "scalar":
            if ch in ",}] \t\r\n":
                self.done = True
                return False
            return True
        if ch == '"':
            self.in_str = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True


class _JSONObject:
    """Checks, a character at a time, that the text so far begins one JSON object (RFC
    8259: strings with their escapes, numbers, true/false/null, nesting): feed() is False
    at the first character that cannot continue it, so a call's arguments are streamed
    only as far as they are JSON, and never past their end (``done``)."""

    _ESCAPES = '"\\/bfnrtu'
    _NUMBER_END = {"int0", "int", "frac", "exp"}  # states in which a number may end

    def __init__(self):
        self.stack: list[str] = []  # "{" / "[" of each open container
        self.state = "start"
        self.key = False  # the open string is an object key
        self.hex = 0  # \u digits still due
        self.literal = ""  # the rest of true / false / null still due
        self.done = False

    def feed(self, ch: str) -> bool:
        if self.done:
            return False
        st = self.state
        if st == "string":
            return self._string(ch)
        if st == "literal":
            if not self.literal.startswith(ch):
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self.state = "after_value"
            return True
        if st.startswith("num_"):
            nxt = self._number(st[4:], ch)
            if nxt is not None:
                self.state = "num_" + nxt
                return True
            if st[4:] not in self._NUMBER_END:
                return False
            self.state = st = "after_value"  # the number ended before ch
        if ch in " \t\r\n":
            return st != "start"
        if st == "start":
            return self._open(ch) if ch == "{" else False
        if st in ("key_or_end", "key"):
            if ch == '"':
                self.state, self.key = "string", True
                return True
            return st == "key_or_end" and self._close(ch, "{")
        if st == "colon":
            if ch != ":":
                return False
            self.state = "value"
            return True
        if st in ("value", "value_or_end"):
            if st == "value_or_end" and ch == "]":
                return self._close(ch, "[")
            return self._value(ch)
        # after_value
        if ch == ",":
            self.state = "key" if self.stack[-1] == "{" else "value"
            return True
        return self._close(ch, self.stack[-1])

    def _value(self, ch: str) -> bool:
        if ch in "{[":
            return self._open(ch)
        if ch == '"':
            self.state, self.key = "string", False
        elif ch == "-":
            self.state = "num_sign"
        elif ch.isdigit() and ch.isascii():
            self.state = "num_int0" if ch == "0" else "num_int"
        elif ch in "tfn":
            self.state, self.literal = "literal", {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            return False
        return True

    @staticmethod
    def _number(st: str, ch: str):
        """The number's next state after ch, or None if ch is not part of it."""
        digit = ch.isdigit() and ch.isascii()
        if st == "sign":
            return ("int0" if ch == "0" else "int") if digit else None
        if st in ("int0", "int") and ch == ".":
            return "dot"
        if st in ("int0", "int", "frac") and ch in "eE":
            return "e"
        if st == "e" and ch in "+-":
            return "esign"
        if not digit or st == "int0":
            return None
        return {"int": "int", "dot": "frac", "frac": "frac", "e": "exp", "esign": "exp", "exp": "exp"}[st]

    def _string(self, ch: str) -> bool:
        if self.hex:
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.hex -= 1
        elif self.literal == "\\":  # after a backslash
            if ch not in self._ESCAPES:
                return False
            self.literal = ""
            self.hex = 4 if ch == "u" else 0
        elif ch == "\\":
            self.literal = "\\"
        elif ch == '"':
            self.state = "colon" if self.key else "after_value"
        elif ord(ch) < 0x20:  # control characters must be escaped
            return False
        return True

    def _open(self, ch: str) -> bool:
        self.stack.append(ch)
        self.state = "key_or_end" if ch == "{" else "value_or_end"
        return True

    def _close(self, ch: str, top: str) -> bool:
        if ch != {"{": "}", "[": "]"}[top]:
            return False
        self.stack.pop()
        self.state = "after_value"
        self.done = not self.stack
        return True


class _CallObject:
    """One ``{"name": ..., "arguments"|"parameters": {...}}`` object, fed a character at a
    time.  Events: ("name", str), ("args", fragment), ("end", None), ("error", reason)."""

    ARG_KEYS = ("arguments", "parameters")

    def __init__(self):
        self.state = "open"
        self.key = ""
        self.key_esc = False
        self.value: Optional[_Value] = None
        self.raw = ""  # text of the current value (name; a string-valued arguments)
        self.name: Optional[str] = None
        self.args_kind: Optional[str] = None

    def feed(self, ch: str, events: list) -> None:
        st = self.state
        if st in ("open", "key_or_end", "colon", "value_start", "after_value") and ch in " \t\r\n":
            return
        if st == "open":
            self._expect(ch == "{", "key_or_end", events)
        elif st == "key_or_end":
            if ch == '"':
                self.state, self.key = "key", ""
            elif ch == "}":
                self._end(events)
            else:
                self._error(f"unexpected {ch!r} in a call object", events)
        elif st == "key":
            if self.key_esc:
                self.key_esc = False
                self.key += ch
            elif ch == "\\":
                self.key_esc = True
            elif ch == '"':
                self.state = "colon"
            else:
                self.key += ch
        elif st == "colon":
            self._expect(ch == ":", "value_start", events)
        elif st == "value_start":
            if self.key == "name" and self.name is not None:
                return self._error("the call has a second name", events)
            if self.key in self.ARG_KEYS:
                if self.args_kind is not None:
                    return self._error("the call has a second arguments object", events)
                if ch not in '{"':  # an object, or one written as a JSON string
                    return self._error("the call's arguments are not a JSON object", events)
            self.state, self.raw = "value", ""
            self.value = _JSONObject() if self.key in self.ARG_KEYS and ch == "{" else _Value()
            self._value_char(ch, events)
        elif st == "value":
            self._value_char(ch, events)
        elif st == "after_value":
            if ch == ",":
                self.state = "key_or_end"
            elif ch == "}":
                self._end(events)
            else:
                self._error(f"unexpected {ch!r} after a value", events)

    def _value_char(self, ch: str, events: list) -> None:
        v = self.value
        if isinstance(v, _JSONObject):  # the arguments, sent as far as they are JSON
            if not v.feed(ch):
                return self._error("the call's arguments are not valid JSON", events)
            self.args_kind = "text"
            events.append(("args", ch))
            if v.done:
                self.state = "after_value"
            return
        if not v.feed(ch):  # a scalar ended before ch
            self._value_done(events)
            self.feed(ch, events)
            return
        if self.key in self.ARG_KEYS:  # arguments written as a JSON string: sent whole, decoded
            self.raw += ch
        elif self.key == "name":
            self.raw += ch
        if v.done:
            self._value_done(events)

    def _value_done(self, events: list) -> None:
        self.state = "after_value"
        if self.key == "name":
            try:
                name = json.loads(self.raw)
            except json.JSONDecodeError:
                name = None
            if not isinstance(name, str):
                return self._error("the call's name is not a string", events)
            self.name = name
            events.append(("name", name))
        elif self.key in self.ARG_KEYS and self.args_kind is None:
            try:
                val = json.loads(self.raw)
                if not isinstance(json.loads(val), dict):
                    raise ValueError
            except (ValueError, TypeError):
                return self._error("the call's arguments are not a JSON object", events)
            self.args_kind = "text"
            events.append(("args", val))

    def _expect(self, ok: bool, nxt: str, events: list) -> None:
        if ok:
            self.state = nxt
        else:
            self._error("not a call object", events)

    def _end(self, events: list) -> None:
        self.state = "done"
        events.append(("end", None))

    def _error(self, reason: str, events: list) -> None:
        self.state = "error"
        events.append(("error", reason))


class ToolCallStream:
    """Turns the model's output text, fed in pieces as it is generated, into OpenAI chat
    deltas: ``{"content": ...}`` for text outside tool calls, and per call first
    ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}]}``, then ``{"tool_calls": [{"index", "function": {"arguments":
    fragment}}]}`` as the arguments are generated.

    fmt: ``hermes`` (``<tool_call>{...}</tool_call>`` blocks among text), ``llama3`` (the
    whole answer is ``[<|python_tag|>]{...}[; {...}]``, else it is text), ``mistral`` (the
    whole answer is ``[TOOL_CALLS][{...}, ...]``, the tag often dropped as a special token
    when decoding, or, tokenizer v11+, ``[TOOL_CALLS]name[ARGS]{...}`` per call, else it
    is text) or ``constrained`` (the JSON list ``[{"name",
    "arguments"}, ...]`` that tool_choice required / named constrains the output to).  A call starts (its header is sent) once
    its name is complete and names one of the tools; a block that does not parse before
    that point stays content."""

    START, END, PYTAG, MISTRAL_TAG = "<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]"

    def __init__(self, fmt: str, tool_names, max_calls: Optional[int] = None,
                 id_style: Optional[str] = None):
        if fmt not in PARSERS + ("constrained",):
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self.fmt = fmt
        self.id_style = id_style or fmt  # the model's parser: Mistral's ids are 9 characters
        self.max_calls = max_calls  # parallel_tool_calls false: 1 (later calls are dropped)
        self.names = set(tool_names)
        self.mode = "start" if fmt != "hermes" else "text"
        self.pending = ""  # text held back: a possible tag prefix, or a block not yet a call
        self.ws = ""  # whitespace held back from content (dropped before a call)
        self.call: Optional[_CallObject] = None
        self.calls: list[dict] = []  # {"id", "name", "arguments", "complete"}
        self.started = False  # the current call's header went out
        self.early_args = ""  # arguments seen before the name
        self.block_raw = ""  # hermes: the text of the current block
        self.list_raw = ""  # mistral, constrained: the text that opened the list
        self.out: list[dict] = []  # deltas not yet taken
        self.history: list[dict] = []  # every delta taken

    # ---- public -----------------------------------------------------------------------
    def feed(self, text: str) -> list[dict]:
        for ch in text:
            self._char(ch)
        return self._take()

    def finish(self) -> list[dict]:
        """The deltas left when the output is complete (held-back text)."""
        if self.call is not None and not self.started:
            self._abandon()  # an unfinished block that never became a call: text
        if self.pending and self.mode in ("text", "start", "content", "named"):
            self._content(self.pending)
            self.pending = ""
        if not self.calls:
            self._flush_ws()
        self.ws = ""
        return self._take()

    def complete(self) -> bool:
        """Every call's object was closed (none cut short)."""
        return all(c["complete"] for c in self.calls[:self.max_calls])

    def message(self) -> tuple[Optional[str], list[dict]]:
        """(content, tool_calls) of everything fed so far, as a non-streamed message."""
        content, calls = [], {}
        for d in self.history:
            if "content" in d:
                content.append(d["content"])
            for tc in d.get("tool_calls", []):
                c = calls.setdefault(tc["index"], {"id": tc.get("id"), "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
                c["function"]["name"] += tc["function"].get("name", "")
                c["function"]["arguments"] += tc["function"].get("arguments", "")
        return ("".join(content) or None), [calls[i] for i in sorted(calls)]

    # ---- internals --------------------------------------------------------------------
    def _take(self) -> list[dict]:
        # merge adjacent content pieces and adjacent argument fragments of one call
        merged: list[dict] = []
        for d in self.out:
            if self.max_calls is not None and "tool_calls" in d and d["tool_calls"][0]["index"] >= self.max_calls:
                continue
            last = merged[-1] if merged else None
            if last is not None and "content" in d and "content" in last:
                last["content"] += d["content"]
            elif (last is not None and "tool_calls" in d and "tool_calls" in last
                  and "id" not in d["tool_calls"][0] and "id" not in last["tool_calls"][0]
                  and last["tool_calls"][0]["index"] == d["tool_calls"][0]["index"]):
                last["tool_calls"][0]["function"]["arguments"] += d["tool_calls"][0]["function"]["arguments"]
            else:
                merged.append(d)
        self.out = []
        self.history.extend(merged)
        return merged

    def _content(self, text: str) -> None:
        """Text outside calls; whitespace is held until more text follows (whitespace
        right before a call, and trailing whitespace after calls, is dropped)."""
        body = text.rstrip(" \t\r\n")
        if body:
            self.out.append({"content": self.ws + body})
            self.ws = ""
        self.ws += text[len(body):]

    def _flush_ws(self) -> None:
        if self.ws:
            self.out.append({"content": self.ws})
            self.ws = ""

    def _begin_call(self) -> None:
        self.call, self.started, self.early_args = _CallObject(), False, ""

    def _char(self, ch: str) -> None:
        m = self.mode
        if m == "content":  # llama3: the answer is text
            self._content(ch)
        elif m == "text":  # hermes, outside blocks
            self.pending += ch
            if self.pending == self.START:
                self.pending = ""
                self.mode = "block"
                self.block_raw = self.START
                self._begin_call()
            elif not self.START.startswith(self.pending):
                # not a tag: emit up to the next possible tag start
                i = self.pending.find("<", 1)
                keep = self.pending[i:] if i > 0 and self.START.startswith(self.pending[i:]) else ""
                self._content(self.pending[:len(self.pending) - len(keep)])
                self.pending = keep
        elif m == "block":  # hermes, inside <tool_call> ... the call object
            self.block_raw += ch
            self._call_char(ch)
        elif m == "after_block":  # hermes: skip to </tool_call>
            self.pending += ch
            if self.pending.endswith(self.END):
                self.pending, self.mode = "", "text"
            elif self.pending.endswith(self.START):  # a new block without closing the last
                self.pending, self.mode = "", "block"
                self.block_raw = self.START
                self._begin_call()
        elif m == "start":  # llama3 / constrained: before the first call
            self.pending += ch
            body = self.pending.lstrip(" \t\r\n")
            if self.fmt == "llama3":
                if body.startswith(self.PYTAG):
                    body = body[len(self.PYTAG):].lstrip(" \t\r\n")
                elif self.PYTAG.startswith(body):
                    return
                if not body:
                    return
                if body[0] == "{":
                    self.mode = "calls"
                    self._begin_call()
                    self._call_char(body[0])
                else:
                    self.mode = "content"
                    held, self.pending = self.pending, ""
                    self._content(held)
            else:  # constrained, mistral: [ {...}, {...} ]
                if self.fmt == "mistral":
                    if body.startswith(self.MISTRAL_TAG):
                        body = body[len(self.MISTRAL_TAG):].lstrip(" \t\r\n")
                    elif self.MISTRAL_TAG.startswith(body):
                        return  # maybe the tag, in pieces
                if not body:
                    return
                if self.fmt == "mistral" and body[0] != "[":  # the newer format, or text
                    self.mode = "named"
                    return self._named_char("")
                rest = body[1:].lstrip(" \t\r\n")
                if body[0] == "[" and self.fmt == "mistral" and not rest:
                    return  # "[": a list of calls if an object follows
                if body[0] == "[" and (self.fmt != "mistral" or rest[0] == "{"):
                    # text before the first call: content again if that call does not parse
                    self.list_raw = self.pending[:len(self.pending) - len(rest)]
                    self.mode, self.pending = "list", ""
                    for c in rest:  # what followed a held-back tag prefix: "{"
                        self._char(c)
                else:
                    self.mode = "content"
                    held, self.pending = self.pending, ""
                    self._content(held)
        elif m in ("calls", "list"):
            if self.call is not None:
                self.pending += ch
                self._call_char(ch)
            elif ch in " \t\r\n" or ch in (";" if m == "calls" else ","):
                pass
            elif ch == "{":
                self._begin_call()
                self.pending = ch
                self._call_char(ch)
            elif m == "list" and ch == "]":
                self.mode = "done"
            else:  # text after the calls
                self.mode = "content"
                self._content(ch)
        elif m == "named":  # mistral v11+: a call's head (or text)
            self._named_char(ch)
        elif m == "named_args":
            if self.call is None:  # the call ended in error: what follows is looked at anew
                self.mode = "named"
                return self._named_char(ch)
            self._call_char(ch)
            if self.call is not None and self.call.state == "after_value":
                self._call_char("}")  # the arguments object closed the call
                self.mode = "named"
        elif m == "done" and self.fmt == "mistral":  # text after the list of calls
            self._content(ch)
        # "done", constrained: the list is closed; the grammar allows nothing more

    def _named_char(self, ch: str) -> None:
        self.pending += ch
        head = _named_head(self.pending, self.MISTRAL_TAG)
        if head == "more":
            return
        if head == "no" or head[0] not in self.names:
            # text: before any call, the whole answer is text; after calls, the rest is
            held, self.pending, self.mode = self.pending, "", "content"
            return self._content(held)
        name, call_id = head
        self._begin_call()
        self.pending = ""
        for c in '{"name": ' + json.dumps(name) + ', "arguments": ':
            self._call_char(c)
        if call_id and re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
            self.calls[-1]["id"] = self.out[-1]["tool_calls"][0]["id"] = call_id  # the model's own
        self.mode = "named_args"
        self._call_char("{")

    def _call_char(self, ch: str) -> None:
        events: list = []
        self.call.feed(ch, events)
        for kind, val in events:
            if kind == "name":
                if val not in self.names and self.fmt != "constrained":
                    return self._abandon()
                idx = len(self.calls)
                self.calls.append({"id": _new_id(self.id_style), "name": val, "complete": False})
                self.started = True
                self.ws = ""  # whitespace before a call is not content
                self.out.append({"tool_calls": [{"index": idx, "id": self.calls[-1]["id"], "type": "function",
                                                 "function": {"name": val, "arguments": ""}}]})
                if self.early_args:
                    self._args(self.early_args)
                    self.early_args = ""
            elif kind == "args":
                if self.started:
                    self._args(val)
                else:
                    self.early_args += val
            elif kind == "end":
                if not self.started:
                    return self._abandon()  # an object without a known name
                if not self.calls[-1].get("has_args"):  # a call without arguments: {} (as
                    self._args("{}")                      # SGLang), never "", which is not JSON
                self.calls[-1]["complete"] = True
                self._end_call()
            elif kind == "error":
                if not self.started:
                    return self._abandon()
                self._end_call()  # the call stays as far as it went

    def _args(self, frag: str) -> None:
        self.calls[-1]["has_args"] = True
        self.out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": frag}}]})

    def _end_call(self) -> None:
        self.call = None
        self.ws = ""
        if self.mode == "block":
            self.mode, self.pending = "after_block", ""
        else:
            self.pending = ""

    def _abandon(self) -> None:
        """The current block is not a call after all: its text is content."""
        self.call = None
        if self.mode == "block":
            raw, self.mode = self.block_raw, "text"
            self._content(raw)
        else:
            raw, self.pending, self.mode = self.pending, "", "content"
            if not self.calls:  # the list's opening is text too
                raw, self.list_raw = self.list_raw + raw, ""
            self._content(raw)


def parse(text: str, fmt: str, tool_names, max_calls: Optional[int] = None,
          id_style: Optional[str] = None) -> tuple[Optional[str], list[dict], bool]:
    """(content, tool_calls, complete) of a whole output: what a stream would carry."""
    p = ToolCallStream(fmt, tool_names, max_calls, id_style)
    p.feed(text)
    p.finish()
    content, calls = p.message()
    return content, calls, p.complete()


def arguments_parse(calls: list[dict]) -> bool:
    """Whether every call's arguments are a JSON object, as a client's json.loads needs."""
    for c in calls:
        try:
            if not isinstance(json.loads(c["function"]["arguments"]), dict):
                return False
        except ValueError:
            return False
    return True


def parse_free(text: str, parser: str, tool_names: set) -> tuple[Optional[str], list[dict]]:
    """(content, tool_calls) from free-form output; text that doesn't parse stays content."""
    content, calls, _ = parse(text, parser, tool_names)
    return content, calls


def parse_constrained(text: str) -> list[dict]:
    return parse(text, "constrained", ())[1]
