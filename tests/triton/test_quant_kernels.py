"""The one-launch Triton per-token activation quantizer (FP8 e4m3 / INT8) and the INT8
GEMM's scale epilogue against the torch reference quantizers of core/ops/quant.py, and
the CUDA W8A8 providers that use them against the native ops (under TRITON_INTERPRET=1
on the CPU, where torch's _scaled_mm / _int_mm have CPU kernels too; compiled on a GPU
host with PORTASERVE_TEST_DEVICE=cuda)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from portaserve.core.ops import native
from portaserve.core.ops.quant import quantize_fp8, quantize_int8
from tests.quant_inputs import GEMM_TOL, make_fp8_scaled_mm, make_int8_scaled_mm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

DEVICE = os.environ.get("PORTASERVE_TEST_DEVICE", "cpu")
REF = {"fp8": quantize_fp8, "int8": quantize_int8}


def _quant():
    from portaserve.platforms.triton_kernels import quant

    return quant


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("M,K,block_k", [(1, 64, None), (5, 300, None), (4, 300, 64), (3, 1000, 256)])
def test_per_token_quant_is_the_reference_bit_for_bit(kind, dtype, static, M, K, block_k):
    """Same scales and the same quantized values as quantize_fp8 / quantize_int8 (one pass
    and two passes over the row), padding rows zero; an all-zero row gets the eps scale."""
    g = torch.Generator().manual_seed(M * 31 + K)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    if M > 2:
        x[M // 2, :] = 0
        x[0, 7] = 60.0  # an outlier row
    scale = (x.float().abs().max() / (448.0 if kind == "fp8" else 127.0) * 1.1).reshape(1) if static else None
    rq, rs = REF[kind](x, scale)
    xd = x.to(DEVICE)
    q, s = _quant().per_token_quant(xd, kind, None if scale is None else scale.to(DEVICE),
                                    pad_rows=2, block_k=block_k)
    assert q.shape == (M + 2, K) and s.shape == (M + 2, 1) and s.dtype == torch.float32
    assert q.dtype == rq.dtype
    torch.testing.assert_close(s[:M].cpu(), rs.expand(M, 1), atol=0, rtol=0)
    assert torch.equal(q[:M].cpu().float(), rq.float())
    assert not q[M:].cpu().float().any()


def test_per_token_quant_empty_and_strided_rows():
    x = torch.randn(6, 64)[::2]  # row stride 128
    q, s = _quant().per_token_quant(x.to(DEVICE), "int8")
    rq, rs = quantize_int8(x)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)
    q, s = _quant().per_token_quant(torch.empty(0, 64, device=DEVICE), "fp8")
    assert q.shape == (0, 64) and s.shape == (0, 1)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_epilogue(out_dtype):
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-3000, 3000, (19, 200), generator=g, dtype=torch.int32)
    xs, ws = torch.rand(19, 1, generator=g), torch.rand(200, generator=g)
    y = _quant().int8_dequant_epilogue(acc.to(DEVICE), xs.to(DEVICE), ws.to(DEVICE), 17, out_dtype)
    want = (acc[:17].float() * xs[:17] * ws).to(out_dtype)
    assert y.shape == (17, 200) and y.dtype == out_dtype
    ws1 = torch.tensor([0.5]).expand(200)  # a per-tensor weight scale, stride 0
    y1 = _quant().int8_dequant_epilogue(acc.to(DEVICE), xs.to(DEVICE), ws1.to(DEVICE), 17, torch.float32)
    torch.testing.assert_close(y1.cpu(), acc[:17].float() * xs[:17] * ws1, atol=0, rtol=0)
    # float32 is the reference's product exactly; the CPU interpreter rounds to bf16 its own way
    tol = dict(atol=0, rtol=0) if out_dtype == torch.float32 else dict(atol=0, rtol=2 ** -7)
    torch.testing.assert_close(y.cpu().float(), want.float(), **tol)


# ---- the CUDA W8A8 providers (their torch kernels have CPU versions) ----------------------------
def _provider_runs_here(name) -> bool:
    from portaserve.platforms.cuda import quant_ops

    g = torch.Generator().manual_seed(0)
    make = make_fp8_scaled_mm if name == "fp8_scaled_mm" else make_int8_scaled_mm
    try:
        getattr(quant_ops, name)(*make(g, DEVICE, torch.float32))
    except (RuntimeError, NotImplementedError):  # e.g. a torch without CPU _scaled_mm
        return False
    return True


@pytest.mark.parametrize("op", ["fp8_scaled_mm", "int8_scaled_mm"])
@pytest.mark.parametrize("seed", range(4))
def test_w8a8_providers_match_native(op, seed):
    from portaserve.platforms.cuda import quant_ops

    if not _provider_runs_here(op):
        pytest.skip(f"torch cannot run {op}'s GEMM on {DEVICE}")
    assert quant_ops.quantizer_status() == "triton"
    make = make_fp8_scaled_mm if op == "fp8_scaled_mm" else make_int8_scaled_mm
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(100 * seed + len(op))
        for per_channel in (False, True):
            for static in (False, True):
                args = make(g, DEVICE, dtype, per_channel=per_channel, static=static)
                out = getattr(quant_ops, op)(*args)
                ref = getattr(native, op)(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
                assert out.shape == ref.shape and out.dtype == ref.dtype
                torch.testing.assert_close(out.cpu().float(), ref.float(), **GEMM_TOL[dtype])


def test_w8a8_quantizer_failure_falls_back_loudly(monkeypatch):
    from portaserve.platforms.cuda import quant_ops
    from portaserve.platforms.triton_kernels import quant

    if not _provider_runs_here("int8_scaled_mm"):
        pytest.skip(f"torch cannot run _int_mm on {DEVICE}")

    def boom(*a, **k):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(quant_ops, "_triton_quant_error", None)
    monkeypatch.setattr(quant, "per_token_quant", boom)
    g = torch.Generator().manual_seed(9)
    args = make_int8_scaled_mm(g, DEVICE, torch.float32, per_channel=True, static=False)
    with pytest.warns(RuntimeWarning, match="quantizer failed"):
        out = quant_ops.int8_scaled_mm(*args)
    assert quant_ops.quantizer_status().startswith("torch")
    ref = native.int8_scaled_mm(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(out.cpu(), ref, **GEMM_TOL[torch.float32])
    args = make_fp8_scaled_mm(g, DEVICE, torch.float32, per_channel=True, static=True)
    out = quant_ops.fp8_scaled_mm(*args)  # stays on torch's quantizer, no second warning needed
    ref = native.fp8_scaled_mm(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(out.cpu(), ref, **GEMM_TOL[torch.float32])
