"""The reasoning parser: thinking split from the answer, whole and streamed in any pieces."""
from __future__ import annotations

import random
import zlib

import pytest

from portaserve.server import reasoning

CASES = [
    # (parser, text, reasoning, content)
    ("qwen3", "<think>\nLet me see.\n</think>\n\nParis.", "\nLet me see.\n", "Paris."),
    ("qwen3", "<think>\n\n</think>\n\nParis.", "\n\n", "Paris."),  # enable_thinking false
    ("qwen3", "Paris, no thinking.", "", "Paris, no thinking."),
    ("qwen3", "  <thinking is a word", "", "  <thinking is a word"),
    ("qwen3", "<think>cut short by max_tokens", "cut short by max_tokens", ""),
    ("qwen3", "<think>a</think>b <think>c</think>", "a", "b <think>c</think>"),  # only the first block
    ("deepseek-r1", "Hmm, 2+2.\n</think>\n\n4", "Hmm, 2+2.\n", "4"),
    ("deepseek-r1", "<think>Hmm.</think>4", "Hmm.", "4"),
    ("deepseek-r1", "all thinking, never closed", "all thinking, never closed", ""),
    ("deepseek-r1", "a </thin", "a </thin", ""),
]


@pytest.mark.parametrize("parser,text,want_r,want_c", CASES)
def test_split_and_any_streaming_split(parser, text, want_r, want_c):
    assert reasoning.split(text, parser) == (want_r, want_c)
    rng = random.Random(zlib.crc32(text.encode()))
    for _ in range(30):
        s = reasoning.ReasoningStream(parser)
        got_r, got_c, i = "", "", 0
        while i < len(text):
            k = rng.randint(1, 5)
            r, c = s.feed(text[i:i + k])
            got_r, got_c, i = got_r + r, got_c + c, i + k
        r, c = s.finish()
        assert (got_r + r, got_c + c) == (want_r, want_c)


def test_nothing_of_a_tag_leaks_early():
    s = reasoning.ReasoningStream("qwen3")
    assert s.feed("<thi") == ("", "")  # may be the opening tag
    assert s.feed("nk>abc</th") == ("abc", "")  # may be the closing tag
    assert s.feed("ink>\nAnswer") == ("", "Answer")


def test_unknown_parser():
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning.ReasoningStream("o1")


def test_constrained_output_is_all_answer_where_thinking_is_assumed():
    """A grammar (a tool-call schema, response_format) holds from the first token, so the
    output has no thinking: deepseek-r1's parser, which assumes thinking until </think>,
    would have put the whole answer in reasoning_content."""
    calls = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert reasoning.split(calls, "deepseek-r1") == (calls, "")  # what the parser alone would do
    assert reasoning.for_request("deepseek-r1", constrained=True) is None
    assert reasoning.for_request("deepseek-r1", constrained=False) == "deepseek-r1"
    assert reasoning.for_request("qwen3", constrained=True) == "qwen3"  # no block: all answer anyway
    assert reasoning.split(calls, "qwen3") == ("", calls)
