"""Shared fixtures: the default model through the Engine and through transformers, and
small random-weight checkpoints of each supported architecture family."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Keep the two CI cores for the math, not for thread oversubscription.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Translate to French: I like apples.",
    "The quick brown fox",
    "1, 2, 3, 4, 5,",
    "Q: What is the boiling point of water in Celsius?\nA:",
]


@pytest.fixture(scope="session")
def default_gguf():
    from portaserve.models.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_engine():
    from portaserve import Engine

    with Engine(max_total_tokens=16384) as e:
        yield e


@pytest.fixture(scope="session")
def hf_default(default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                 torch_dtype=torch.float32).eval()
    return model, tok


@torch.inference_mode()
def hf_greedy(model, ids, n, repetition_penalty=1.0):
    """Greedy decoding with transformers' own KV cache; returns (tokens, logprobs per step)."""
    dev = next(model.parameters()).device
    out = model(torch.tensor([ids], device=dev), use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1].float()
    toks, lps = [], []
    seen = list(ids)
    for _ in range(n):
        lp = torch.log_softmax(logits, -1)
        scores = logits.clone()
        if repetition_penalty != 1.0:
            idx = torch.tensor(sorted(set(seen)), device=dev)
            s = scores[idx]
            scores[idx] = torch.where(s > 0, s / repetition_penalty, s * repetition_penalty)
        t = int(scores.argmax())
        toks.append(t)
        lps.append(lp.cpu())
        seen.append(t)
        out = model(torch.tensor([[t]], device=dev), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    return toks, lps


def greedy_prefix_agreement(hf, prompts, outs, n: int, k: int) -> int:
    """How many prompts' first k of n greedy tokens equal transformers' (bf16 kernels round
    differently from transformers' own, so later tokens may part)."""
    agree = 0
    for ids, out in zip(prompts, outs):
        ref, _ = hf_greedy(hf, ids, n)
        agree += out["output_ids"][:k] == ref[:k]
    return agree


def make_tiny_checkpoint(tmp: Path, kind: str) -> Path:
    """A small random-weight model of the given family, saved as sharded safetensors."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.15, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if kind == "llama3":
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = LlamaForCausalLM
    elif kind == "qwen3":
        cfg = Qwen3Config(**{**common, "num_key_value_heads": 1}, head_dim=32, tie_word_embeddings=True,
                          rope_theta=1000000.0)
        cls = Qwen3ForCausalLM
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False, rope_theta=10000.0)
        cls = Qwen2ForCausalLM
    elif kind == "mistral":
        cfg = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
        cls = MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(1234)
    model = cls(cfg).eval()
    if kind == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    out = tmp / kind
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="200KB")
    return out


def _checkpoint_cache(root, make):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = make(root, kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return _checkpoint_cache(tmp_path_factory.mktemp("tiny"), make_tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory):
    return _checkpoint_cache(tmp_path_factory.mktemp("tiny-moe"), make_tiny_moe_checkpoint)


def random_prompts(n, vocab, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(torch.randint(3, vocab, (L,), generator=g).tolist())
    return out


def make_tiny_moe_checkpoint(tmp: Path, kind: str) -> Path:
    """A small random-weight MoE model (per-expert tensors, as real checkpoints store them)."""
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.15, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if kind == "mixtral":
        cfg, cls = MixtralConfig(**common, num_local_experts=6, num_experts_per_tok=2), MixtralForCausalLM
    elif kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
                             norm_topk_prob=True, head_dim=32, mlp_only_layers=[1])
        cls = Qwen3MoeForCausalLM
    elif kind == "qwen2_moe":
        cfg = Qwen2MoeConfig(**common, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                             shared_expert_intermediate_size=72, norm_topk_prob=False)
        cls = Qwen2MoeForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(99)
    model = cls(cfg).eval()
    out = tmp / kind
    model.save_pretrained(str(out), safe_serialization=True)
    return out
