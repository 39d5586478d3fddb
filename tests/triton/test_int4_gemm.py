"""The Triton INT4 kernels (the AWQ decode GEMV / split-K kernel in both its modes, and the
general dequant-GEMM for AWQ and GPTQ) against the native dequantize-then-matmul oracle,
their fallbacks, and the Triton paged attention over an FP8 KV cache against native
attention over the same cache upcast (under TRITON_INTERPRET=1 on the CPU; on a GPU host
with PORTASERVE_TEST_DEVICE=cuda, compiled, where bf16 runs too).  Triton 3.x's
interpreter computes tl.dot on bfloat16 operands wrongly, so on the CPU the decode
kernel's tl.dot mode is checked in float32 and float16 (the same code with another
magic constant) and bf16 runs the FMA mode only."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from portaserve.core.ops import native
from tests.quant_inputs import random_int4

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

DEVICE = os.environ.get("PORTASERVE_TEST_DEVICE", "cpu")
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
# float32: the same products summed in another order.  16-bit: the kernel rounds each
# dequantized weight to the activation dtype before tl.dot (relative 2^-8 for bf16) where
# the oracle keeps float32; outputs are O(1).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}


def _kernel():
    from portaserve.platforms.triton_kernels.int4_gemm import int4_gemm

    return int4_gemm


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,act_order", [("awq", False), ("gptq", False), ("gptq", True),
                                              ("gptq_v2", False), ("gptq_v2", True)])
@pytest.mark.parametrize("M,K,N,group", [(1, 64, 48, 32), (7, 96, 40, 16), (33, 128, 64, 64),
                                         (5, 64, 24, 64)])
def test_int4_gemm_matches_native(layout, act_order, M, K, N, group, dtype):
    g = torch.Generator().manual_seed(M * 1000 + K + N + group)
    qw, s, qz, g_idx, _, _ = random_int4(g, K, N, group, layout, act_order)
    x = torch.randn(M, K, generator=g).to(dtype)
    s = s.to(dtype)
    ref = native.int4_gemm(x, qw, s, qz, g_idx, layout)
    x, qw, s, qz, g_idx = _dev(x, qw, s, qz, g_idx)
    for split in (None, 3):
        out = _kernel()(x, qw, s, qz, g_idx, layout, split_k=split)
        assert out.dtype == dtype and out.shape == (M, N)
        torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])


def test_int4_gemm_leading_dims():
    g = torch.Generator().manual_seed(0)
    qw, s, qz, _, _, _ = random_int4(g, 64, 32, 32, "awq")
    x = torch.randn(2, 3, 64, generator=g)
    ref = native.int4_gemm(x, qw, s, qz, None, "awq")
    x, qw, s, qz = _dev(x, qw, s, qz)
    out = _kernel()(x, qw, s, qz, None, "awq")
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype,as_bytes,q_dtype", [
    (torch.float8_e4m3fn, False, torch.float32), (torch.float8_e4m3fn, True, torch.float32),
    (torch.float8_e5m2, False, torch.float32), (torch.float8_e4m3fn, False, torch.bfloat16),
    (torch.float8_e5m2, False, torch.bfloat16),
    pytest.param(torch.float8_e4m3fn, True, torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="the interpreter's bfloat16 dot is wrong (GPU only)"))])
@pytest.mark.parametrize("grouped", [False, True])
def test_attention_over_fp8_kv_cache(kv_dtype, as_bytes, q_dtype, grouped, monkeypatch):
    """Reading an FP8 pool is the same as reading its upcast copy (the rounding happened
    at store time): decode, cascade decode and extend.  as_bytes: the path of GPUs whose
    Triton has no e4m3 type (the A100), which reads the cache as bytes and decodes them.
    A bfloat16 q meets the cache in float16 (attention._q_for_fp8): its tolerance is
    bfloat16's, a q past float16's range (clamped) still gives finite outputs, and a NaN
    in q still gives NaN.  Extend runs with one query head per program and grouped."""
    from portaserve.platforms.triton_kernels import attention as ta
    from tests.test_cascade_attention import paged_shared_batch
    from tests.triton.test_kernels import _paged_setup, attention_launch

    monkeypatch.setattr(ta, "_e4m3_as_bytes", lambda device: as_bytes)
    attention_launch(monkeypatch, grouped=grouped)
    assert ta._kv_operands(torch.empty(1, dtype=q_dtype), torch.empty(1, dtype=kv_dtype),
                           torch.empty(1, dtype=kv_dtype))[2] == (q_dtype == torch.bfloat16 and not as_bytes)
    tol = dict(atol=2e-3, rtol=2e-3) if q_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    g = torch.Generator().manual_seed(5)
    H, Hk, D = 8, 2, 32
    seq = [1, 17, 70, 5]
    k, v, r2t, rows = _paged_setup(g, seq, [0] * len(seq), H, Hk, D, torch.float32)
    k8, v8 = k.to(kv_dtype), v.to(kv_dtype)
    q = torch.randn(len(seq), H, D, generator=g).to(q_dtype)
    sl = torch.tensor(seq)
    ref = native.attention_decode(q.float(), k8.float(), v8.float(), r2t, rows, sl, D ** -0.5)
    if q_dtype == torch.float32:
        torch.testing.assert_close(native.attention_decode(q, k8, v8, r2t, rows, sl, D ** -0.5), ref)
    out = ta.attention_decode(*_dev(q, k8, v8, r2t, rows, sl), D ** -0.5)
    torch.testing.assert_close(out.cpu().float(), ref, **tol)
    if q_dtype == torch.bfloat16:  # past float16's range: clamped, not inf/NaN
        big = q.clone()
        big[0, 0, 0] = 1e6
        out = ta.attention_decode(*_dev(big, k8, v8, r2t, rows, sl), D ** -0.5)
        assert out.float().isfinite().all()
        big[0, 0, 0] = float("nan")
        out = ta.attention_decode(*_dev(big, k8, v8, r2t, rows, sl), D ** -0.5).cpu().float()
        assert out[0, 0].isnan().all() and out[1:].isfinite().all()

    q, k, v, r2t, rows, sl, m = paged_shared_batch(g, [(150, 3), (0, 2)], H, Hk, D, pad_tiles=1)
    k8, v8, q = k.to(kv_dtype), v.to(kv_dtype), q.to(q_dtype)
    ref = native.attention_decode(q.float(), k8.float(), v8.float(), r2t, rows, sl, D ** -0.5)
    args = _dev(q, k8, v8, r2t, rows, sl, m.kv_start, m.tile_rows, m.tile_lens, m.tile_members)
    out = ta.attention_decode_shared(*args[:6], D ** -0.5, *args[6:])
    torch.testing.assert_close(out.cpu().float(), ref, **tol)

    prefix, ext = [0, 40, 3], [7, 33, 1]
    k, v, r2t, rows = _paged_setup(g, prefix, ext, H, Hk, D, torch.float32)
    k8, v8 = k.to(kv_dtype), v.to(kv_dtype)
    q = torch.randn(sum(ext), H, D, generator=g).to(q_dtype)
    pl, el = torch.tensor(prefix), torch.tensor(ext)
    ref = native.attention_extend(q.float(), k8.float(), v8.float(), r2t, rows, pl, el, D ** -0.5)
    out = ta.attention_extend(*_dev(q, k8, v8, r2t, rows, pl, el), D ** -0.5)
    torch.testing.assert_close(out.cpu().float(), ref, **tol)


if importlib.util.find_spec("triton") is not None:  # module level: the compile check imports it
    import triton
    import triton.language as tl

    from portaserve.platforms.triton_kernels.attention import _e4m3_bits_to_f32

    @triton.jit
    def _decode_e4m3_all(x_ptr, y_ptr):
        i = tl.arange(0, 256)
        tl.store(y_ptr + i, _e4m3_bits_to_f32(tl.load(x_ptr + i)))


def test_e4m3_bytes_decode_every_value():
    """The byte decoder against torch's float8_e4m3fn, all 256 patterns (the two NaN
    patterns read as +-480: stores saturate, so only a NaN input writes them)."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = bits.view(torch.float8_e4m3fn).float()
    want[want.isnan()] = torch.where(bits[want.isnan()] >= 128, -480.0, 480.0)
    x = bits.to(DEVICE)
    y = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_e4m3_all[(1,)](x, y)
    assert torch.equal(y.cpu(), want), (y.cpu() - want).abs().max()


