"""Sampling parameters, with SGLang's names and validation that names the problem."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Union


MAX_N = 128  # completions per request (OpenAI's limit for n)


def lax_int(v):
    """16.0 is an integer, as pydantic (SGLang's and vLLM's validation) takes it."""
    return int(v) if type(v) is float and math.isfinite(v) and v.is_integer() else v


def _show(v) -> str:
    """A value for an error message, cut short (a JSON number may have any length)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


class InvalidRequest(ValueError):
    """A request the engine refuses; ``param`` names the offending field."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code  # OpenAI's error code where it has one (context_length_exceeded)


_DERIVED = {"stop_strs", "stop_regex_strs"}  # set by validate(), not by callers


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: Union[str, list, None] = None
    stop_token_ids: Optional[list] = None
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    sampling_seed: Optional[int] = None
    no_stop_trim: bool = False
    min_new_tokens: int = 0
    n: int = 1
    # token id -> added to its logit before sampling (OpenAI's logit_bias: ids as strings or
    # ints, values in [-100, 100]); normalised to {int: float} by validate()
    logit_bias: Optional[dict] = None
    # SGLang's: the request stops once a match of one of these patterns ends in the output
    # (core/stop_regex.py); the matched text stays in it
    stop_regex: Union[str, list, None] = None
    stop_strs: list = field(default_factory=list, repr=False)
    stop_regex_strs: list = field(default_factory=list, repr=False)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        if d is None:
            return cls()
        if isinstance(d, SamplingParams):  # checked (and normalised) like a dict's values
            p = replace(d)
            p.validate()
            return p
        if not isinstance(d, dict):
            raise InvalidRequest("sampling_params must be an object", "sampling_params")
        known = {f.name for f in fields(cls)} - _DERIVED
        unknown = set(d) - known
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}",
                                 sorted(unknown)[0])
        p = cls(**{k: v for k, v in d.items() if v is not None or k in ("stop", "stop_token_ids")})
        p.validate()
        return p

    def validate(self) -> None:
        def num(name, lo=None, hi=None, lo_open=False, integer=False):
            v = getattr(self, name)
            if integer:
                v = lax_int(v)
                setattr(self, name, v)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
                raise InvalidRequest(f"{name} must be a{'n integer' if integer else ' number'}, got {_show(v)}", name)
            if isinstance(v, float) and math.isnan(v):
                raise InvalidRequest(f"{name} must not be NaN", name)
            if isinstance(v, int) and not -2 ** 63 <= v < 2 ** 63:  # a JSON integer of any size
                raise InvalidRequest(f"{name} is out of range: {_show(v)}", name)
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise InvalidRequest(f"{name} must be {'>' if lo_open else '>='} {lo}, got {_show(v)}", name)
            if hi is not None and v > hi:
                raise InvalidRequest(f"{name} must be <= {hi}, got {_show(v)}", name)

        num("max_new_tokens", 0, integer=True)
        num("min_new_tokens", 0, integer=True)
        if self.min_new_tokens > self.max_new_tokens:  # as SGLang and vLLM
            raise InvalidRequest(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                                 f"({self.max_new_tokens})", "min_new_tokens")
        num("temperature", 0.0)
        if math.isinf(self.temperature):
            raise InvalidRequest("temperature must be finite", "temperature")
        num("top_p", 0.0, 1.0, lo_open=True)
        if type(self.top_k) is int and self.top_k >= 2 ** 31:  # more than any vocabulary:
            self.top_k = -1  # no limit, as -1 (and fits an int32)
        num("top_k", integer=True)
        if self.top_k == 0:  # off, as in vLLM and transformers (SGLang takes only -1)
            self.top_k = -1
        if self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1 or 0 (off) or >= 1, got {_show(self.top_k)}", "top_k")
        num("min_p", 0.0, 1.0)
        num("frequency_penalty", -2.0, 2.0)
        num("presence_penalty", -2.0, 2.0)
        num("repetition_penalty", 0.0, 2.0, lo_open=True)
        num("n", 1, MAX_N, integer=True)
        self.sampling_seed = lax_int(self.sampling_seed)
        if self.sampling_seed is not None and (isinstance(self.sampling_seed, bool)
                                               or not isinstance(self.sampling_seed, int)):
            raise InvalidRequest("sampling_seed must be an integer", "sampling_seed")
        if self.sampling_seed is not None and not -2 ** 63 <= self.sampling_seed < 2 ** 64:
            raise InvalidRequest(f"sampling_seed must be in [-2**63, 2**64), got {_show(self.sampling_seed)}",
                                 "sampling_seed")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if type(getattr(self, name)) is int and getattr(self, name) in (0, 1):
                setattr(self, name, bool(getattr(self, name)))  # as pydantic: 0 and 1 are booleans
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be a boolean, got {getattr(self, name)!r}", name)
        stop = self.stop
        if stop is None:
            self.stop_strs = []
        elif isinstance(stop, str):
            self.stop_strs = [stop] if stop else []
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            self.stop_strs = [s for s in stop if s]
        else:
            raise InvalidRequest("stop must be a string or a list of strings", "stop")
        sr = [self.stop_regex] if isinstance(self.stop_regex, str) else self.stop_regex
        if sr is not None and not (isinstance(sr, (list, tuple)) and all(isinstance(s, str) for s in sr)):
            raise InvalidRequest("stop_regex must be a string or a list of strings", "stop_regex")
        self.stop_regex_strs = [s for s in sr or [] if s]
        from portaserve.core import stop_regex

        for pattern in self.stop_regex_strs:
            why = stop_regex.problem(pattern)
            if why:
                raise InvalidRequest(f"stop_regex {_show(pattern)}: {why}", "stop_regex")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
                raise InvalidRequest("stop_token_ids must be a list of integers", "stop_token_ids")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidRequest("logit_bias must be an object mapping token ids to numbers", "logit_bias")
            bias = {}
            for k, v in self.logit_bias.items():
                if not ((isinstance(k, int) and not isinstance(k, bool))
                        or (isinstance(k, str) and re.fullmatch(r"-?[0-9]+", k))):
                    raise InvalidRequest(f"logit_bias: {_show(k)} is not a token id", "logit_bias")
                tid = int(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:  # NaN too
                    raise InvalidRequest(f"logit_bias[{_show(k)}] must be a number from -100 to 100, got {_show(v)}",
                                         "logit_bias")
                bias[tid] = float(v)
            self.logit_bias = bias or None
        kinds = [k for k in ("json_schema", "regex", "ebnf") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise InvalidRequest(f"only one of json_schema, regex, ebnf may be set (got {', '.join(kinds)})",
                                 kinds[1])

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _DERIVED}
