"""Quantization formats: packing of 4-bit weights (AWQ, GPTQ), dequantization, and the
activation / weight quantizers the W8A8 GEMMs use.  Pure torch, shared by the native ops
(the oracles), the model's quantized linear methods and the providers.

INT4 layouts (4-bit values packed eight to an int32, lowest nibble first):

  AWQ (AutoAWQ "gemm" version)   qweight [K, N/8]  packed along the output dim, the eight
                                                   columns of a word in the interleaved
                                                   order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i
                                                   holds column 8c + AWQ_ORDER[i])
                                 qzeros  [K/g, N/8] packed the same way
                                 scales  [K/g, N]   w = (q - z) * s
  GPTQ (AutoGPTQ / GPTQModel)    qweight [K/8, N]  packed along the input dim, sequential
                                                   (nibble i of word r holds row 8r + i)
                                 qzeros  [K/g, N/8] packed along the output dim, sequential
                                 scales  [K/g, N]
                                 g_idx   [K]        group of each input row (act-order)
                                 v1 checkpoints ("gptq") store z - 1: w = (q - (z + 1)) * s;
                                 "gptq_v2" checkpoints store z itself.

K is the input (reduction) dimension and N the output dimension: these layouts hold W^T,
so y = x @ dequant(...).
"""
from __future__ import annotations

from typing import Optional

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i holds column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]
INT4_LAYOUTS = ("awq", "gptq", "gptq_v2")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
INT8_MAX = 127.0
_EPS = 1e-12


# ---- 4-bit packing --------------------------------------------------------------------------
def _nibble_shifts(order, device) -> torch.Tensor:
    return torch.tensor([4 * i for i in order], dtype=torch.int32, device=device)


def unpack_cols(packed: torch.Tensor, awq_order: bool) -> torch.Tensor:
    """[R, C/8] int32 -> [R, C] int32 values in 0..15 (packed along the last dim)."""
    order = AWQ_REVERSE_ORDER if awq_order else range(8)
    shifts = _nibble_shifts(order, packed.device)
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def pack_cols(values: torch.Tensor, awq_order: bool) -> torch.Tensor:
    """[R, C] ints in 0..15 -> [R, C/8] int32 (inverse of unpack_cols)."""
    R, C = values.shape
    if C % 8:
        raise ValueError(f"cannot pack {C} columns eight to a word")
    v = values.to(torch.int32).reshape(R, C // 8, 8)
    out = torch.zeros(R, C // 8, dtype=torch.int32, device=values.device)
    order = AWQ_ORDER if awq_order else range(8)
    for i, col in enumerate(order):
        out |= (v[:, :, col] & 0xF) << (4 * i)
    return out


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight [K/8, N] int32 -> [K, N] int32 values in 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    v = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [K/8, 8, N]
    return v.reshape(packed.shape[0] * 8, packed.shape[1])


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[K, N] ints in 0..15 -> GPTQ qweight [K/8, N] int32."""
    K, N = values.shape
    if K % 8:
        raise ValueError(f"cannot pack {K} rows eight to a word")
    v = values.to(torch.int32).reshape(K // 8, 8, N)
    out = torch.zeros(K // 8, N, dtype=torch.int32, device=values.device)
    for i in range(8):
        out |= (v[:, i] & 0xF) << (4 * i)
    return out


def int4_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, layout: str):
    """(q [K, N], z [G, N]) as int32 with the layout's zero-point convention applied."""
    if layout == "awq":
        return unpack_cols(qweight, True), unpack_cols(qzeros, True)
    if layout in ("gptq", "gptq_v2"):
        z = unpack_cols(qzeros, False)
        return unpack_rows(qweight), (z + 1 if layout == "gptq" else z)
    raise ValueError(f"unknown int4 layout {layout!r}; known: {', '.join(INT4_LAYOUTS)}")


def int4_in_features(qweight: torch.Tensor, layout: str) -> int:
    return qweight.shape[0] if layout == "awq" else qweight.shape[0] * 8


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                    g_idx: Optional[torch.Tensor], layout: str) -> torch.Tensor:
    """W^T [K, N] in float32: (q - z[g(k)]) * s[g(k)], g(k) = g_idx[k] or k // group."""
    q, z = int4_unpack(qweight, qzeros, layout)
    K = q.shape[0]
    if g_idx is None:
        group = K // scales.shape[0]
        g_idx = torch.arange(K, device=q.device) // group
    g_idx = g_idx.long()
    return (q - z[g_idx]).float() * scales[g_idx].float()


# ---- W8A8 quantizers ------------------------------------------------------------------------------
def quantize_fp8(x: torch.Tensor, scale: Optional[torch.Tensor] = None):
    """x [M, K] -> (x_fp8, scale [M, 1] float32).  scale None: dynamic per-token (row
    amax / 448); else the static per-tensor scale (one element)."""
    xf = x.float()
    if scale is None:
        s = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_EPS)
    else:
        s = scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s


def quantize_int8(x: torch.Tensor, scale: Optional[torch.Tensor] = None):
    """x [M, K] -> (x_int8, scale [M, 1] float32), symmetric, round to nearest even."""
    xf = x.float()
    if scale is None:
        s = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=_EPS)
    else:
        s = scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = torch.round(xf / s).clamp(-128, 127).to(torch.int8)
    return q, s


def quantize_weight_fp8_per_channel(w: torch.Tensor):
    """w [N, K] -> (w_fp8 [N, K], scale [N] float32), one scale per output row."""
    s = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=_EPS)
    return (w.float() / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def quantize_weight_int8_per_channel(w: torch.Tensor):
    s = (w.float().abs().amax(dim=1) / INT8_MAX).clamp(min=_EPS)
    return torch.round(w.float() / s[:, None]).clamp(-127, 127).to(torch.int8), s


def weight_scale_vector(w_scale: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor ([] / [1]) or per-channel ([N] / [N, 1]) weight scale as [N] float32."""
    s = w_scale.float().reshape(-1)
    if s.numel() == 1:
        return s.expand(n)
    if s.numel() != n:
        raise ValueError(f"weight scale of {s.numel()} elements for {n} output channels")
    return s
