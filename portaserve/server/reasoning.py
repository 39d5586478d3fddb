"""Separating a reasoning model's thinking from its answer (SGLang's --reasoning-parser):
the text between <think> and </think> goes to ``reasoning_content``, the rest to
``content``, in whole messages and token by token in streams.

Parsers:
  qwen3        thinking only inside an explicit <think>...</think> at the start of the
               output (Qwen3 with enable_thinking false writes no block, or an empty one)
  deepseek-r1  thinking from the first token until </think> (the chat template already
               opened <think> in the prompt); a <think> the model repeats is dropped; no
               </think> at all means the whole output was thinking
"""
from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek-r1")
FORCED = ("deepseek-r1",)  # thinking from the first token, without an opening tag


def for_request(parser, constrained: bool):
    """The parser a request's output goes through: none where a grammar (json_schema,
    regex, ebnf, a tool-call schema) holds from the first token and the parser expects
    thinking there (deepseek-r1): that output is all answer."""
    return None if parser in FORCED and constrained else parser


class ReasoningStream:
    """Feed output text in pieces; get (reasoning, content) deltas back.  A piece that may
    be the start of a tag is held back until the next one decides it."""

    def __init__(self, parser: str):
        if parser not in PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; known: {', '.join(PARSERS)}")
        self.forced = parser in FORCED
        # "start": before the first visible text (an opening tag may come); "think"; "answer"
        self.state = "start"
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = [], []
        buf = self.held + text
        self.held = ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if START.startswith(stripped) and len(stripped) < len(START):
                    self.held = buf  # maybe the opening tag, in pieces
                    break
                if stripped.startswith(START):
                    buf, self.state = stripped[len(START):], "think"
                else:
                    self.state = "think" if self.forced else "answer"
            elif self.state == "think":
                i = buf.find(END)
                if i >= 0:
                    reasoning.append(buf[:i])
                    buf, self.state = buf[i + len(END):].lstrip("\n"), "answer_start"
                    continue
                keep = _partial_suffix(buf, END)
                reasoning.append(buf[:len(buf) - keep])
                self.held = buf[len(buf) - keep:]
                break
            elif self.state == "answer_start":  # newlines between </think> and the answer
                stripped = buf.lstrip("\n")
                if not stripped:
                    break
                buf, self.state = stripped, "answer"
            else:
                content.append(buf)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is still held back, once the output is complete."""
        held, self.held = self.held, ""
        if self.state == "think":
            return held, ""
        if self.state == "start":
            return ("", held) if not self.forced else (held, "")
        return "", held


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def split(text: str, parser: str) -> tuple[str, str]:
    """(reasoning, content) of a whole output: what a stream would carry."""
    s = ReasoningStream(parser)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    return r1 + r2, c1 + c2