# ---- the decode kernel (M <= 64; AWQ and GPTQ without act-order) ----------------------------------------------------------
DECODE_CASES = [  # M, K, N, group: N tails (not a multiple of the tile), one or many groups
    (1, 64, 48, 32), (1, 128, 40, 64), (1, 256, 24, 128), (3, 64, 40, 16), (16, 128, 64, 32),
    (9, 256, 24, 128), (20, 64, 32, 32), (40, 128, 40, 64)]


def _decode_dtypes(mode):
    if DEVICE != "cpu":
        return DTYPES
    return [torch.float32, torch.float16] + ([torch.bfloat16] if mode == "fma" else [])


@pytest.mark.parametrize("layout", ["awq", "gptq", "gptq_v2"])
@pytest.mark.parametrize("mode,M,K,N,group", [("fma", *c) for c in DECODE_CASES if c[0] == 1]
                         + [("dot", *c) for c in DECODE_CASES])
def test_decode_kernel_matches_native(layout, mode, M, K, N, group):
    g = torch.Generator().manual_seed(7 * M + K + N + group)
    qw, s, qz, _, _, _ = random_int4(g, K, N, group, layout)
    x32 = torch.randn(M, K, generator=g)
    for dtype in _decode_dtypes(mode):
        x, sd = x32.to(dtype), s.to(dtype)
        ref = native.int4_gemm(x, qw, sd, qz, None, layout)
        xd, qwd, sdd, qzd = _dev(x, qw, sd, qz)
        # 1000: clamped to one K block per program
        for split in ((None, 1, 2, 1000) if DEVICE != "cpu" else (None, 1000) if M % 2 else (2,)):
            out = _kernel()(xd, qwd, sdd, qzd, None, layout, split_k=split, path=f"decode_{mode}")
            assert out.dtype == dtype and out.shape == (M, N)
            torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])


