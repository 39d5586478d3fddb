"""JSON-schema features the grammar backend accepts but does not enforce.

xgrammar (0.2.x) compiles these without an error, often without even a warning, and then
lets output through that breaks them: a ``not`` or ``if`` is dropped, ``required`` names
that ``properties`` does not define are ignored, a ``pattern``'s lookahead is skipped,
assertions written beside ``$ref`` / ``allOf`` / ``anyOf`` / ``oneOf`` are dropped.  A
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

EMPTY_FORMATS = frozenset({"uri-reference", "uri-template", "json-pointer"})  # "" matches these
LONG_ENOUGH = 1000

# assertions that xgrammar drops when they stand beside $ref / allOf / anyOf / oneOf
# (annotations -- description, title, default, examples, vendor x-... keys -- assert
# nothing, and const / enum it enforces first)
_DROPPED_BESIDE_COMBINATORS = frozenset({
    "type", "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "additionalItems",
    "minItems", "maxItems", "uniqueItems", "contains", "minContains", "maxContains", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "not", "if", "then", "else", "$ref", "allOf", "anyOf", "oneOf",
    "dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems", "nullable"})

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
    for k in ("anyOf", "oneOf", "type"):  # no value matches an empty one; xgrammar lets
        if isinstance(s.get(k), list) and not s[k]:  # empty text through (anyOf/oneOf)
            return f"an empty {k!r} (it matches no value)"
    if s.get("uniqueItems") is True:
        return "'uniqueItems'"
    if isinstance(s.get("allOf"), list) and len(s["allOf"]) > 1:
        return "'allOf' with more than one schema"
    ref = s.get("$ref")
    if isinstance(ref, str) and ref != "#" and not ref.startswith("#/"):
        return f"'$ref' {ref!r} (only references inside the schema, '#' or '#/...', are followed)"
    combinator = next((k for k in ("$ref", "allOf", "anyOf", "oneOf") if k in s), None)
    if combinator:  # xgrammar follows the combinator and drops the assertions beside it
        beside = sorted(k for k in s if k in _DROPPED_BESIDE_COMBINATORS and k != combinator)
        if beside:
            return f"{beside[0]!r} beside {combinator!r}"
    types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
    if "multipleOf" in s and ("integer" not in types or "number" in types):
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
    fmt = s.get("format")
    if fmt in KNOWN_FORMATS:
        # the format's own grammar stands in for a length limit it makes moot: a minimum of
        # one where the format has no empty string, a maximum of LONG_ENOUGH or more
        # (pydantic's AnyUrl is minLength 1, its HttpUrl maxLength 2083)
        moot = {"minLength": lambda v: v == 0 or (v == 1 and fmt not in EMPTY_FORMATS),
                "maxLength": lambda v: v >= LONG_ENOUGH}
        live = [k for k in lengths if not (isinstance(s[k], int) and moot[k](s[k]))]
        if "pattern" in s or live:
            return f"'format' {fmt!r} together with {('pattern' if 'pattern' in s else live[0])!r}"
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
