"""Synthetic benchmark datasets with SGLang bench_serving semantics, as token ids.

* random: input/output lengths drawn uniformly from [len * range_ratio, len] (SGLang's
  convention), prompts of random token ids, so lengths are exact.
* generated-shared-prefix: groups of prompts sharing one system prompt, each with its own
  question; every request wants the same output length.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BenchRequest:
    input_ids: list
    output_len: int


def _ids(rng, n, vocab, lo=100):
    return rng.integers(lo, vocab - 1, size=n).tolist()


def random_dataset(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                   vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    ins = rng.integers(max(1, int(input_len * range_ratio)), input_len + 1, size=num_prompts)
    outs = rng.integers(max(1, int(output_len * range_ratio)), output_len + 1, size=num_prompts)
    return [BenchRequest(_ids(rng, int(i), vocab_size), int(o)) for i, o in zip(ins, outs)]


def uniform_dataset(num_prompts: int, input_range: tuple, output_range: tuple, vocab_size: int,
                    seed: int = 0) -> list[BenchRequest]:
    """Lengths uniform in explicit [lo, hi] ranges (inclusive)."""
    rng = np.random.default_rng(seed)
    ins = rng.integers(input_range[0], input_range[1] + 1, size=num_prompts)
    outs = rng.integers(output_range[0], output_range[1] + 1, size=num_prompts)
    return [BenchRequest(_ids(rng, int(i), vocab_size), int(o)) for i, o in zip(ins, outs)]


def shared_prefix_dataset(num_groups: int, prompts_per_group: int, system_prompt_len: int,
                          question_len: int, output_len: int, vocab_size: int,
                          seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(num_groups):
        system = _ids(rng, system_prompt_len, vocab_size)
        for _ in range(prompts_per_group):
            reqs.append(BenchRequest(system + _ids(rng, question_len, vocab_size), output_len))
    # SGLang shuffles the requests so groups arrive interleaved
    order = rng.permutation(len(reqs))
    return [reqs[i] for i in order]
