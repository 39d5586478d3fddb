"""Mixture-of-experts models against transformers on the same random weights."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import hf_greedy, make_tiny_moe_checkpoint, random_prompts


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_models_match_transformers(tmp_path, kind):
    from portaserve import Engine

    path = make_tiny_moe_checkpoint(tmp_path, kind)
    hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    prompts = random_prompts(5, 512, 4, 120, seed=len(kind))
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=3000) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 16, "temperature": 0,
                                                                "ignore_eos": True},
                            return_logprob=True)
    for ids, out in zip(prompts, outs):
        ref, lps = hf_greedy(hf, ids, 16)
        assert out["output_ids"] == ref
        for step, (lp, tok, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
            assert abs(lp - float(lps[step][tok])) < 2e-3
