"""Sparse mixture-of-experts MLP blocks (Mixtral, Qwen2-MoE, Qwen3-MoE).

Experts are stored stacked: w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I],
so one fused_moe op computes every expert a batch routes to.  Qwen2-MoE adds a shared
expert, gated by a sigmoid.
"""
from __future__ import annotations

import torch
from torch import nn

from portaserve.core import ops
from portaserve.core.parallel import divide, tp_rank, tp_size
from portaserve.models.linear import (ColumnParallelLinear, LazyWeight, ReplicatedLinear,
                                      RowParallelLinear, _copy)


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int, quant_config=None, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], False, quant_config,
                                                 f"{prefix}.gate_up_proj")
        # no reduction here: the MoE block reduces routed + shared partial sums once
        self.down_proj = RowParallelLinear(inter, hidden, False, quant_config, f"{prefix}.down_proj",
                                           reduce_results=False)

    def forward(self, x):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    """Under tensor parallelism every rank holds every expert with its intermediate
    dimension split (w13 rows gate_r|up_r, w2 columns r); the routed and shared partial
    outputs are summed over the ranks with one all-reduce."""

    def __init__(self, cfg, quant_config=None, prefix: str = ""):
        super().__init__()
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.inter_local = divide(I, tp_size(), "moe_intermediate_size")
        self.gate = ReplicatedLinear(H, E, prefix=f"{prefix}.gate")
        self.w13 = nn.Parameter(torch.empty(E, 2 * self.inter_local, H), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, self.inter_local), requires_grad=False)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(H, cfg.shared_expert_intermediate_size, quant_config,
                                              f"{prefix}.shared_expert")
            self.shared_expert_gate = ReplicatedLinear(H, 1, prefix=f"{prefix}.shared_expert_gate")

    def forward(self, x):
        weights, ids = ops.moe_topk(self.gate(x), self.top_k, self.renormalize)
        out = ops.fused_moe(x, self.w13, self.w2, weights.to(x.dtype), ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return ops.all_reduce(out)

    def load_expert(self, expert: int, kind: str, w) -> int:
        """kind: gate | up | down; w: the expert's full [I, H] or [H, I] matrix."""
        w = LazyWeight.of(w)
        Il, r = self.inter_local, tp_rank()
        if kind == "down":
            return _copy(self.w2.data[expert], w.narrow(1, r * Il, Il), f"expert {expert} down")
        dst = self.w13.data[expert].narrow(0, 0 if kind == "gate" else Il, Il)
        return _copy(dst, w.narrow(0, r * Il, Il), f"expert {expert} {kind}")


_EXPERT_KINDS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up",
                 "w2": "down", "down_proj": "down"}


def parse_expert_name(name: str):
    """Checkpoint name of one expert's matrix -> (MoE module path, expert, kind) or None.

    Mixtral: ...block_sparse_moe.experts.E.w1|w3|w2.weight (w1 gate, w3 up, w2 down);
    Qwen-MoE: ...mlp.experts.E.gate_proj|up_proj|down_proj.weight."""
    parts = name.split(".")
    if "experts" not in parts:
        return None
    i = parts.index("experts")
    if i + 2 >= len(parts) or not parts[i + 1].isdigit() or parts[i + 2] not in _EXPERT_KINDS:
        return None
    base = ".".join(parts[:i]).replace("block_sparse_moe", "mlp")
    return base, int(parts[i + 1]), _EXPERT_KINDS[parts[i + 2]]
