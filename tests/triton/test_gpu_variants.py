"""The kernel variants a GPU launches, compiled for the GPU targets without a GPU.

The interpreted tests run small shapes in float32 (numpy has no bfloat16) with the CPU's
block sizes; a GPU launches bf16/fp16 at model shapes with its own block sizes, warps and
pipeline stages.  Here the wrappers run on meta tensors at those shapes (the device type is
then not "cpu", so they pick their GPU configuration); conftest.py's hook compiles each
launch for sm_90, sm_80 and gfx942, checks its shared memory against the device's, and
skips running it.  Shapes: Llama-3.1-8B (32 heads / 8 KV heads, head size 128, hidden
4096, MLP 14336, vocabulary 128256), head sizes 64 and 256, fp8 caches, the fewest and
most decode splits."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                       or os.environ.get("PORTASERVE_TRITON_COMPILE_CHECK", "1") == "0",
                       reason="compiles through the interpreter hook (tests/triton/conftest.py)"),
]

META = torch.device("meta")


@pytest.fixture(params=[False, True], ids=["plain", "pdl"])
def pdl_launch(request, monkeypatch):
    """Both launches of the decode step's kernels: plain, and with programmatic dependent
    launch as an sm_90+ GPU captures them into a graph (compiled for sm_90 only, pdl.py)."""
    from portaserve.platforms.triton_kernels import pdl

    monkeypatch.setattr(pdl, "launch", lambda device: pdl._WITH if request.param else pdl._WITHOUT)
    return request.param


def _m(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def _kernels(fn) -> list[str]:
    """The Triton kernels fn launched (each compiled for the GPU targets, or found compiled)."""
    from tests.triton.conftest import launched

    n = len(launched)
    fn()
    return launched[n:]


ATTENTION_CASES = [  # dtype, head size, heads, KV heads, KV cache
    (torch.bfloat16, 128, 32, 8, "model"), (torch.float16, 128, 32, 8, "model"),
    (torch.bfloat16, 64, 16, 16, "model"), (torch.bfloat16, 256, 8, 4, "model"),
    (torch.bfloat16, 128, 32, 8, "fp8_e4m3"), (torch.bfloat16, 128, 32, 8, "fp8_e4m3_bytes"),
    (torch.bfloat16, 128, 32, 8, "fp8_e5m2"),
    # head size 256 over fp8: extend keeps its one-head launch (the 128 x 128 one would not
    # fit the shared memory of an A100 or an MI300)
    (torch.bfloat16, 256, 8, 4, "fp8_e4m3"), (torch.bfloat16, 256, 8, 4, "fp8_e4m3_bytes"),
    (torch.bfloat16, 256, 8, 4, "fp8_e5m2")]


@pytest.mark.parametrize("dtype,D,H,Hk,kv", ATTENTION_CASES)
def test_attention_gpu_variants(dtype, D, H, Hk, kv, monkeypatch, pdl_launch):
    from portaserve.platforms.triton_kernels import attention as ta

    monkeypatch.setattr(ta, "_e4m3_as_bytes", lambda device: kv == "fp8_e4m3_bytes")
    kv_dtype = {"model": dtype, "fp8_e5m2": torch.float8_e5m2}.get(kv, torch.float8_e4m3fn)
    B, slots = 128, 100_000
    kc, vc = _m(slots, Hk, D, dtype=kv_dtype), _m(slots, Hk, D, dtype=kv_dtype)
    r2t = _m(B + 1, 8192, dtype=torch.int32)
    rows, lens = _m(B, dtype=torch.int64), _m(B, dtype=torch.int64)
    q = _m(B, H, D, dtype=dtype)
    for splits in (1, 16):  # the split count is a constexpr: the two ends
        monkeypatch.setattr(ta, "_num_splits", lambda b, hk, dev, s=splits: s)
        got = _kernels(lambda: ta.attention_decode(q, kc, vc, r2t, rows, lens, D ** -0.5))
        # one split: stage 1 writes the output, nothing to merge
        assert got == ["_decode_stage1"] + ["_decode_stage2"] * (splits > 1), got
        tiles = B // 2
        shared = (_m(B, dtype=torch.int64), _m(tiles, dtype=torch.int64), _m(tiles, dtype=torch.int64),
                  _m(tiles, 16, dtype=torch.int64))
        got = _kernels(lambda: ta.attention_decode_shared(q, kc, vc, r2t, rows, lens, D ** -0.5, *shared))
        assert got == ["_shared_prefix_kernel", "_decode_stage1", "_decode_stage2"], got
    ext = torch.tensor([4096, 2048, 1, 2047])  # host lengths: the grid depends on them
    qe = _m(int(ext.sum()), H, D, dtype=dtype)
    got = _kernels(lambda: ta.attention_extend(qe, kc, vc, r2t, rows[:4], torch.zeros(4, dtype=torch.int64),
                                               ext, D ** -0.5))
    assert got == ["_extend_kernel"], got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_elementwise_gpu_variants(dtype, pdl_launch):
    from portaserve.models.rope import cos_sin_cache
    from portaserve.platforms.triton_kernels import activation, norm, rotary

    T, H, Hk, D, hidden, inter = 8192, 32, 8, 128, 4096, 14336
    x, w = _m(T, hidden, dtype=dtype), _m(hidden, dtype=dtype)
    assert _kernels(lambda: norm.rmsnorm(x, w, 1e-5)) == ["_rmsnorm_kernel"]
    assert _kernels(lambda: norm.fused_add_rmsnorm(x, _m(T, hidden, dtype=dtype), w, 1e-5)) == ["_rmsnorm_kernel"]
    assert _kernels(lambda: activation.silu_and_mul(_m(T, 2 * inter, dtype=dtype))) == ["_silu_and_mul_kernel"]
    cs = cos_sin_cache(D, 8192, {"rope_theta": 500000.0, "rope_type": "default"}).to(META)
    pos, loc = _m(T, dtype=torch.int64), _m(T, dtype=torch.int64)
    qkv = _m(T, (H + 2 * Hk) * D, dtype=dtype)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hk * D, Hk * D], 1))
    assert _kernels(lambda: rotary.rotary_embedding(pos, q, k, cs, True)) == ["_rope_kernel"] * 2
    for kv_dtype in (dtype, torch.float32):
        kc = _m(100_000, Hk, D, dtype=kv_dtype)
        assert _kernels(lambda: rotary.rotary_kv_store(pos, q, k, v, cs, True, kc, kc, loc)) == ["_rope_store_kernel"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_gpu_variant(dtype, pdl_launch):
    from portaserve.platforms.triton_kernels import gemv

    for N, K in [(6144, 4096), (4096, 14336), (128256, 4096), (1152, 896)]:
        assert _kernels(lambda: gemv.linear(_m(1, K, dtype=dtype), _m(N, K, dtype=dtype))) == ["_gemv_kernel"]
    assert _kernels(lambda: gemv.linear(_m(2, 4096, dtype=dtype), _m(6144, 4096, dtype=dtype))) == []


def test_sampling_gpu_variant():
    from portaserve.platforms.triton_kernels import sampling

    B, V = 256, 128256
    probs, noise = _m(B, V, dtype=torch.float32), _m(B, V, dtype=torch.float32)
    topk = _m(B, dtype=torch.int64)
    topp = _m(B, dtype=torch.float32)
    assert _kernels(lambda: sampling.top_k_top_p_min_p_sample(probs, topk, topp, topp, noise)) == ["_sample_kernel"]
    for dtype in (torch.float32, torch.bfloat16):
        assert _kernels(lambda: sampling.argmax(_m(B, V, dtype=dtype))) == ["_argmax_blocks", "_argmax_rows"]
        assert _kernels(lambda: sampling.argmax(_m(1, V, dtype=dtype))) == ["_argmax_blocks", "_argmax_rows"]


def test_pdl_is_used_only_where_its_probe_passed_and_only_in_captures(monkeypatch, caplog):
    """pdl.enabled decides once per device: sm_90+ CUDA, PORTASERVE_PDL not 0, and a PDL
    chain that ran and replayed from a graph (an older Triton, CUDA runtime or driver fails
    it, and graphs are then captured without PDL instead of failing to capture).  Inside a
    capture it cannot probe, so it decides nothing there.  Launches use PDL only while
    captured.  (The probe itself runs on the GPU host: tests/gpu/test_engine_gpu.py.)"""
    from portaserve.platforms.triton_kernels import pdl

    dev = torch.device("cuda", 0)
    capturing = [False]
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.delenv("PORTASERVE_PDL", raising=False)

    monkeypatch.setattr(pdl, "_ON", {})
    monkeypatch.setattr(pdl, "_probe", lambda d: "no griddepcontrol in this Triton")
    assert not pdl.enabled(dev)
    assert "programmatic dependent launch is off on cuda:0: no griddepcontrol" in caplog.text
    capturing[0] = True
    assert pdl.launch(dev) is pdl._WITHOUT

    monkeypatch.setattr(pdl, "_ON", {})
    monkeypatch.setattr(pdl, "_probe", lambda d: pytest.fail("probed inside a capture"))
    assert not pdl.enabled(dev) and dev not in pdl._ON

    capturing[0] = False
    monkeypatch.setattr(pdl, "_probe", lambda d: None)
    assert pdl.enabled(dev) and pdl.launch(dev) is pdl._WITHOUT  # eager: as before
    capturing[0] = True
    assert pdl.launch(dev) is pdl._WITH

    for env, cap in (("0", (9, 0)), ("1", (8, 0))):
        monkeypatch.setenv("PORTASERVE_PDL", env)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=cap: c)
        monkeypatch.setattr(pdl, "_ON", {})
        assert not pdl.enabled(dev) and pdl.launch(dev) is pdl._WITHOUT
    assert not pdl.enabled(torch.device("cpu")) and not pdl.enabled(torch.device("meta"))
    # the probe's kernel, as the probe launches it (compiled for sm_90)
    x = _m(128, dtype=torch.float32)
    assert _kernels(lambda: pdl._probe_kernel[(1,)](x, x, **pdl._WITH)) == ["_probe_kernel"]
