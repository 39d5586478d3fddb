"""What the interpreter needs from a backend: one generate call in SGLang's native
shape, and the chat template.  Everything else (select scoring, fork prefix fill) is
built from ``generate`` in the interpreter, so every backend behaves the same."""
from __future__ import annotations

from typing import Iterator, Union


class Backend:
    def generate(self, text: Union[str, list, None], sampling_params: dict, *,
                 return_logprob: bool = False, logprob_start_len: int | None = None,
                 top_logprobs_num: int | None = None, stream: bool = False,
                 input_ids: list | None = None) -> Union[dict, list, Iterator[dict]]:
        """{"text", "output_ids", "meta_info": {...}} for one text, a list for a list;
        stream=True (one text) -> an iterator of those with the text so far.  With
        ``text=None``, ``input_ids`` (a list of lists of token ids) is the batch.
        Raises LangError with the backend's message on failure."""
        raise NotImplementedError

    def chat_template(self):
        """The ChatTemplate roles render with (cached by the backend)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass
