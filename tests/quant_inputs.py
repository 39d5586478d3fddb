"""Random inputs for the quantized GEMM ops (used by tests/test_ops.py's provider-vs-native
sweep and by tests/test_quantization.py).  Each factory takes (generator, device, dtype)
and returns the op's positional arguments; outputs are O(1) so one absolute tolerance
fits every shape."""
from __future__ import annotations

import torch

from portaserve.core.ops import quant


def _ri(g, lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def make_fp8_scaled_mm(g, device, dtype, per_channel=None, static=None):
    M, K, N = _ri(g, 1, 9), 16 * _ri(g, 1, 6), 16 * _ri(g, 1, 4)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    per_channel = bool(_ri(g, 0, 1)) if per_channel is None else per_channel
    static = bool(_ri(g, 0, 1)) if static is None else static
    if per_channel:
        wq, ws = quant.quantize_weight_fp8_per_channel(w)
    else:
        ws = (w.abs().max() / quant.FP8_MAX).reshape(1)
        wq = (w / ws).to(quant.FP8_DTYPE)
    xs = (x.float().abs().max() / quant.FP8_MAX * 1.1).reshape(1) if static else None
    return (x.to(device), wq.to(device), ws.to(device), None if xs is None else xs.to(device), dtype)


def make_int8_scaled_mm(g, device, dtype, per_channel=None, static=None):
    M, K, N = _ri(g, 1, 40), 16 * _ri(g, 1, 6), 16 * _ri(g, 1, 4)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    per_channel = bool(_ri(g, 0, 1)) if per_channel is None else per_channel
    static = bool(_ri(g, 0, 1)) if static is None else static
    if per_channel:
        wq, ws = quant.quantize_weight_int8_per_channel(w)
    else:
        ws = (w.abs().max() / 127).reshape(1)
        wq = torch.round(w / ws).clamp(-127, 127).to(torch.int8)
    xs = (x.float().abs().max() / 127).reshape(1) if static else None
    return (x.to(device), wq.to(device), ws.to(device), None if xs is None else xs.to(device), dtype)


def random_int4(g, K, N, group, layout, act_order=False):
    """(qweight, scales, qzeros, g_idx, q [K, N], z [K/group, N] as used by the dequantizer)."""
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (K // group, N), generator=g, dtype=torch.int32)
    s = (torch.rand(K // group, N, generator=g) * 0.5 + 0.25) / (8 * K ** 0.5)
    if layout == "awq":
        qw, qz = quant.pack_cols(q, True), quant.pack_cols(z, True)
    else:
        stored = z - 1 if layout == "gptq" else z
        if layout == "gptq":
            z = z.clamp(min=1)  # v1 cannot store a zero point of 0 (it would be -1)
            stored = z - 1
        qw, qz = quant.pack_rows(q), quant.pack_cols(stored, False)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(K, generator=g) // group).to(torch.int32)
    return qw, s, qz, g_idx, q, z


def make_int4_gemm(g, device, dtype, layout=None):
    layout = layout or ["awq", "gptq", "gptq_v2"][_ri(g, 0, 2)]
    group = [16, 32, 64][_ri(g, 0, 2)]
    K, N = group * _ri(g, 1, 4), 8 * _ri(g, 1, 8)
    M = _ri(g, 1, 12)
    act_order = layout != "awq" and bool(_ri(g, 0, 1))
    qw, s, qz, g_idx, _, _ = random_int4(g, K, N, group, layout, act_order)
    x = torch.randn(M, K, generator=g).to(dtype)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (x.to(device), dev(qw), dev(s.to(dtype)), dev(qz), dev(g_idx), layout)


GEMM_TOL = {torch.float32: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
