"""The primitives a program is written with: ``function``, ``gen``, ``select``, roles,
and the default backend."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

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
        choices: Optional[list] = None, dtype=None, **sampling) -> Expr:
    """Generate text into variable ``name``.  Unset parameters take the server's defaults.
    ``choices=[...]`` makes it a ``select``; ``dtype=int|float`` constrains the output by a
    regex and stores the converted number; ``json_schema`` may be a dict or a string."""
    if choices is not None:
        return select(name, choices)
    sp = sampling_dict(max_tokens, stop, temperature, top_p, top_k, regex, json_schema, dtype,
                       **sampling)
    return Gen(name, sp, dtype if dtype in (int, float) else None)


def gen_int(name: Optional[str] = None, **kw) -> Expr:
    return gen(name, dtype=int, **kw)


def gen_float(name: Optional[str] = None, **kw) -> Expr:
    return gen(name, dtype=float, **kw)


def select(name: Optional[str] = None, choices: Optional[list] = None,
           method: str = "normalized") -> Expr:
    """Append the choice the model finds most likely after the current text.
    method="normalized" ranks by mean token logprob (SGLang's default), "sum" by total."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select needs a non-empty list of non-empty strings")
    if method not in ("normalized", "sum"):
        raise ValueError(f"method must be 'normalized' or 'sum', got {method!r}")
    return Select(name, list(choices), method)


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

    def _split(self, kwargs: dict) -> tuple[dict, dict]:
        """Keyword arguments that are sampling defaults (and not the program's own)."""
        sampling = {k: kwargs.pop(k) for k in list(kwargs)
                    if k in SAMPLING_KEYS + ("max_tokens",) and k not in self.arg_names}
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

        _, sampling = self._split(sampling)
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
