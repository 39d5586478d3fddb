"""Sparse mixture-of-experts MLP blocks (Mixtral, Qwen2-MoE, Qwen3-MoE).

Experts are stored stacked: w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I],
so one fused_moe op computes every expert a batch routes to.  Qwen2-MoE adds a shared
expert, gated by a sigmoid.
"""
from __future__ import annotations

import torch
from torch import nn

from portaserve.core import ops


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, H))
        self.w2 = nn.Parameter(torch.empty(E, H, I))
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(H, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x):
        weights, ids = ops.moe_topk(self.gate(x), self.top_k, self.renormalize)
        out = ops.fused_moe(x, self.w13, self.w2, weights.to(x.dtype), ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def map_expert_weight(name: str, moe_intermediate_size: int):
    """Checkpoint name of one expert's matrix -> (param name, expert, row slice) or None.

    Mixtral: ...block_sparse_moe.experts.E.w1|w3|w2.weight (w1 gate, w3 up, w2 down);
    Qwen-MoE: ...mlp.experts.E.gate_proj|up_proj|down_proj.weight."""
    parts = name.split(".")
    if "experts" not in parts:
        return None
    i = parts.index("experts")
    if i + 2 >= len(parts) or not parts[i + 1].isdigit():
        return None
    e, kind = int(parts[i + 1]), parts[i + 2]
    base = ".".join(parts[:i]).replace("block_sparse_moe", "mlp")
    I = moe_intermediate_size
    if kind in ("w1", "gate_proj"):
        return f"{base}.w13", e, slice(0, I)
    if kind in ("w3", "up_proj"):
        return f"{base}.w13", e, slice(I, 2 * I)
    if kind in ("w2", "down_proj"):
        return f"{base}.w2", e, slice(None)
    return None
