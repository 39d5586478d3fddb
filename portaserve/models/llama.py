"""The llama-family graph: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2, and
their mixture-of-experts variants Mixtral, Qwen2-MoE and Qwen3-MoE.

Differences between the family members are config switches: attention bias (Qwen2),
per-head q/k RMSNorm (Qwen3), explicit head_dim, tied embeddings, rope scaling.
Weights arrive under Hugging Face names; q/k/v and gate/up are fused at load time.
"""
from __future__ import annotations

import torch
from torch import nn

from portaserve.core import ops
from portaserve.core.forward_batch import ForwardBatch
from portaserve.core.parallel import divide, tp_rank, tp_size
from portaserve.models.config import ModelConfig
from portaserve.models.layers import PagedAttention, RMSNorm
from portaserve.models.linear import (ColumnParallelLinear, LazyWeight, ParallelLMHead,
                                      RowParallelLinear, VocabParallelEmbedding, _copy,
                                      vocab_parallel_logits)
from portaserve.models.moe import SparseMoE, parse_expert_name
from portaserve.models.rope import cos_sin_cache


def attention_shards(num_heads: int, num_kv_heads: int, head_dim: int):
    """Per-rank head counts and where this rank's q/k/v rows start.  KV heads are split
    when there are at least as many as ranks, else each is replicated on the ranks whose
    query heads use it."""
    n, r = tp_size(), tp_rank()
    nh = divide(num_heads, n, "num_attention_heads")
    if num_kv_heads >= n:
        nkv = divide(num_kv_heads, n, "num_key_value_heads")
        kv_head = r * nkv
    else:
        if n % num_kv_heads:
            raise ValueError(f"tensor-parallel size {n} is neither a divisor nor a multiple of "
                             f"num_key_value_heads {num_kv_heads}")
        nkv, kv_head = 1, r * num_kv_heads // n
    starts = [r * nh * head_dim, kv_head * head_dim, kv_head * head_dim]
    return nh, nkv, starts


