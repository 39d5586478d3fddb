"""The llama-family graph: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2, and
their mixture-of-experts variants Mixtral, Qwen2-MoE and Qwen3-MoE.

Differences between the family members are config switches: attention bias (Qwen2),
per-head q/k RMSNorm (Qwen3), explicit head_dim, tied embeddings, rope scaling.
Weights arrive under Hugging Face names; q/k/v and gate/up are fused at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from portaserve.core import ops
from portaserve.core.forward_batch import ForwardBatch
from portaserve.models.config import ModelConfig
from portaserve.models.layers import PagedAttention, RMSNorm
from portaserve.models.moe import SparseMoE, map_expert_weight
from portaserve.models.rope import cos_sin_cache


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.attn = PagedAttention(layer_id, self.nh, self.nkv, self.hd, self.hd ** -0.5)

    def forward(self, x, positions, cos_sin, fb: ForwardBatch):
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        T = x.shape[0]
        q = q.reshape(T, self.nh, self.hd)
        k = k.reshape(T, self.nkv, self.hd)
        v = v.reshape(T, self.nkv, self.hd)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = ops.rotary_embedding(positions, q, k, cos_sin, True)
        o = self.attn(q, k, v, fb)
        return self.o_proj(o.reshape(T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, cos_sin, fb):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, cos_sin, fb)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # HF parameter suffix -> (fused parameter, shard index)
    _fused = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cos_sin = None  # set by init_buffers() once the model has a device

    def init_buffers(self, device) -> None:
        """(Re)compute tensors that are derived from the config, not loaded."""
        c = self.cfg
        self.cos_sin = cos_sin_cache(c.rotary_dim, c.max_position_embeddings, c.rope).to(device)

    # ---- forward ----------------------------------------------------------------------
    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed_tokens(fb.input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, fb.positions, self.cos_sin, fb)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    # ---- weights ----------------------------------------------------------------------
    def _shard_rows(self, fused: str, idx: int, param) -> tuple[int, int]:
        c = self.cfg
        if fused == "qkv_proj":
            sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        else:  # gate_up_proj: two equal halves (dense MLP or a shared expert)
            sizes = [param.shape[0] // 2] * 2
        return sum(sizes[:idx]), sizes[idx]

    def load_weights(self, weights) -> None:
        """weights: iterable of (Hugging Face name, tensor).  Every parameter element must
        be written exactly once."""
        params = dict(self.named_parameters())
        filled = {n: 0 for n in params}
        for name, w in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            name = name.replace("block_sparse_moe.gate.", "mlp.gate.")
            expert = map_expert_weight(name, self.cfg.moe_intermediate_size)
            if expert is not None:
                target, e, rows = expert
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                dst = params[target][e][rows]
            else:
                parts = name.split(".")
                target, dst = name, None
                for i, p in enumerate(parts):
                    if p in self._fused:
                        fused, idx = self._fused[p]
                        target = ".".join(parts[:i] + [fused] + parts[i + 1:])
                        if target in params:
                            start, size = self._shard_rows(fused, idx, params[target])
                            dst = params[target].narrow(0, start, size)
                        break
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                if dst is None:
                    dst = params[target]
            if dst.shape != w.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(w.shape)} != model {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(w)
            filled[target] += w.numel()
        missing = sorted(n for n, p in params.items() if filled[n] != p.numel())
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors (or parts), e.g. {missing[:3]}")
