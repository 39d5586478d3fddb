"""``Runtime``: an in-process ``portaserve.Engine`` as a backend (no server, no HTTP)."""
from __future__ import annotations

import threading

from portaserve.lang import chat_template as ct
from portaserve.lang.backends.base import Backend
from portaserve.lang.errors import LangError


class Runtime(Backend):
    """``Runtime(model_path=None, **server_args)`` starts an Engine and owns it;
    ``Runtime(engine=eng)`` uses one you already have (and leaves it running)."""

    def __init__(self, model_path=None, engine=None, chat_template=None, **server_args):
        if engine is None:
            from portaserve.engine import Engine

            engine = Engine(model_path, **server_args)
            self._owned = True
        else:
            self._owned = False
        self.engine = engine
        self._template_spec = chat_template
        self._template = None
        self._lock = threading.Lock()

    def generate(self, text, sampling_params, *, return_logprob=False, logprob_start_len=None,
                 top_logprobs_num=None, stream=False, input_ids=None):
        try:
            out = self.engine.generate(text, dict(sampling_params), input_ids=input_ids,
                                       return_logprob=return_logprob,
                                       logprob_start_len=logprob_start_len,
                                       top_logprobs_num=top_logprobs_num, stream=stream)
        except Exception as e:  # noqa: BLE001 - InvalidRequest, EngineDead, ...
            raise LangError(str(e)) from e
        if stream:
            return self._guard(out)
        return out

    @staticmethod
    def _guard(it):
        try:
            yield from it
        except Exception as e:  # noqa: BLE001
            raise LangError(str(e)) from e

    def chat_template(self) -> ct.ChatTemplate:
        with self._lock:
            if self._template is None:
                # the engine's tokenizer carries its --chat-template already
                self._template = ct.resolve(self._template_spec, lambda: ct.ChatTemplate.from_tokenizer(
                    self.engine.tokenizer) if self.engine.tokenizer is not None else ct.plain())
            return self._template

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def shutdown(self) -> None:
        if self._owned:
            self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False