def check_tp(c: ModelConfig, n: int) -> None:
    """Raise ValueError naming the first dimension a split over n ranks cannot divide."""
    dims = [("num_attention_heads", c.num_heads), ("intermediate_size", c.intermediate_size)]
    if c.num_experts:
        dims += [("moe_intermediate_size", c.moe_intermediate_size),
                 ("shared_expert_intermediate_size", c.shared_expert_intermediate_size)]
    if c.num_kv_heads >= n:
        dims.append(("num_key_value_heads", c.num_kv_heads))
    for name, v in dims:
        if v % n:
            raise ValueError(f"{name} ({v}) is not divisible by the tensor-parallel size {n}")
    if c.num_kv_heads < n and n % c.num_kv_heads:
        raise ValueError(f"tensor-parallel size {n} is neither a divisor nor a multiple of "
                         f"num_key_value_heads {c.num_kv_heads}")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, prefix: str):
        super().__init__()
        self.hd = cfg.head_dim
        self.nh, self.nkv, starts = attention_shards(cfg.num_heads, cfg.num_kv_heads, self.hd)
        q = cfg.quant_config
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [cfg.num_heads * self.hd, cfg.num_kv_heads * self.hd,
                              cfg.num_kv_heads * self.hd],
            cfg.attention_bias, q, f"{prefix}.qkv_proj",
            local_sizes=[self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], starts=starts)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.hd, cfg.hidden_size, cfg.o_bias, q,
                                        f"{prefix}.o_proj")
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
        o = self.attn(q, k, v, fb, rope=(positions, cos_sin, True))
        return self.o_proj(o.reshape(T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str):
        super().__init__()
        I, q = cfg.intermediate_size, cfg.quant_config
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [I, I], cfg.mlp_bias, q,
                                                 f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(I, cfg.hidden_size, cfg.mlp_bias, q, f"{prefix}.down_proj")

    def forward(self, x):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        prefix = f"layers.{layer_id}"
        self.self_attn = Attention(cfg, layer_id, f"{prefix}.self_attn")
        self.mlp = (SparseMoE(cfg, cfg.quant_config, f"{prefix}.mlp") if cfg.is_moe_layer(layer_id)
                    else MLP(cfg, f"{prefix}.mlp"))
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
    # Hugging Face module name -> (fused module, shard index)
    _fused = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
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
        """Full-vocabulary logits on every rank (float32)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head  # tied: same split
        return vocab_parallel_logits(hidden, head).float()

    # ---- weights ----------------------------------------------------------------------
    @staticmethod
    def checkpoint_shapes(c: ModelConfig) -> list:
        """(Hugging Face name, shape) of every tensor a checkpoint of this config holds
        (random-weight loading generates these, so a model split over N ranks gets the
        same weights as on one)."""
        H, hd = c.hidden_size, c.head_dim
        out = [("model.embed_tokens.weight", (c.vocab_size, H)), ("model.norm.weight", (H,))]
        if not c.tie_word_embeddings:
            out.append(("lm_head.weight", (c.vocab_size, H)))
        for i in range(c.num_layers):
            p = f"model.layers.{i}"
            a = f"{p}.self_attn"
            out += [(f"{p}.input_layernorm.weight", (H,)), (f"{p}.post_attention_layernorm.weight", (H,)),
                    (f"{a}.q_proj.weight", (c.num_heads * hd, H)), (f"{a}.k_proj.weight", (c.num_kv_heads * hd, H)),
                    (f"{a}.v_proj.weight", (c.num_kv_heads * hd, H)), (f"{a}.o_proj.weight", (H, c.num_heads * hd))]
            if c.attention_bias:
                out += [(f"{a}.q_proj.bias", (c.num_heads * hd,)), (f"{a}.k_proj.bias", (c.num_kv_heads * hd,)),
                        (f"{a}.v_proj.bias", (c.num_kv_heads * hd,))]
            if c.o_bias:
                out.append((f"{a}.o_proj.bias", (H,)))
            if c.qk_norm:
                out += [(f"{a}.q_norm.weight", (hd,)), (f"{a}.k_norm.weight", (hd,))]
            m = f"{p}.mlp"
            if c.is_moe_layer(i):
                I = c.moe_intermediate_size
                out.append((f"{m}.gate.weight", (c.num_experts, H)))
                for e in range(c.num_experts):
                    out += [(f"{m}.experts.{e}.gate_proj.weight", (I, H)), (f"{m}.experts.{e}.up_proj.weight", (I, H)),
                            (f"{m}.experts.{e}.down_proj.weight", (H, I))]
                if c.shared_expert_intermediate_size:
                    S = c.shared_expert_intermediate_size
                    out += [(f"{m}.shared_expert.gate_proj.weight", (S, H)), (f"{m}.shared_expert.up_proj.weight", (S, H)),
                            (f"{m}.shared_expert.down_proj.weight", (H, S)), (f"{m}.shared_expert_gate.weight", (1, H))]
            else:
                I = c.intermediate_size
                out += [(f"{m}.gate_proj.weight", (I, H)), (f"{m}.up_proj.weight", (I, H)), (f"{m}.down_proj.weight", (H, I))]
                if c.mlp_bias:
                    out += [(f"{m}.gate_proj.bias", (I,)), (f"{m}.up_proj.bias", (I,)), (f"{m}.down_proj.bias", (H,))]
        return out

    def _route(self, name: str):
        """Checkpoint name -> (module path, parameter name, shard index or None)."""
        parts = name.split(".")
        for i, p in enumerate(parts[:-1]):
            if p in self._fused:
                fused, idx = self._fused[p]
                return ".".join(parts[:i] + [fused] + parts[i + 1:-1]), parts[-1], idx
        return ".".join(parts[:-1]), parts[-1], None

    def load_weights(self, weights) -> None:
        """weights: iterable of (Hugging Face name, tensor or LazyWeight).  Every parameter
        element this rank holds must be written exactly once."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        filled = {n: 0 for n in params}
        for name, w in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            name = name.replace("block_sparse_moe.gate.", "mlp.gate.")
            expert = parse_expert_name(name)
            if expert is not None:
                base, e, kind = expert
                mod = modules.get(base)
                if not isinstance(mod, SparseMoE):
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                target = f"{base}.{'w2' if kind == 'down' else 'w13'}"
                filled[target] += mod.load_expert(e, kind, w)
                continue
            mod_name, pname, shard = self._route(name)
            mod = modules.get(mod_name)
            target = f"{mod_name}.{pname}"
            if mod is not None and pname in getattr(getattr(mod, "method", None), "ignored_params", ()):
                continue
            if mod is None or target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if hasattr(mod, "load_weight"):
                filled[target] += mod.load_weight(pname, w, shard)
            else:  # a replicated parameter (norms)
                filled[target] += _copy(params[target].data, LazyWeight.of(w), name)
        missing = sorted(n for n, p in params.items() if filled[n] != p.numel())
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors (or parts), e.g. {missing[:3]}")
        for mod in self.modules():
            if hasattr(mod, "process_weights_after_loading"):
                mod.process_weights_after_loading()
