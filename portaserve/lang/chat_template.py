"""Roles through the model's own chat template.

A program appends roles one at a time (``s += user(...)``, later ``s += assistant(gen())``),
so a Jinja chat template that renders whole conversations is turned into the text that
opens and closes one message: render the conversation so far with and without one more
message whose content is a sentinel, take the difference, split it at the sentinel.
This keeps history-dependent parts (SmolLM's default system prompt before a first user
turn) and never needs a hand-written per-model table.  What a template renders for an
empty conversation (usually ``{{ bos_token }}``) is left out of the text: the server's
tokenizer adds the BOS token itself, and sending it twice would change the prompt."""
from __future__ import annotations

import os
from typing import Callable, Optional

_SENTINEL = "\x00PORTASERVE_CONTENT\x00"


class ChatTemplate:
    def __init__(self, render: Callable[[list], str], name: str = "chat_template"):
        self._render = render  # messages -> text, add_generation_prompt=False
        self.name = name

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTemplate":
        if not getattr(tokenizer, "chat_template", None):
            return plain()
        return cls(lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False,
                                                              add_generation_prompt=False),
                   getattr(tokenizer, "name_or_path", "tokenizer"))

    @classmethod
    def from_jinja(cls, source: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        """A Jinja template string (or a file holding one), rendered as transformers does."""
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                source = f.read()
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise ValueError(msg)

        env.globals["raise_exception"] = raise_exception
        tmpl = env.from_string(source)
        return cls(lambda msgs: tmpl.render(messages=msgs, add_generation_prompt=False,
                                            bos_token=bos_token, eos_token=eos_token), "jinja")

    def affixes(self, role: str, history: list) -> tuple[str, str]:
        """(text that opens, text that closes) a ``role`` message after ``history``."""
        try:
            return self._affixes(role, history)
        except Exception:  # noqa: BLE001 - e.g. a template that insists roles alternate
            return self._affixes(role, [])

    def _affixes(self, role: str, history: list) -> tuple[str, str]:
        before = self._render_or_empty(history)
        after = self._render(list(history) + [{"role": role, "content": _SENTINEL}])
        if after.startswith(before):
            piece = after[len(before):]
        else:  # the template rewrote earlier turns; keep what follows the shared part
            piece = after[len(os.path.commonprefix([before, after])):]
        if _SENTINEL not in piece:
            raise ValueError(f"chat template {self.name} drops the content of a {role!r} message")
        prefix, suffix = piece.split(_SENTINEL, 1)
        return prefix, suffix

    def _render_or_empty(self, history: list) -> str:
        if not history:
            try:
                return self._render([])
            except Exception:  # noqa: BLE001 - templates that index messages[0]
                return ""
        return self._render(history)


def plain() -> ChatTemplate:
    """For models without a chat template: ``Role: content`` lines."""
    def render(msgs):
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs)
    return ChatTemplate(render, "plain")


def resolve(spec, fallback: Optional[Callable[[], ChatTemplate]] = None) -> ChatTemplate:
    """A ChatTemplate from a ChatTemplate, a tokenizer, or a Jinja string / file."""
    if isinstance(spec, ChatTemplate):
        return spec
    if isinstance(spec, str):
        return ChatTemplate.from_jinja(spec)
    if spec is not None and hasattr(spec, "apply_chat_template"):
        return ChatTemplate.from_tokenizer(spec)
    if spec is not None:
        raise TypeError(f"chat_template must be a ChatTemplate, a tokenizer or a Jinja string, "
                        f"got {type(spec).__name__}")
    return fallback() if fallback else plain()
