"""The shortest text each rule of a grammar can produce, read from xgrammar's printed form.

A constraint can be valid and still be a trap.  A JSON schema that recurses through a
required property (``{"properties": {"a": {"$ref": "#"}}, "required": ["a"]}``) or an
EBNF rule without a way out (``r ::= "a" r``) matches no finite text, and a regex such as
``a{20000000}`` forces twenty million characters.  xgrammar compiles both; its
jump-forward search then runs without end (until memory runs out) or for seconds, on the
scheduler's thread.  So a grammar is refused when a rule reachable from the root cannot
finish, or when its shortest text is longer than a limit.

The printed grammar (``str(xgrammar.Grammar)``) is one rule per line,
``name ::= body [(=lookahead)]``, the body built from quoted strings, character classes,
rule names, parentheses, ``|``, the quantifiers ``* + ?`` and ``{n, m}``, and
``Regex("...", ...)`` (a JSON string's pattern that xgrammar keeps whole; taken as one
character here).  Anything else makes the check give up (return no finding) rather than
refuse a grammar it cannot read.
"""
from __future__ import annotations

import math
import re
from typing import Optional

_RULE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) ::= (.*)$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COUNT = re.compile(r"\{(\d+), (-?\d+)\}")


class _Unreadable(Exception):
    pass


def _parse_alts(s: str, i: int, end: str):
    """Alternatives (each a list of elements) up to the closing `end` char; -> (alts, i)."""
    alts, seq = [], []
    while True:
        while i < len(s) and s[i] == " ":
            i += 1
        if i >= len(s) or s[i] == end:
            alts.append(seq)
            return alts, i + 1
        if s[i] == "|":
            alts.append(seq)
            seq = []
            i += 1
            continue
        elem, i = _parse_elem(s, i)
        seq.append(elem)


def _parse_elem(s: str, i: int):
    c = s[i]
    if c == '"':  # a string; its length counts escapes as one character
        j, n = i + 1, 0
        while j < len(s) and s[j] != '"':
            if s[j] == "\\":
                m = re.match(r"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", s[j:])
                j += len(m.group(0)) if m else 2
            else:
                j += 1
            n += 1
        if j >= len(s):
            raise _Unreadable
        prim, i = ("lit", n), j + 1
    elif c == "[":  # a character class: one character
        j = i + 1
        while j < len(s) and s[j] != "]":
            j += 2 if s[j] == "\\" else 1
        if j >= len(s):
            raise _Unreadable
        prim, i = ("lit", 1), j + 1
    elif s.startswith("(=", i):  # a lookahead: produces nothing
        _, i = _parse_alts(s, i + 2, ")")
        prim = ("lit", 0)
    elif c == "(":
        alts, i = _parse_alts(s, i + 1, ")")
        prim = ("group", alts)
    else:
        m = _NAME.match(s, i)
        if not m:
            raise _Unreadable
        prim, i = ("rule", m.group(0)), m.end()
        if prim[1] == "Regex" and s.startswith("(", i):  # a JSON string's pattern, kept whole:
            (_, _), i = _parse_elem(s, i + 1)  # its string argument
            j = s.find(")", i)  # then options such as json_string=true
            if j < 0:
                raise _Unreadable
            prim, i = ("lit", 1), j + 1  # taken as finite, one character at least
    lo = 1
    if i < len(s) and s[i] in "*?":
        lo, i = 0, i + 1
    elif i < len(s) and s[i] == "+":
        i += 1
    elif i < len(s) and s[i] == "{":
        m = _COUNT.match(s, i)
        if not m:
            raise _Unreadable
        lo, i = int(m.group(1)), m.end()
    return (prim, lo), i


def parse(printed: str) -> Optional[dict]:
    """{rule: alternatives} of a printed grammar, or None if it cannot be read."""
    rules = {}
    try:
        for line in printed.splitlines():
            if not line.strip():
                continue
            m = _RULE.match(line)
            if not m:
                return None
            alts, i = _parse_alts(m.group(2) + "\0", 0, "\0")
            rules[m.group(1)] = alts
    except (_Unreadable, IndexError):
        return None
    return rules


def _refs(alts, out: set) -> set:
    for seq in alts:
        for (kind, val), _ in seq:
            if kind == "rule":
                out.add(val)
            elif kind == "group":
                _refs(val, out)
    return out


def shortest(rules: dict, root: str = "root") -> dict:
    """{rule reachable from root: length of its shortest text} (math.inf: cannot finish)."""
    reach, todo = set(), [root]
    while todo:
        r = todo.pop()
        if r in reach or r not in rules:
            continue
        reach.add(r)
        todo.extend(_refs(rules[r], set()))
    best = {r: math.inf for r in reach}

    def alts_len(alts):
        return min((sum(elem_len(e) for e in seq) for seq in alts), default=0)

    def elem_len(e):
        (kind, val), lo = e
        if lo == 0:
            return 0
        one = val if kind == "lit" else alts_len(val) if kind == "group" else best.get(val, math.inf)
        return one * lo

    # a shortest derivation never repeats a rule on a path, so len(reach) + 1 rounds settle it
    for _ in range(len(reach) + 1):
        changed = False
        for r in reach:
            n = alts_len(rules[r])
            if n < best[r]:
                best[r], changed = n, True
        if not changed:
            break
    return best


def problem(printed: str, max_chars: int) -> Optional[str]:
    """Why a printed grammar would trap the jump-forward search, or None."""
    rules = parse(printed)
    if not rules or "root" not in rules:
        return None
    best = shortest(rules)
    dead = sorted(r for r, n in best.items() if n == math.inf)
    if dead:
        return (f"it matches no finite text: rule {dead[0]} can never finish (a recursion "
                "without a way out, such as a $ref to itself through a required property)")
    longest = max(best.values())
    if longest > max_chars:
        return (f"its shortest match is {longest} characters long, more than the "
                f"{max_chars} a constraint may force")
    return None