def test_int4_gemm_routes_by_m_and_act_order(monkeypatch):
    from portaserve.platforms.triton_kernels import int4_gemm as tk

    calls = []
    real = {name: getattr(tk, name) for name in ("_awq_decode", "_general", "_dequant_matmul")}
    for name, label in (("_awq_decode", "decode"), ("_general", "general"), ("_dequant_matmul", "dequant")):
        monkeypatch.setattr(tk, name, lambda *a, _f=real[name], _l=label, **k: calls.append(_l) or _f(*a, **k))
    g = torch.Generator().manual_seed(3)
    for layout, act_order, M, want in [("awq", False, 1, "decode"), ("awq", False, 16, "general"),
                                       ("awq", False, 40, "general"),
                                       ("awq", False, 65, "general"), ("awq", False, 256, "dequant"),
                                       ("gptq", True, 300, "dequant"), ("gptq", False, 2, "general"),
                                       ("gptq_v2", False, 1, "decode"), ("gptq", True, 4, "general"),
                                       ("gptq_v2", True, 1, "general")]:
        qw, s, qz, g_idx, _, _ = random_int4(g, 64, 32, 32, layout, act_order)
        x = torch.randn(M, 64, generator=g)
        calls.clear()
        out = tk.int4_gemm(*_dev(x, qw, s, qz, g_idx), layout)
        assert calls == [want], (layout, M, calls)
        torch.testing.assert_close(out.cpu(), native.int4_gemm(x, qw, s, qz, g_idx, layout),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout,act_order", [("awq", False), ("gptq", True), ("gptq_v2", False)])
def test_dequant_then_matmul_path(layout, act_order):
    """Prefill: dequantize (in column chunks) to the activation dtype, then x @ W."""
    from portaserve.platforms.triton_kernels import int4_gemm as tk

    g = torch.Generator().manual_seed(11)
    K, N, group = 64, 48, 16
    qw, s, qz, g_idx, _, _ = random_int4(g, K, N, group, layout, act_order)
    x = torch.randn(6, K, generator=g)
    ref = native.int4_gemm(x, qw, s, qz, g_idx, layout)
    for chunk in (None, K * 4 * 16):  # one chunk; 16-column chunks
        out = tk._dequant_matmul(*_dev(x, qw, s, qz, g_idx), layout, chunk_bytes=chunk)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    if DEVICE != "cpu":
        xb, sb = x.to(torch.bfloat16), s.to(torch.bfloat16)
        ref = native.int4_gemm(xb, qw, sb, qz, g_idx, layout)
        out = tk.int4_gemm(*_dev(xb, qw, sb, qz, g_idx), layout, path="dequant")
        torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[torch.bfloat16])


def test_a_failing_kernel_falls_back_loudly(monkeypatch):
    """A kernel that cannot compile on the device must not crash the engine: decode falls
    back to the general kernel, the general one to the native op, each with one warning."""
    from portaserve.platforms.triton_kernels import int4_gemm as tk

    def boom(*a, **k):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(tk, "_disabled", {})
    g = torch.Generator().manual_seed(4)
    qw, s, qz, _, _, _ = random_int4(g, 64, 32, 32, "awq")
    x = torch.randn(1, 64, generator=g)
    ref = native.int4_gemm(x, qw, s, qz, None, "awq")
    monkeypatch.setattr(tk, "_awq_decode", boom)
    with pytest.warns(RuntimeWarning, match="decode kernel failed"):
        out = tk.int4_gemm(*_dev(x, qw, s, qz), None, "awq")
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    assert "decode" in tk._disabled
    monkeypatch.setattr(tk, "_general", boom)
    with pytest.warns(RuntimeWarning, match="general kernel failed"):
        out = tk.int4_gemm(*_dev(x, qw, s, qz), None, "awq")
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_selftest_passes_on_this_host():
    """On the CPU there is no accelerator to test (None); on a GPU host the kernels compile
    and agree with the oracle, and the decode kernel stays enabled."""
    from portaserve.platforms.triton_kernels import int4_gemm as tk

    assert tk.selftest() is None
    assert "decode" not in tk._disabled
