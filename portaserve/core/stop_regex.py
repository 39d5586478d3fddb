"""Stop regexes (SGLang's ``stop_regex``): a request stops once a match of one of its
patterns ends in the output, found by searching the decoded tail after each token.

* The tail is the last ``window(pattern)`` tokens: the most UTF-8 bytes a match can span
  (a token covers at least one byte; a character may take four), plus two, or
  ``MAX_WINDOW`` tokens for a pattern without a bound (``\\n+``, ``.*``) or with a
  lookbehind.  SGLang decodes the whole output then, every step; a match must lie within
  the last ``MAX_WINDOW`` tokens here, so each step's cost stays bounded.
* Only a match the last token made counts: one whose span was not a match before it
  (an earlier one came before min_new_tokens; a lookahead's match appears only once the
  text it looks at has come).
* Matching runs on the scheduler's thread with a time limit (the ``regex`` module's
  ``timeout``): a pattern that backtracks catastrophically ends its own request with a 400
  rather than stall every other.
* As in SGLang, the matched text stays in the output (a stream cannot hold back a text
  it cannot know), and ``finish_reason.matched`` is the pattern.
"""
from __future__ import annotations

import functools
from typing import Optional

import regex

try:
    from re import _parser as _sre_parser  # Python 3.11+
except ImportError:  # 3.10
    import sre_parse as _sre_parser

MAX_PATTERN_CHARS = 1000
MAX_WINDOW = 256  # tokens
TIME_LIMIT_S = 0.05  # per search


class StopRegexTimeout(Exception):
    pass


@functools.lru_cache(maxsize=512)
def compiled(pattern: str):
    return regex.compile(pattern)


@functools.lru_cache(maxsize=512)
def window(pattern: str) -> int:
    """Tokens of output to search (see the module's docstring)."""
    if "(?<" in pattern:  # a lookbehind: its context is not in the width bound
        return MAX_WINDOW
    try:
        hi = _sre_parser.parse(pattern).getwidth()[1]  # the stdlib's own width bound
    except Exception:  # noqa: BLE001 - regex-only syntax: no bound known
        return MAX_WINDOW
    return min(4 * hi + 2, MAX_WINDOW)


def problem(pattern: str) -> Optional[str]:
    """Why pattern cannot be used, or None."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long, more than the {MAX_PATTERN_CHARS} allowed"
    try:
        compiled(pattern)
    except regex.error as e:
        return f"is not a valid regular expression: {e}"
    except RecursionError:
        return "is nested too deeply"
    return None


def search(pattern: str, text: str, before: int) -> bool:
    """Whether text holds a match of pattern (overlapping ones included) whose span was no
    match in text[:before], the text before the last token.  Raises StopRegexTimeout past
    the time limit."""
    rx = compiled(pattern)
    try:
        spans = [m.span() for m in rx.finditer(text, overlapped=True, timeout=TIME_LIMIT_S)]
        if not spans:
            return False
        old = {m.span() for m in rx.finditer(text[:before], overlapped=True, timeout=TIME_LIMIT_S)}
    except TimeoutError:
        raise StopRegexTimeout(pattern) from None
    return any(s not in old for s in spans)
