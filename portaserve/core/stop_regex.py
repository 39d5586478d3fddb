"""Stop regexes (SGLang's ``stop_regex``): a request stops once a match of one of its
patterns ends in the output, found by searching the decoded tail after each token.

* The tail is the last ``window(pattern)`` tokens: the most characters a match can span
  (plus two tokens), or ``MAX_WINDOW`` tokens for a pattern without a bound (``\\n+``, ``.*``).
  SGLang decodes the whole output then, every step; a match must end within the last
  ``MAX_WINDOW`` tokens here, so each step's cost stays bounded.
* Only a match that ends in the text the new token added counts (an earlier one came
  before min_new_tokens).
* Matching runs on the scheduler's thread with a time limit (the ``regex`` module's
  ``timeout``): a pattern that backtracks catastrophically ends its own request with a 400
  rather than stall every other.
* As in SGLang, the matched text stays in the output (a stream cannot hold back a text
  it cannot know), and ``finish_reason.matched`` is the pattern.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import regex

MAX_PATTERN_CHARS = 1000
MAX_WINDOW = 1024  # tokens
TIME_LIMIT_S = 0.05  # per search


class StopRegexTimeout(Exception):
    pass


@functools.lru_cache(maxsize=512)
def compiled(pattern: str):
    return regex.compile(pattern)


@functools.lru_cache(maxsize=512)
def window(pattern: str) -> int:
    """Tokens of output to search: a character a token at least (a token that decodes to
    nothing is rare), plus two for a character split over tokens."""
    try:
        hi = re._parser.parse(pattern).getwidth()[1]  # noqa: SLF001 - the stdlib's own width bound
    except Exception:  # noqa: BLE001 - regex-only syntax: no bound known
        return MAX_WINDOW
    return min(hi + 2, MAX_WINDOW)


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


def search(pattern: str, text: str, after: int) -> bool:
    """Whether a match of pattern ends in text past position `after` (overlapping matches
    included).  Raises StopRegexTimeout past the time limit."""
    try:
        return any(m.end() > after for m in compiled(pattern).finditer(
            text, pos=0, overlapped=True, timeout=TIME_LIMIT_S))
    except TimeoutError:
        raise StopRegexTimeout(pattern) from None
