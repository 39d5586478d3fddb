"""logit_bias (OpenAI's field, SGLang's sampling parameter) against transformers: greedy
decoding over the biased logits, and sampling that can only pick the favoured tokens."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from portaserve import Engine
from tests.conftest import random_prompts

N = 12


def _hf_greedy_biased(model, ids, n, bias: dict):
    add = torch.zeros(model.config.vocab_size)
    for t, v in bias.items():
        add[int(t)] += v
    seq, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].float()
        t = int((logits + add).argmax())
        out.append(t)
        seq.append(t)
    return out


def test_biased_greedy_matches_transformers(tiny_models):
    path = tiny_models("llama3")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = random_prompts(3, 512, 8, 30, seed=11)
    g = torch.Generator().manual_seed(5)
    # moderate biases on 60 tokens (logit scale) and a ban on each prompt's plain greedy choices
    bias = {str(int(t)): float(v) for t, v in zip(torch.randint(3, 512, (60,), generator=g),
                                                 torch.empty(60).uniform_(-6, 6, generator=g))}
    plain = [_hf_greedy_biased(hf, p, N, {}) for p in prompts]
    for p in plain:
        bias.update({str(t): -100.0 for t in p[:2]})
    refs = [_hf_greedy_biased(hf, p, N, bias) for p in prompts]
    assert refs != plain  # the bias changes these outputs
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=2000) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={
            "max_new_tokens": N, "temperature": 0, "ignore_eos": True, "logit_bias": bias})
        # +100 on three tokens: sampling at temperature 1 can only draw those
        favoured = {"7": 100, "8": 100, "9": 100}
        drawn = eng.generate(input_ids=prompts, sampling_params={
            "max_new_tokens": N, "temperature": 1.0, "ignore_eos": True, "logit_bias": favoured,
            "sampling_seed": 3})
        # a request without a bias in the same batch is unaffected
        mixed = eng.generate(input_ids=prompts[:2], sampling_params=[
            {"max_new_tokens": N, "temperature": 0, "ignore_eos": True, "logit_bias": bias},
            {"max_new_tokens": N, "temperature": 0, "ignore_eos": True}])
    assert [o["output_ids"] for o in outs] == refs
    assert all(set(o["output_ids"]) <= {7, 8, 9} for o in drawn)
    assert [o["output_ids"] for o in mixed] == [refs[0], plain[1]]
