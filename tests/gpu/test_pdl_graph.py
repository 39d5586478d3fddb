"""Programmatic dependent launch, kernel by kernel: a decode layer's chain of Triton kernels
(RMSNorm, GEMV, rotary + KV store, decode attention, fused add + RMSNorm, silu_and_mul),
captured into a CUDA graph with PDL and replayed, equals the same chain launched eagerly
without PDL, bit for bit (platforms/triton_kernels/pdl.py).  A read of an earlier kernel's
output, or a write, placed before a kernel's wait would race and show here; the engine test
(test_engine_gpu.py) covers whole models, this one names the kernel.

Also the decode attention at one KV split (the DIRECT path: stage 1 writes the output) in
16-bit dtypes against native, at the batch where a GPU takes it."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer_weights(g, hidden, H, Hk, D, inter, dtype, dev):
    def w(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dtype).to(dev)

    return dict(norm1=(1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(dev),
                norm2=(1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(dev),
                qkv=w((H + 2 * Hk) * D, hidden), o=w(hidden, H * D), gate_up=w(2 * inter, hidden),
                down=w(hidden, inter))


def _chain(steps, x, res, layers, state, H, Hk, D):
    """`steps` decode layers over the batch in x: the kernels one decode step runs, in order,
    each reading what the one before wrote."""
    from portaserve.platforms.triton_kernels import activation, attention, gemv, norm, rotary

    pos, cs, kc, vc, loc, r2t, rows, lens = state
    lin = gemv.linear  # the GEMV at one row (PDL), cuBLAS (no PDL) at more: both mixes
    for li in range(steps):
        p = layers[li % len(layers)]
        h, res = norm.fused_add_rmsnorm(x, res, p["norm1"], 1e-6)
        q, k, v = lin(h, p["qkv"]).split([H * D, Hk * D, Hk * D], -1)
        B = q.shape[0]
        q = rotary.rotary_kv_store(pos, q.view(B, H, D), k.view(B, Hk, D), v.view(B, Hk, D), cs, True,
                                   kc[li], vc[li], loc)
        a = attention.attention_decode(q, kc[li], vc[li], r2t, rows, lens, D ** -0.5)
        x = lin(a.view(B, H * D), p["o"])
        h, res = norm.fused_add_rmsnorm(x, res, p["norm2"], 1e-6)
        x = lin(activation.silu_and_mul(lin(h, p["gate_up"])), p["down"])
    return norm.rmsnorm(x, layers[0]["norm1"], 1e-6)


def _direct_batch(dev, Hk):
    """The smallest batch whose decode attention runs at one KV split (the DIRECT path)."""
    from portaserve.platforms.triton_kernels import attention

    B = -(-attention.PROGRAMS_PER_SM * attention._sm_count(dev) // Hk)
    assert attention._num_splits(B, Hk, dev) == 1
    return B


@pytest.mark.parametrize("B,Hk", [(1, 2), (3, 2), (None, 8)])  # GEMV; cuBLAS; one KV split
def test_captured_pdl_chain_equals_eager(B, Hk, monkeypatch):
    """The chain captured with PDL against the chain captured without it, bit for bit, and
    against the chain launched eagerly (without PDL; cuBLAS may pick another algorithm when
    captured, so there to rounding)."""
    from portaserve.models.rope import cos_sin_cache
    from portaserve.platforms.triton_kernels import pdl

    dev = torch.device("cuda", torch.cuda.current_device())
    monkeypatch.setattr(pdl, "_ON", {})
    monkeypatch.delenv("PORTASERVE_PDL", raising=False)
    on = pdl.enabled(dev)  # runs the probe
    assert on == (torch.cuda.get_device_capability(dev)[0] >= 9 and torch.version.hip is None)
    B = B or _direct_batch(dev, Hk)
    dtype, H, D, hidden, inter, L = torch.bfloat16, 4 * Hk, 128, 1024, 2816, 4
    g = torch.Generator().manual_seed(B)
    layers = [_layer_weights(g, hidden, H, Hk, D, inter, dtype, dev) for _ in range(2)]
    ctx, slots = 300, B * 300 + 1000
    lens = torch.randint(1, ctx, (B,), generator=g)
    r2t = torch.randperm(slots - 1, generator=g)[:B * ctx].view(B, ctx).to(torch.int32) + 1
    kc0 = torch.randn(L, slots, Hk, D, generator=g).to(dtype).to(dev)
    vc0 = torch.randn(L, slots, Hk, D, generator=g).to(dtype).to(dev)
    loc = r2t[torch.arange(B), lens - 1].to(torch.int64).to(dev)  # each request's newest slot
    cs = cos_sin_cache(D, 4096, {"rope_theta": 500000.0, "rope_type": "default"}).to(dev)
    x0 = torch.randn(B, hidden, generator=g).to(dtype).to(dev)
    res0 = torch.randn(B, hidden, generator=g).to(dtype).to(dev)
    kc, vc = kc0.clone(), vc0.clone()
    state = ((lens - 1).to(dev), cs, kc, vc, loc, r2t.to(dev), torch.arange(B, device=dev), lens.to(dev))
    x, res = x0.clone(), res0.clone()

    seen = []
    real = pdl.launch
    monkeypatch.setattr(pdl, "launch", lambda d: seen.append(real(d)) or seen[-1])
    eager = _chain(L, x, res, layers, state, H, Hk, D)
    torch.cuda.synchronize()
    eager_kc, eager_vc = kc.clone(), vc.clone()
    assert not torch.equal(eager_kc, kc0)  # the chain wrote the caches
    assert seen and all(k is pdl._WITHOUT for k in seen)  # eager: without PDL

    results = {}
    for with_pdl in (True, False):
        pdl._ON[dev] = on and with_pdl
        seen.clear()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # compiles the variants on a side stream, as torch advises
            _chain(L, x, res, layers, state, H, Hk, D)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(L, x, res, layers, state, H, Hk, D)
        assert seen and all(k is (pdl._WITH if on and with_pdl else pdl._WITHOUT) for k in seen[len(seen) // 2:])
        for replay in range(3):
            kc.copy_(kc0), vc.copy_(vc0)
            graph.replay()
            torch.cuda.synchronize()
            if replay:
                assert torch.equal(out, results[with_pdl][0]) and torch.equal(kc, results[with_pdl][1])
            results[with_pdl] = (out.clone(), kc.clone(), vc.clone())
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)
    out, kc_g, vc_g = results[False]
    torch.testing.assert_close(out.float(), eager.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kc_g.float(), eager_kc.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(vc_g.float(), eager_vc.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_at_one_split_16_bit(dtype):
    """The DIRECT path (stage 1 writes the 16-bit output, no merge launch) against native
    decode attention on the same 16-bit inputs in float32, at a batch that takes it."""
    from portaserve.core.ops import native
    from portaserve.platforms.triton_kernels import attention

    dev = torch.device("cuda", torch.cuda.current_device())
    Hk, H, D = 8, 32, 128
    B = _direct_batch(dev, Hk)
    g = torch.Generator().manual_seed(7)
    slots, ctx = 60000, 400
    lens = torch.randint(1, ctx, (B,), generator=g)
    lens[0], lens[1] = 1, ctx  # one token; a full row
    r2t = torch.randperm(slots - 1, generator=g)[:B * ctx].view(B, ctx).to(torch.int32) + 1
    k = torch.randn(slots, Hk, D, generator=g).to(dtype)
    v = torch.randn(slots, Hk, D, generator=g).to(dtype)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    rows = torch.arange(B)
    ref = native.attention_decode(q.float(), k.float(), v.float(), r2t, rows, lens, D ** -0.5)
    got = attention.attention_decode(q.to(dev), k.to(dev), v.to(dev), r2t.to(dev), rows.to(dev), lens.to(dev),
                                     D ** -0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), ref, atol=1e-2, rtol=1e-2)
