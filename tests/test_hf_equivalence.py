"""Greedy tokens and logprobs of the Engine against Hugging Face transformers on the
same weights: the default GGUF model and small random-weight models of each family."""
from __future__ import annotations

import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import PROMPTS, hf_greedy, random_prompts

LOGPROB_ATOL = 2e-3  # float32 on both sides; differences come from summation order
# Two tokens this close in transformers' own logprobs are a tie: summation order decides
# which one argmax picks, and after it the two sequences rightly part.
TIE_TOL = 1e-4


def _check_against_hf(outs, hf_model, prompts_ids, n):
    for ids, out in zip(prompts_ids, outs):
        ref_toks, ref_lps = hf_greedy(hf_model, ids, n)
        got = out["output_ids"]
        assert len(got) == n
        same = next((k for k in range(n) if got[k] != ref_toks[k]), n)
        if same < n:  # only a near-tie may make them part, and only the tokens before it are compared
            gap = float(ref_lps[same][ref_toks[same]] - ref_lps[same][got[same]])
            assert gap < TIE_TOL, f"prompt {ids[:8]}...: {got} != {ref_toks} (gap {gap:.2e} at {same})"
        for step, (lp, tok, _) in enumerate(out["meta_info"]["output_token_logprobs"][:same + 1]):
            assert tok == got[step]
            assert abs(lp - float(ref_lps[step][tok])) < LOGPROB_ATOL
        # the full top-5 at the first step (the prompt's last-token logits)
        top = out["meta_info"]["output_top_logprobs"][0]
        ref_v, ref_i = ref_lps[0].topk(5)
        assert torch.allclose(torch.tensor([v for v, _, _ in top]), ref_v, atol=LOGPROB_ATOL)
        if (ref_v[:-1] - ref_v[1:]).min() > TIE_TOL:
            assert [t for _, t, _ in top] == ref_i.tolist()


def test_default_model_matches_transformers(default_engine, hf_default):
    hf_model, tok = hf_default
    ids = [tok.encode(p) for p in PROMPTS]
    # the engine's own tokenizer must agree with transformers' GGUF tokenizer
    assert [default_engine.tokenizer.encode(p) for p in PROMPTS] == ids
    outs = default_engine.generate(PROMPTS, {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True},
                                   return_logprob=True, top_logprobs_num=5)
    assert len(outs) == len(PROMPTS)
    _check_against_hf(outs, hf_model, ids, 32)
    for out in outs:
        assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["llama3", "qwen3", "qwen2", "mistral"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_random_models_match_transformers(tiny_models, kind, page_size):
    from portaserve import Engine

    path = tiny_models(kind)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    prompts = random_prompts(6, 512, 5, 300, seed=zlib.crc32(kind.encode()) % 1000)
    # a shared prefix so the radix cache is exercised within the batch as well
    prompts += [prompts[0][:100] + p for p in random_prompts(2, 512, 3, 20, seed=7)]
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=6000, page_size=page_size,
                chunked_prefill_size=128) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 24, "temperature": 0,
                                                                "ignore_eos": True},
                            return_logprob=True, top_logprobs_num=5)
        _check_against_hf(outs, hf_model, prompts, 24)
        # a second round hits the cache and must give the same tokens
        again = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 24, "temperature": 0,
                                                                 "ignore_eos": True})
        assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)


def test_sharded_checkpoint_really_sharded(tiny_models):
    path = tiny_models("llama3")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1


def test_repetition_penalty_matches_transformers(tiny_models):
    from portaserve import Engine

    path = tiny_models("llama3")
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    prompts = random_prompts(3, 512, 10, 40, seed=3)
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=2000) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={
            "max_new_tokens": 16, "temperature": 0, "ignore_eos": True, "repetition_penalty": 1.3})
    for ids, out in zip(prompts, outs):
        ref, _ = hf_greedy(hf_model, ids, 16, repetition_penalty=1.3)
        assert out["output_ids"] == ref
