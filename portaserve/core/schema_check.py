"""JSON-schema features the grammar backend accepts but does not enforce.

xgrammar (0.2.x) compiles these without an error, often without even a warning, and then
lets output through that breaks them: a ``not`` or ``if`` is dropped, ``required`` names
that ``properties`` does not define are ignored, a ``pattern``'s lookahead is skipped.  A
request whose output would silently break its own schema is refused instead (a 400 that
names the feature and where it is), as vLLM refuses the features its xgrammar backend
lacks.  tests/test_grammar.py checks every entry against xgrammar itself, so an upgrade
that starts enforcing one shows up there.

Left alone: ``oneOf`` (enforced as ``anyOf``: a value matching two branches gets through;
pydantic writes ``oneOf`` for tagged unions, whose branches exclude each other anyway),
and annotations the JSON Schema spec does not require validators to check (unknown
``format`` names, ``contentEncoding``, ``contentMediaType``).
"""
from __future__ import annotations

from typing import Optional

REFUSAL = "{} cannot be enforced by structured output, so the output could break the schema"

# formats xgrammar turns into a grammar (others are ignored, as annotations)
KNOWN_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "uuid", "uri", "uri-reference",
    "uri-template", "ipv4", "ipv6", "hostname", "json-pointer", "relative-json-pointer"})

# keywords whose value holds subschemas: one, a list, or a map of them
_ONE = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def unenforced(schema) -> Optional[tuple[str, str]]:
    """(the first feature of schema that would not be enforced, where it is: a JSON
    pointer), or None."""
    stack = [(schema, "")]
    while stack:
        s, at = stack.pop()
        if not isinstance(s, dict):
            continue
        why = _check(s)
        if why:
            return why, at or "/"
        for k in _MAP:
            if isinstance(s.get(k), dict):
                stack.extend((v, f"{at}/{k}/{_escape(n)}") for n, v in s[k].items())
        for k in _LIST:
            if isinstance(s.get(k), list):
                stack.extend((v, f"{at}/{k}/{i}") for i, v in enumerate(s[k]))
        for k in _ONE:
            if isinstance(s.get(k), dict):
                stack.append((s[k], f"{at}/{k}"))
    return None


def _check(s: dict) -> Optional[str]:
    for k in ("not", "if", "dependentRequired", "dependentSchemas", "dependencies", "contains",
              "$dynamicRef", "$recursiveRef"):
        if k in s:
            return f"{k!r}"
    if s.get("uniqueItems") is True:
        return "'uniqueItems'"
    if isinstance(s.get("allOf"), list) and len(s["allOf"]) > 1:
        return "'allOf' with more than one schema"
    ref = s.get("$ref")
    if isinstance(ref, str) and ref != "#" and not ref.startswith("#/"):
        return f"'$ref' {ref!r} (only references inside the schema, '#' or '#/...', are followed)"
    if "multipleOf" in s and s.get("type") != "integer":
        return "'multipleOf' on a non-integer type (it is enforced on type 'integer' only)"
    props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
    if isinstance(s.get("required"), list):
        missing = [r for r in s["required"] if r not in props]
        if missing:
            return (f"'required' names {missing[0]!r}, which 'properties' does not define "
                    "(only properties listed there can be required)")
    lengths = [k for k in ("minLength", "maxLength") if k in s]
    if "pattern" in s and lengths:
        return f"'pattern' together with {lengths[0]!r}"
    if s.get("format") in KNOWN_FORMATS and ("pattern" in s or lengths):
        return f"'format' {s['format']!r} together with {('pattern' if 'pattern' in s else lengths[0])!r}"
    patterns = [s["pattern"]] if isinstance(s.get("pattern"), str) else []
    if isinstance(s.get("patternProperties"), dict):
        patterns += list(s["patternProperties"])
    for p in patterns:
        if has_lookahead(p):
            return f"a lookahead in the pattern {p[:60]!r}"
    return None


def has_lookahead(regex: str) -> bool:
    """Whether regex holds a lookahead group, (?= or (?!, outside a character class
    (xgrammar skips lookaheads; lookbehinds it refuses itself)."""
    i, in_class = 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(" and regex[i + 1:i + 3] in ("?=", "?!"):
            return True
        i += 1
    return False


def _escape(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")
