"""Turning user input into a validated Req; shared by the Engine and the HTTP server so
both refuse the same bad input with the same messages."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Optional

from portaserve.core.request import Req
from portaserve.core.sampling_params import InvalidRequest, SamplingParams, lax_int


@dataclass(frozen=True)
class Limits:
    context_len: int
    vocab_size: int
    pool_tokens: int
    grammar: bool = False  # structured output available
    max_top_logprobs: int = 20  # --max-top-logprobs-num
    # what a request's sampling params default to before SamplingParams' own defaults
    # (--sampling-defaults model: the model's generation_config.json)
    sampling_defaults: dict = field(default_factory=dict)


def build_req(limits: Limits, tokenizer, prompt, input_ids, sp, return_logprob=False,
              logprob_start_len=None, top_logprobs_num=None, rid: Optional[str] = None) -> Req:
    if input_ids is None:
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string", "prompt")
        if tokenizer is None:
            raise InvalidRequest("this engine was started without a tokenizer: pass input_ids", "prompt")
        input_ids = tokenizer.encode(prompt, add_special_tokens=True)
    if not isinstance(input_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
        raise InvalidRequest("input_ids must be a list of integers", "input_ids")
    if not input_ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    _in_vocab(limits, input_ids, "input_ids", "")
    if limits.sampling_defaults and (sp is None or isinstance(sp, dict)):
        sp = dict(sp or {})
        for k, v in limits.sampling_defaults.items():
            if sp.get(k) is None:  # left out, or null
                sp[k] = v
    params = SamplingParams.from_dict(sp)
    if tokenizer is None:  # stop texts are found in decoded text (SGLang refuses them here too)
        for name in ("stop", "stop_regex"):
            if getattr(params, name + "_strs"):
                raise InvalidRequest(f"{name} needs a tokenizer, and this engine runs without one "
                                     "(--skip-tokenizer-init): use stop_token_ids", name)
    ctx = limits.context_len
    # OpenAI's wording and code: clients look for "maximum context length" to shorten
    # the conversation and retry
    if len(input_ids) >= ctx:
        raise InvalidRequest(
            f"This model's maximum context length is {ctx} tokens. However, the prompt has "
            f"{len(input_ids)} tokens. Please reduce the length of the prompt.", "prompt",
            "context_length_exceeded")
    if len(input_ids) + params.max_new_tokens > ctx:
        raise InvalidRequest(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{len(input_ids) + params.max_new_tokens} tokens ({len(input_ids)} in the prompt, "
            f"{params.max_new_tokens} in max_new_tokens). Please reduce the length of the prompt "
            "or max_new_tokens.", "max_new_tokens", "context_length_exceeded")
    if len(input_ids) >= limits.pool_tokens:  # the prompt alone: as the context check above
        raise InvalidRequest(
            f"This server's KV cache holds {limits.pool_tokens} tokens (less than the model's "
            f"maximum context length of {ctx}). However, the prompt has {len(input_ids)} tokens. "
            "Please reduce the length of the prompt.", "prompt", "context_length_exceeded")
    if len(input_ids) + params.max_new_tokens > limits.pool_tokens:
        raise InvalidRequest(
            f"prompt + max_new_tokens ({len(input_ids) + params.max_new_tokens}) exceeds the KV "
            f"pool ({limits.pool_tokens} tokens)", "max_new_tokens")
    # ids that could never be sampled: a typo, or ids of another model's vocabulary
    _in_vocab(limits, params.stop_token_ids or (), "stop_token_ids", "stop_token_ids: ")
    _in_vocab(limits, params.logit_bias or (), "logit_bias", "logit_bias: ")
    for kind in ("json_schema", "regex", "ebnf"):
        value = getattr(params, kind)
        if value is None:
            continue
        if not limits.grammar:
            raise InvalidRequest(f"structured output ({kind}) is off on this server (--grammar-backend none "
                                 "or no tokenizer)", kind)
        from portaserve.core.grammar import GrammarError, normalise, validate_constraint

        try:
            text = normalise(kind, value)
            validate_constraint(kind, text)
        except GrammarError as e:
            raise InvalidRequest(str(e), kind) from None
        setattr(params, kind, text)
    top_logprobs_num, logprob_start_len = lax_int(top_logprobs_num), lax_int(logprob_start_len)
    if (isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num or 0, int)
            or not 0 <= (top_logprobs_num or 0) <= limits.vocab_size):
        raise InvalidRequest(f"top_logprobs_num must be an integer from 0 to the vocabulary size "
                             f"({limits.vocab_size}), got {top_logprobs_num!r}", "top_logprobs_num")
    if (top_logprobs_num or 0) > limits.max_top_logprobs:  # each is returned for every token
        raise InvalidRequest(f"top_logprobs_num ({top_logprobs_num}) is above this server's limit of "
                             f"{limits.max_top_logprobs} (--max-top-logprobs-num)", "top_logprobs_num")
    if logprob_start_len is not None and (isinstance(logprob_start_len, bool)
                                          or not isinstance(logprob_start_len, int)):
        raise InvalidRequest("logprob_start_len must be an integer", "logprob_start_len")
    start = -1 if logprob_start_len is None else logprob_start_len
    if return_logprob and not -1 <= start < len(input_ids):  # -1: the output's only (SGLang's default)
        raise InvalidRequest(f"logprob_start_len ({start}) must be -1 (output tokens only) or a "
                             f"position in the prompt, below its {len(input_ids)} tokens", "logprob_start_len")
    return Req(rid or uuid.uuid4().hex, list(input_ids), params, bool(return_logprob), start,
               int(top_logprobs_num or 0))


def _in_vocab(limits: Limits, ids, param: str, prefix: str) -> None:
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{prefix}token id {bad} is outside the vocabulary (size {limits.vocab_size})", param)


def copy_params(sp, j: int):
    """The sampling params of the j-th of n copies of a request (n > 1): a seeded request's
    copies draw from seeds seed, seed + 1, ... (as vLLM's), so they are n different samples
    and the whole set is reproducible; unseeded ones are left as they are."""
    seed = lax_int(sp.get("sampling_seed") if isinstance(sp, dict) else getattr(sp, "sampling_seed", None))
    if j == 0 or seed is None or isinstance(seed, bool) or not isinstance(seed, int):
        return sp  # (validation names a bad value)
    seed += j
    seed = seed - 2 ** 64 if seed >= 2 ** 64 else seed
    return {**sp, "sampling_seed": seed} if isinstance(sp, dict) else replace(sp, sampling_seed=seed)
