"""The program's intermediate representation: what ``s += ...`` appends.

Expressions are plain data; the interpreter (interpreter.py) executes them in order.
``a + b`` of expressions (or of an expression and a string) is a ``Seq``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

# dtype=int/float are constrained by a regex (bounded so generation always ends)
REGEX_INT = r"-?[0-9]{1,12}"
REGEX_FLOAT = r"-?[0-9]{1,12}(\.[0-9]{1,12})?"

# SGLang's names for the sampling parameters a gen() may set
SAMPLING_KEYS = ("max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k",
                 "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                 "ignore_eos", "regex", "json_schema", "ebnf", "sampling_seed",
                 "skip_special_tokens", "no_stop_trim")


class Expr:
    def __add__(self, other):
        return Seq([self, to_expr(other)])

    def __radd__(self, other):
        return Seq([to_expr(other), self])


def to_expr(x) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return Text(x)
    if isinstance(x, (list, tuple)):
        return Seq([to_expr(e) for e in x])
    raise TypeError(f"cannot add {type(x).__name__} to a program state (use str or a primitive)")


@dataclass
class Text(Expr):
    value: str


@dataclass
class Seq(Expr):
    items: list


@dataclass
class RoleBegin(Expr):
    role: str


@dataclass
class RoleEnd(Expr):
    role: str


@dataclass
class Gen(Expr):
    name: Optional[str]
    sampling: dict = field(default_factory=dict)  # only what the caller set
    dtype: Any = None                             # int, float, str or None
    logprob: dict = field(default_factory=dict)   # return_logprob and its options, if asked


@dataclass
class Select(Expr):
    name: Optional[str]
    choices: list
    method: str = "normalized"  # "normalized", "sum", "greedy", "unconditional" (choices.py)


@dataclass
class Join(Expr):
    """Wait for a fork group and merge it into the parent (see state.ForkGroup.join)."""
    children: list
    mode: str


def sampling_dict(max_tokens=None, stop=None, temperature=None, top_p=None, top_k=None,
                  regex=None, json_schema=None, dtype=None, **extra) -> dict:
    """gen()'s arguments -> SGLang sampling params, leaving out what was not given."""
    if dtype is int:
        regex = regex or REGEX_INT
    elif dtype is float:
        regex = regex or REGEX_FLOAT
    elif dtype not in (None, str):
        raise ValueError(f"dtype must be int, float or str, got {dtype!r}")
    if json_schema is not None and not isinstance(json_schema, str):
        json_schema = json.dumps(json_schema)
    if "max_new_tokens" in extra and max_tokens is None:
        max_tokens = extra.pop("max_new_tokens")
    for k in extra:
        if k not in SAMPLING_KEYS:
            raise TypeError(f"gen() got an unknown sampling parameter {k!r}")
    d = {"max_new_tokens": max_tokens, "stop": stop, "temperature": temperature, "top_p": top_p,
         "top_k": top_k, "regex": regex, "json_schema": json_schema, **extra}
    return {k: v for k, v in d.items() if v is not None}
