"""The shortest text each rule of a grammar can produce, read from xgrammar's printed form.

A constraint can be valid and still be a trap.  A JSON schema that recurses through a
required property (``{"properties": {"a": {"$ref": "#"}}, "required": ["a"]}``) or an
EBNF rule without a way out (``r ::= "a" r``) matches no finite text, and a regex such as
``a{20000000}`` forces twenty million characters.  xgrammar compiles both; its
jump-forward search then runs without end (until memory runs out) or for seconds, on the
scheduler's thread.  So a grammar is refused when a rule reachable from the root cannot
finish, or when it forces (allows exactly one) text longer than a limit somewhere.

The printed grammar (``str(xgrammar.Grammar)``) is one rule per line,
``name ::= body [(=lookahead)]``, the body built from quoted strings, character classes,
rule names, parentheses, ``|``, the quantifiers ``* + ?`` and ``{n, m}``, and
``Regex("...", ...)`` (a JSON string's pattern that xgrammar keeps whole; taken as one
character of many here).  Anything else makes the check give up (return no finding) rather than
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


# An element is ((kind, value), (lo, hi)): kind "lit" (a string of `value` characters),
# "cls" (one character of several), "group" (alternatives) or "rule" (a name); repeated
# lo to hi times (hi -1: no limit).

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
    elif c == "[":  # a character class
        j = i + 1
        while j < len(s) and s[j] != "]":
            j += 2 if s[j] == "\\" else 1
        if j >= len(s):
            raise _Unreadable
        prim, i = ("cls", 1), j + 1
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
            _, i = _parse_elem(s, i + 1)  # its string argument
            j = s.find(")", i)  # then options such as json_string=true
            if j < 0:
                raise _Unreadable
            prim, i = ("cls", 1), j + 1  # taken as finite and free
    rep = (1, 1)
    if i < len(s) and s[i] in "*?+":
        rep, i = {"*": (0, -1), "?": (0, 1), "+": (1, -1)}[s[i]], i + 1
    elif i < len(s) and s[i] == "{":
        m = _COUNT.match(s, i)
        if not m:
            raise _Unreadable
        rep, i = (int(m.group(1)), int(m.group(2))), m.end()
    return (prim, rep), i


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
    except (_Unreadable, IndexError, RecursionError):
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


def _reachable(rules: dict, root: str) -> set:
    reach, todo = set(), [root]
    while todo:
        r = todo.pop()
        if r in reach or r not in rules:
            continue
        reach.add(r)
        todo.extend(_refs(rules[r], set()))
    return reach


def _post_order(rules: dict, reach: set) -> list:
    """The rules of reach, each after the rules it uses (depth-first, iterative: chains of
    thousands of rules; on a recursion, the rule first met comes last)."""
    done, order = set(), []
    for top in sorted(reach):
        if top in done:
            continue
        stack = [(top, iter(_refs(rules[top], set())))]
        done.add(top)
        while stack:
            r, it = stack[-1]
            nxt = next((x for x in it if x in reach and x not in done), None)
            if nxt is None:
                stack.pop()
                order.append(r)
            else:
                done.add(nxt)
                stack.append((nxt, iter(_refs(rules[nxt], set()))))
    return order


def _alts_len(alts, best: dict):
    return min((sum(_elem_len(e, best) for e in seq) for seq in alts), default=0)


def _elem_len(e, best: dict):
    (kind, val), (lo, _) = e
    if lo == 0:
        return 0
    one = _alts_len(val, best) if kind == "group" else best.get(val, math.inf) if kind == "rule" else val
    return one * lo


def shortest(rules: dict, root: str = "root") -> dict:
    """{rule reachable from root: length of its shortest text} (math.inf: cannot finish).
    A worklist seeded in dependency order, so outside recursions each rule is computed once,
    after the rules it uses; a rule is computed again only when a rule it uses got shorter.
    (Seeded in any order, a root of n alternatives over n rules was computed ~n times: a
    regex of 4,000 alternatives took 144 s.)"""
    reach = _reachable(rules, root)
    best = {r: math.inf for r in reach}
    users: dict = {r: set() for r in reach}
    for r in reach:
        for x in _refs(rules[r], set()):
            if x in users:
                users[x].add(r)
    todo, queued = _post_order(rules, reach)[::-1], set(reach)  # popped from the end
    while todo:
        r = todo.pop()
        queued.discard(r)
        n = _alts_len(rules[r], best)
        if n < best[r]:
            best[r] = n
            for u in users[r] - queued:
                todo.append(u)
                queued.add(u)
    return best


def longest_forced(rules: dict, root: str = "root") -> int:
    """The longest run of text the grammar forces somewhere (exactly one text possible):
    runs of strings, and of rules, groups and repetitions {n, n} that have a single text;
    a repetition of a single text also forces its first lo copies.  Text forced across a
    rule's end is counted on each side separately (an under-count, never an over-count)."""
    single: dict = {}  # rule -> length of its only text, or None

    def rule_single(r):
        return single.get(r)  # not computed yet: on a recursion, which has no single text

    def alts_single(alts):
        if len(alts) != 1:
            return None
        total = 0
        for e in alts[0]:
            one = elem(e)[1]
            if one is None:
                return None
            total += one
        return total

    def elem(e):
        """(length forced at its start, length of its only text or None)."""
        (kind, val), (lo, hi) = e
        one = (val if kind == "lit" else alts_single(val) if kind == "group"
               else rule_single(val) if kind == "rule" else None)
        if one is None:
            return 0, None
        return one * lo, (one * lo if lo == hi else None)

    def runs(alts):
        top = 0
        for seq in alts:
            run = 0
            for e in seq:
                if e[0][0] == "group":
                    top = max(top, runs(e[0][1]))
                start, one = elem(e)
                run += start
                if one is None:
                    top, run = max(top, run), 0
            top = max(top, run)
        return top

    reach = _reachable(rules, root)
    for r in _post_order(rules, reach):
        single[r] = alts_single(rules[r])
    return max((runs(rules[r]) for r in reach), default=0)


def problem(printed: str, max_chars: int) -> Optional[str]:
    """Why a printed grammar would trap the jump-forward search, or None."""
    rules = parse(printed)
    if not rules or "root" not in rules:
        return None
    best = shortest(rules)
    if best["root"] == math.inf:
        return ("it matches no finite text (a recursion without a way out, such as a $ref to "
                "itself through a required property)")
    dead = sorted(r for r, n in best.items() if n == math.inf)
    if dead:
        return (f"part of it can never finish: rule {dead[0]} recurses without a way out (such "
                "as a $ref to itself through a required property)")
    forced = longest_forced(rules)
    if forced > max_chars:
        return f"it forces a text of {forced} characters, more than the {max_chars} allowed"
    return None
