"""A request's state inside the scheduler."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from portaserve.core.sampling_params import SamplingParams


@dataclass
class Req:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only
    top_logprobs_num: int = 0
    stream: bool = False

    # --- progress ---
    output_ids: list[int] = field(default_factory=list)
    finished_reason: Optional[dict] = None
    # KV bookkeeping
    req_pool_idx: Optional[int] = None
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: Any = None
    kv_len: int = 0  # tokens of fill_ids whose KV is in the cache
    last_slot: Optional[int] = None  # KV slot of position kv_len - 1 when this request allocated it
    slots: list = field(default_factory=list)  # host mirror of its req_to_token row[:kv_len]
    cached_tokens: int = 0
    admitted_once: bool = False
    retractions: int = 0
    extend_n: int = 0  # tokens this request computes in the current extend batch
    # bumped each time its KV is released (finished, retracted, re-queued by a jump): a
    # token sampled for it in a step launched before then is not its own any more
    epoch: int = 0
    input_lp_done: bool = False
    # logprobs
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    # sampling state
    generator: Optional[torch.Generator] = None
    grammar: Any = None  # xgrammar matcher of a constrained request
    grammar_future: Any = None
    grammar_released: bool = False  # deterministic (TP) mode: rank 0 announced it compiled
    jump_forward_tokens: int = 0
    # timing
    created: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None

    def constraint(self) -> Optional[tuple[str, str]]:
        for kind in ("json_schema", "regex", "ebnf"):
            v = getattr(self.sampling, kind)
            if v is not None:
                return kind, v
        return None

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV this request needs: prompt plus output so far."""
        return self.input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def seq_len(self) -> int:
        """len(fill_ids), without building the list."""
        return len(self.input_ids) + len(self.output_ids)

    def extend_len(self) -> int:
        return self.seq_len - self.kv_len

    def input_logprob_start(self) -> int:
        """First prompt position whose logprob is wanted, or len(prompt) for none."""
        if not self.return_logprob or self.logprob_start_len < 0:
            return len(self.input_ids)
        return min(self.logprob_start_len, len(self.input_ids))
