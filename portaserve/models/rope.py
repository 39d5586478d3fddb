"""Rotary embedding frequencies, including the rope scaling schemes of the llama family."""
from __future__ import annotations

import math

import torch


def rope_params(cfg: dict) -> dict:
    """Normalise old (rope_theta + rope_scaling) and new (rope_parameters) config styles."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rt = merged.get("rope_type") or merged.get("type") or "default"
    merged["rope_type"] = rt
    return merged


def inv_frequencies(rot_dim: int, params: dict) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    rt = params["rope_type"]
    if rt == "default":
        return inv
    if rt == "linear":
        return inv / float(params["factor"])
    if rt == "llama3":
        factor = float(params["factor"])
        low = float(params.get("low_freq_factor", 1.0))
        high = float(params.get("high_freq_factor", 4.0))
        old_ctx = float(params["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, out)
    raise NotImplementedError(
        f"rope_type {rt!r} is not supported yet (supported: default, linear, llama3)")


def cos_sin_cache(rot_dim: int, max_pos: int, params: dict, dtype=torch.float32) -> torch.Tensor:
    """[max_pos, rot_dim]: cos of the rot_dim/2 frequencies, then their sin."""
    inv = inv_frequencies(rot_dim, params)
    t = torch.arange(max_pos, dtype=torch.int64).float()
    freqs = torch.outer(t, inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
