"""The primitives a program is written with: ``function``, ``gen``, ``select``, roles,
and the default backend."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

from portaserve.lang import choices as _choices
from portaserve.lang.ir import (SAMPLING_KEYS, Expr, Gen, RoleBegin, RoleEnd, Select, Seq, Text,
                                sampling_dict, to_expr)

_default_backend = None


def set_default_backend(backend) -> None:
    global _default_backend
    _default_backend = backend


def get_default_backend():
    return _default_backend


def gen(name: Optional[str] = None, max_tokens: Optional[int] = None, stop=None,
        temperature: Optional[float] = None, top_p: Optional[float] = None,
        top_k: Optional[int] = None, regex: Optional[str] = None, json_schema=None,
        choices: Optional[list] = None, dtype=None, choices_method=None,
        return_logprob: Optional[bool] = None, top_logprobs_num: Optional[int] = None,
        logprob_start_len: Optional[int] = None, **sampling) -> Expr:
    """Generate text into variable ``name``.  Unset parameters take the server's defaults.
    ``choices=[...]`` makes it a ``select`` (``choices_method`` picks how); ``dtype=int|float``
    constrains the output by a regex and stores the converted number; ``json_schema`` may
    be a dict or a string.  ``return_logprob=True`` (with ``top_logprobs_num``,
    ``logprob_start_len``) puts the logprobs in ``state.get_meta_info(name)``."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method)
    if choices_method is not None:
        raise ValueError("choices_method goes with choices=[...]")
    sp = sampling_dict(max_tokens, stop, temperature, top_p, top_k, regex, json_schema, dtype,
                       **sampling)
    logprob = {}
    if return_logprob:
        logprob = {"return_logprob": True, "top_logprobs_num": top_logprobs_num,
                   "logprob_start_len": logprob_start_len}
    elif top_logprobs_num is not None or logprob_start_len is not None:
        raise ValueError("top_logprobs_num and logprob_start_len need return_logprob=True")
    return Gen(name, sp, dtype if dtype in (int, float) else None, logprob)


def gen_int(name: Optional[str] = None, **kw) -> Expr:
    return gen(name, dtype=int, **kw)


def gen_float(name: Optional[str] = None, **kw) -> Expr:
    return gen(name, dtype=float, **kw)


def select(name: Optional[str] = None, choices: Optional[list] = None,
           temperature: float = 0.0, choices_method=None, method=None) -> Expr:
    """Append the choice the model finds most likely after the current text.
    ``choices_method`` is SGLang's: ``token_length_normalized`` (the default: mean token
    logprob), ``greedy_token_selection`` or ``unconditional_likelihood_normalized``
    (portaserve.lang.choices); ``"sum"`` ranks by total logprob.  ``method=`` is the
    same argument under portaserve's older name ("normalized" or "sum")."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select needs a non-empty list of non-empty strings")
    if isinstance(temperature, str):  # select(name, choices, "sum"): the old third argument
        raise ValueError(f"select's third argument is temperature, as in SGLang; pass the "
                         f"method as choices_method={temperature!r}")
    if temperature not in (0, None):
        raise ValueError("select is deterministic: it picks by logprob; only temperature=0 "
                         f"is supported, got {temperature!r}")
    if method is not None and choices_method is not None:
        raise ValueError("give choices_method or method, not both")
    picked = choices_method if choices_method is not None else method
    return Select(name, list(choices), _choices.resolve(picked if picked is not None else "normalized"))


def _role(role: str, content=None) -> Expr:
    if content is None:
        return RoleBegin(role)  # open-ended, closed by the matching *_end()
    return Seq([RoleBegin(role), to_expr(content), RoleEnd(role)])


def system(content=None) -> Expr:
    return _role("system", content)


def user(content=None) -> Expr:
    return _role("user", content)


def assistant(content=None) -> Expr:
    return _role("assistant", content)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


class Program:
    """A decorated program: ``prog.run(**args)`` and ``prog.run_batch([args, ...])``."""

    def __init__(self, fn: Callable):
        self.fn = fn
        params = list(inspect.signature(fn).parameters)
        if not params:
            raise TypeError("a @function program takes the state as its first argument")
        self.arg_names = params[1:]
        functools.update_wrapper(self, fn)

    def _split(self, kwargs: dict, strict: bool = False) -> tuple[dict, dict]:
        """Keyword arguments that are sampling defaults (and not the program's own);
        ``strict``: anything else is an error (run_batch passes no program arguments)."""
        sampling = {k: kwargs.pop(k) for k in list(kwargs)
                    if k in SAMPLING_KEYS + ("max_tokens",) and (strict or k not in self.arg_names)}
        if strict and kwargs:
            raise TypeError(f"run_batch() got unknown keyword arguments {sorted(kwargs)}; "
                            f"it takes sampling parameters ({', '.join(SAMPLING_KEYS)}, "
                            "max_tokens), backend, num_threads and progress_bar")
        if "max_tokens" in sampling:
            sampling["max_new_tokens"] = sampling.pop("max_tokens")
        return kwargs, sampling

    def run(self, *args, backend=None, stream: bool = False, **kwargs):
        from portaserve.lang.interpreter import run_program

        kwargs, sampling = self._split(kwargs)
        return run_program(self, _backend(backend), args, kwargs, sampling, stream)

    def run_batch(self, batch_kwargs: list, backend=None, num_threads="auto",
                  progress_bar: bool = False, **sampling):
        from portaserve.lang.interpreter import run_batch

        _, sampling = self._split(dict(sampling), strict=True)
        return run_batch(self, _backend(backend), batch_kwargs, sampling, num_threads, progress_bar)

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)


def function(fn: Callable = None):
    """``@function`` turns ``def prog(s, ...)`` into a Program."""
    if fn is None:
        return function
    return Program(fn)


def _backend(backend):
    b = backend or _default_backend
    if b is None:
        raise RuntimeError("no backend: pass backend=... or call set_default_backend(...)")
    return b


__all__ = ["function", "gen", "gen_int", "gen_float", "select", "system", "user", "assistant",
           "system_begin", "system_end", "user_begin", "user_end", "assistant_begin",
           "assistant_end", "set_default_backend", "get_default_backend", "Program", "Text"]
