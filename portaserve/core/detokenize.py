"""Incremental detokenization: text grows token by token and equals the text of the
whole sequence, across multi-byte UTF-8 characters split over tokens and tokens that
merge with their neighbours.  Stop strings are trimmed and never streamed early."""
from __future__ import annotations

import os


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, stop_strs=(), no_stop_trim=False):
        self.tok = tokenizer
        self.kw = {"skip_special_tokens": skip_special_tokens,
                   "spaces_between_special_tokens": spaces_between_special_tokens}
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters already handed out
        self.holdback = max((len(s) for s in stop_strs), default=1) - 1
        self.stop_strs = list(stop_strs)
        self.no_stop_trim = no_stop_trim

    def _decode(self, ids) -> str:
        try:
            return self.tok.decode(ids, **self.kw)
        except TypeError:  # tokenizers without spaces_between_special_tokens
            return self.tok.decode(ids, skip_special_tokens=self.kw["skip_special_tokens"])

    def feed(self, new_ids, finished_reason=None) -> None:
        """One output message: its new tokens, then, if it ended the request, finish().
        The stop token that ended a request is not part of its text (as in SGLang and
        vLLM; it would show with skip_special_tokens false), unless no_stop_trim."""
        matched = (finished_reason or {}).get("matched")
        if (type(matched) is int and not self.no_stop_trim and new_ids
                and new_ids[-1] == matched):
            new_ids = new_ids[:-1]
        if new_ids:
            self.add(new_ids)
        if finished_reason is not None:
            self.finish(finished_reason)

    def add(self, new_ids) -> None:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def finish(self, finished_reason) -> None:
        """Flush what is left and trim a matched stop string."""
        if self.read_offset < len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            new_text = self._decode(self.ids[self.prefix_offset:])
            self.text += new_text[len(prefix_text):]
            self.read_offset = len(self.ids)
        matched = (finished_reason or {}).get("matched")
        if isinstance(matched, str) and matched in self.stop_strs and not self.no_stop_trim:  # (not a stop_regex)
            # the occurrence the last token completed (earlier ones came before
            # min_new_tokens and stay)
            before = (len(os.path.commonprefix([self._decode(self.ids[:-1]), self.text]))
                      if len(self.ids) > 1 else 0)
            i = self.text.find(matched, max(0, before - len(matched) + 1))
            if i < 0:
                i = self.text.rfind(matched)
            if i >= 0:
                self.text = self.text[:i]
        self.holdback = 0

    def pop_delta(self, finished: bool = False) -> str:
        """New text safe to stream now (holding back a possible stop-string prefix)."""
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.holdback)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
