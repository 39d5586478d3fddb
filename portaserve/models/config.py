"""The model description the engine needs, read from a Hugging Face config dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from portaserve.models.rope import rope_params


@dataclass
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict
    rotary_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)
    bos_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None
    # mixture of experts (0 experts: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    hf: dict = field(default_factory=dict, repr=False)
    # set by the loader: a QuantConfig (models/quantization.py) or None for bf16/fp16/fp32
    quant_config: Optional[object] = field(default=None, repr=False)

    def is_moe_layer(self, layer_id: int) -> bool:
        return (self.num_experts > 0 and layer_id not in self.mlp_only_layers
                and (layer_id + 1) % self.decoder_sparse_step == 0)

    @property
    def context_length(self) -> int:
        ctx = self.max_position_embeddings
        if self.sliding_window:
            # No sliding-window attention kernel yet: serve within one window, where full
            # attention and sliding-window attention are the same computation.
            ctx = min(ctx, self.sliding_window)
        return ctx


def _eos_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def llama_family_config(arch: str, c: dict) -> ModelConfig:
    num_heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    head_dim = c.get("head_dim") or hidden // num_heads
    mt = c.get("model_type", "llama")
    qwen2 = mt in ("qwen2",) or arch.startswith("Qwen2")
    qwen3 = mt in ("qwen3",) or arch.startswith("Qwen3")
    attn_bias = bool(c.get("attention_bias", False)) or qwen2
    sliding = None
    if mt in ("mistral", "mixtral") or c.get("use_sliding_window"):
        sliding = c.get("sliding_window")
    return ModelConfig(
        architecture=arch,
        model_type=mt,
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        rope=rope_params(c),
        rotary_dim=int(head_dim * float(c.get("partial_rotary_factor", 1.0))),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=attn_bias,
        o_bias=bool(c.get("attention_bias", False)) and not qwen2,
        mlp_bias=bool(c.get("mlp_bias", False)),
        qk_norm=qwen3,
        sliding_window=sliding,
        eos_token_ids=_eos_list(c.get("eos_token_id")),
        bos_token_id=c.get("bos_token_id"),
        torch_dtype=str(c.get("torch_dtype") or c.get("dtype") or "") or None,
        num_experts=int(c.get("num_experts") or c.get("num_local_experts") or 0),
        num_experts_per_tok=int(c.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(c.get("moe_intermediate_size") or c["intermediate_size"]),
        # Mixtral always renormalises the top-k weights; Qwen MoE configs say whether
        norm_topk_prob=bool(c.get("norm_topk_prob", True)) if mt != "mixtral" else True,
        shared_expert_intermediate_size=int(c.get("shared_expert_intermediate_size") or 0),
        decoder_sparse_step=int(c.get("decoder_sparse_step") or 1),
        mlp_only_layers=list(c.get("mlp_only_layers") or []),
        hf=c,
    )
