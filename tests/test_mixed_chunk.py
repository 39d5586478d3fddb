"""--enable-mixed-chunk: running requests take their decode step inside prefill batches.
Greedy tokens and logprobs must equal transformers' on the same weights, with mixing
really happening (long prompts prefilled in small chunks while earlier requests decode),
at page size 1 and 4, and every KV slot must come back afterwards."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import random_prompts
from tests.test_hf_equivalence import _check_against_hf


@pytest.mark.parametrize("page_size", [1, 4])
def test_mixed_batches_match_transformers(tiny_models, page_size):
    from portaserve import Engine

    path = tiny_models("llama3")
    hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    prompts = random_prompts(6, 512, 150, 300, seed=21 + page_size)
    prompts.insert(0, random_prompts(1, 512, 5, 5, seed=3)[0])  # decodes while the rest prefill
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=6000, page_size=page_size,
                chunked_prefill_size=64, enable_mixed_chunk=True) as eng:
        assert eng.get_server_info()["enable_mixed_chunk"] is True
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 20, "temperature": 0,
                                                                "ignore_eos": True},
                            return_logprob=True, top_logprobs_num=5)
        info = eng.get_server_info()
        sched = eng.rt.scheduler
        assert not sched.has_work()
        stats = sched.kv_stats()
        assert stats["free"] + stats["evictable"] == stats["max_total_tokens"]  # no slot leaked
    _check_against_hf(outs, hf, prompts, 20)
    assert info["counters"]["forward_mixed"] > 5, info["counters"]


def test_mixed_chunk_off_by_default(default_engine):
    assert default_engine.get_server_info()["enable_mixed_chunk"] is False
    assert default_engine.get_server_info()["counters"]["forward_mixed"] == 0


def test_many_running_requests_do_not_starve_admission(tiny_models):
    """With more running requests than a (small) chunk holds, mixing still admits waiting
    prompts at a steady pace: no more decode steps than without mixing, same tokens."""
    from portaserve import Engine

    path = tiny_models("llama3")
    prompts = random_prompts(8, 512, 3, 3, seed=9)
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    res = {}
    for mix in (False, True):
        with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=2000, page_size=4,
                    chunked_prefill_size=8, max_prefill_tokens=8, enable_mixed_chunk=mix) as eng:
            outs = eng.generate(input_ids=prompts, sampling_params=sp)
            res[mix] = ([o["output_ids"] for o in outs], eng.get_server_info()["counters"])
    assert res[True][0] == res[False][0]
    assert res[True][1]["forward_mixed"] > 0
    assert res[True][1]["forward_decode"] <= res[False][1]["forward_decode"], (res[True][1], res[False][1])
