"""The shared Triton kernels against the native ops (under TRITON_INTERPRET=1 on the CPU;
on a GPU host the same tests run on the device with --device)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from portaserve.core.ops import native
from portaserve.core.ops.registry import providers_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

DEVICE = os.environ.get("PORTASERVE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1"


def _triton(op):
    import portaserve.platforms.providers  # noqa: F401  (registers)

    return next(p for p in providers_for(op) if p.name == "triton").load()


def _paged_setup(g, lens_prefix, lens_ext, H, Hk, D, dtype, slots_total=2048):
    """A KV pool with scattered slots for each request, plus the packed q."""
    B = len(lens_prefix)
    total = [p + e for p, e in zip(lens_prefix, lens_ext)]
    k_cache = torch.randn(slots_total, Hk, D, generator=g).to(dtype)
    v_cache = torch.randn(slots_total, Hk, D, generator=g).to(dtype)
    k_cache[0] = 0
    v_cache[0] = 0
    perm = torch.randperm(slots_total - 1, generator=g) + 1
    r2t = torch.zeros(B + 2, max(total) + 5, dtype=torch.int32)
    rows = torch.randperm(B + 2, generator=g)[:B]
    off = 0
    for i, t in enumerate(total):
        r2t[rows[i], :t] = perm[off:off + t].to(torch.int32)
        off += t
    return k_cache, v_cache, r2t, rows.to(torch.int64)


def _to(dev, *ts):
    return [t.to(dev) for t in ts]


@pytest.mark.parametrize("H,Hk,D", [(4, 4, 32), (8, 2, 64), (6, 2, 48)])
def test_attention_decode(H, Hk, D):
    g = torch.Generator().manual_seed(H * 100 + D)
    seq = [1, 17, 70, 5, 133]
    k, v, r2t, rows = _paged_setup(g, seq, [0] * len(seq), H, Hk, D, torch.float32)
    q = torch.randn(len(seq), H, D, generator=g)
    seq_lens = torch.tensor(seq)
    ref = native.attention_decode(q, k, v, r2t, rows, seq_lens, D ** -0.5)
    q, k, v, r2t, rows, seq_lens = _to(DEVICE, q, k, v, r2t, rows, seq_lens)
    out = _triton("attention_decode")(q, k, v, r2t, rows, seq_lens, D ** -0.5)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)


def attention_launch(monkeypatch, grouped: bool = False):
    """Run the extend kernel with a KV head's query heads together in one program's rows
    (attention.Launch.grouped), or one head per program."""
    from portaserve.platforms.triton_kernels import attention as tk

    def ext(b):
        return tk.Launch(block_m=b, block_n=32, warps=4, stages=2, grouped=grouped)
    monkeypatch.setattr(tk, "EXTEND_LAUNCH_CPU", ext(32))
    monkeypatch.setattr(tk, "EXTEND_LAUNCH", {e: ext(64) for e in (4, 2, 1)})


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("H,Hk,D", [(4, 4, 32), (8, 2, 64), (6, 3, 48), (8, 1, 32)])
def test_attention_extend(H, Hk, D, grouped, monkeypatch):
    attention_launch(monkeypatch, grouped)
    g = torch.Generator().manual_seed(H * 10 + D)
    prefix = [0, 40, 3, 0, 65]
    ext = [7, 33, 1, 70, 20]
    k, v, r2t, rows = _paged_setup(g, prefix, ext, H, Hk, D, torch.float32)
    q = torch.randn(sum(ext), H, D, generator=g)
    pl, el = torch.tensor(prefix), torch.tensor(ext)
    ref = native.attention_extend(q, k, v, r2t, rows, pl, el, D ** -0.5)
    q, k, v, r2t, rows, pl, el = _to(DEVICE, q, k, v, r2t, rows, pl, el)
    out = _triton("attention_extend")(q, k, v, r2t, rows, pl, el, D ** -0.5)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)


def test_attention_extend_takes_the_longest_extend_from_the_host(monkeypatch):
    """The extend kernel's grid needs the longest extend on the host.  Given by the caller
    (the scheduler knows it), the device is not read (a read waits for all queued work);
    the output equals native's, for a mixed batch's prompt part (a view) too."""
    from portaserve.platforms.triton_kernels import attention as tk

    g = torch.Generator().manual_seed(3)
    prefix, ext = [5, 0], [9, 30]
    k, v, r2t, rows = _paged_setup(g, prefix, ext, 4, 2, 32, torch.float32)
    q = torch.randn(sum(ext), 4, 32, generator=g)
    pl, el = torch.tensor(prefix), torch.tensor(ext + [1])  # + a decode tail's 1
    qd, kd, vd, r2td, rowsd, pld, eld = _to(DEVICE, q, k, v, r2t, rows, pl, el)
    ref = native.attention_extend(q, k, v, r2t, rows, pl, el[:-1], 32 ** -0.5)
    reads = []
    real_max = torch.Tensor.max
    monkeypatch.setattr(torch.Tensor, "max", lambda t, *a, **kw: reads.append(1) or real_max(t, *a, **kw))
    out = tk.attention_extend(qd, kd, vd, r2td, rowsd, pld, eld[:-1], 32 ** -0.5, 30)
    assert not reads
    monkeypatch.setattr(torch.Tensor, "max", real_max)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)
    out = tk.attention_extend(qd, kd, vd, r2td, rowsd, pld, eld[:-1], 32 ** -0.5)  # not given: read
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("H,Hk,D", [(4, 2, 32), (8, 8, 16), (8, 1, 64), (6, 2, 48)])
def test_attention_decode_shared(H, Hk, D):
    """Cascade attention (shared-prefix tiles, padded with empty tiles as in a captured
    graph) against plain native decode attention."""
    from tests.test_cascade_attention import paged_shared_batch

    g = torch.Generator().manual_seed(H * 7 + Hk + D)
    q, k, v, r2t, rows, seq_lens, m = paged_shared_batch(g, [(150, 3), (140, 18), (0, 2), (130, 1)], H, Hk, D,
                                                         pad_tiles=3)
    ref = native.attention_decode(q, k, v, r2t, rows, seq_lens, D ** -0.5)
    args = _to(DEVICE, q, k, v, r2t, rows, seq_lens, m.kv_start, m.tile_rows, m.tile_lens, m.tile_members)
    out = _triton("attention_decode_shared")(*args[:6], D ** -0.5, *args[6:])
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("splits", [1, 2])
def test_attention_decode_few_splits(monkeypatch, splits):
    """Large batches use fewer KV splits (one per sequence at the largest): plain and
    cascade decode with the split count a GPU would pick for them."""
    from portaserve.platforms.triton_kernels import attention as ta
    from tests.test_cascade_attention import paged_shared_batch

    monkeypatch.setattr(ta, "_num_splits", lambda b, hk, dev: splits)
    g = torch.Generator().manual_seed(splits)
    q, k, v, r2t, rows, seq_lens, m = paged_shared_batch(g, [(140, 4), (0, 3)], 8, 2, 32)
    ref = native.attention_decode(q, k, v, r2t, rows, seq_lens, 32 ** -0.5)
    args = _to(DEVICE, q, k, v, r2t, rows, seq_lens, m.kv_start, m.tile_rows, m.tile_lens, m.tile_members)
    torch.testing.assert_close(ta.attention_decode(*args[:6], 32 ** -0.5).cpu(), ref, atol=2e-3, rtol=2e-3)
    out = ta.attention_decode_shared(*args[:6], 32 ** -0.5, *args[6:])
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)


# Triton's CPU interpreter computes through numpy, which has no bfloat16: 16-bit dtypes are
# checked on the GPU host only.
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_fused_add(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 200, generator=g).to(dtype)
    r = torch.randn(13, 200, generator=g).to(dtype)
    w = (torch.rand(200, generator=g) + 0.5).to(dtype)
    ref = native.rmsnorm(x, w, 1e-6)
    ref2, ref_res = native.fused_add_rmsnorm(x, r, w, 1e-6)
    xd, rd, wd = _to(DEVICE, x, r, w)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(_triton("rmsnorm")(xd, wd, 1e-6).cpu(), ref, **tol)
    y, res = _triton("fused_add_rmsnorm")(xd, rd, wd, 1e-6)
    torch.testing.assert_close(y.cpu(), ref2, **tol)
    torch.testing.assert_close(res.cpu(), ref_res, **tol)


def test_silu_and_mul():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2 * 300, generator=g)
    torch.testing.assert_close(_triton("silu_and_mul")(x.to(DEVICE)).cpu(), native.silu_and_mul(x),
                               atol=1e-5, rtol=1e-5)


GEMV_DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
GEMV_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # the output's rounding


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@pytest.mark.parametrize("N,K,row_stride", [(37, 200, 200), (1027, 4136, 4136), (5, 2048, 2100), (9, 14336, 14336),
                                            (6, 3584, 3584), (11, 896, 900)])
def test_gemv(N, K, row_stride, dtype):
    # the batch-1 GEMV against torch's product in float64: every branch of its config (K a
    # multiple of 2048 over 7 blocks, of 512, neither, at most 1024), output rows and K not
    # multiples of the blocks, a weight that is a row slice of a wider matrix (sliced on the
    # device: a copy would make it dense)
    from portaserve.platforms.triton_kernels import gemv

    g = torch.Generator().manual_seed(3)
    full = (torch.randn(N, row_stride, generator=g) * K ** -0.5).to(dtype)
    x = torch.randn(1, K, generator=g).to(dtype)
    want = torch.nn.functional.linear(x.double(), full[:, :K].double())
    w = full.to(DEVICE)[:, :K]
    assert w.stride(0) == row_stride
    got = gemv.gemv(x.to(DEVICE), w).cpu()
    assert got.dtype == dtype and got.shape == (1, N)
    torch.testing.assert_close(got.double(), want, atol=GEMV_TOL[dtype], rtol=GEMV_TOL[dtype])


@pytest.mark.skipif(DEVICE == "cpu", reason="the GEMV path is taken on an accelerator only")
def test_linear_op_takes_the_gemv_for_one_16_bit_row(monkeypatch):
    from portaserve.platforms.triton_kernels import gemv

    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, w: calls.append("gemv") or real(x, w))
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(300, 512, generator=g) / 512 ** 0.5).to(torch.bfloat16).to(DEVICE)
    for x, path in [(torch.randn(1, 512), "gemv"), (torch.randn(1, 1, 512), "gemv"), (torch.randn(3, 512), None),
                    (torch.randn(2, 1, 512), None), (torch.randn(0, 512), None)]:
        calls.clear()
        xd = x.to(torch.bfloat16).to(DEVICE)
        got = _triton("linear")(xd, w)
        assert got.shape == (*x.shape[:-1], 300)
        assert calls == ([path] if path else [])
        torch.testing.assert_close(got.float(), torch.nn.functional.linear(xd.float(), w.float()), atol=1.6e-2,
                                   rtol=1.6e-2)
    calls.clear()  # float32 stays with cuBLAS
    _triton("linear")(torch.randn(1, 512, device=DEVICE), w.float())
    assert not calls


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot", [64, 32])
def test_rotary(is_neox, rot):
    from portaserve.models.rope import cos_sin_cache

    g = torch.Generator().manual_seed(2)
    cs = cos_sin_cache(rot, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    pos = torch.randint(0, 512, (11,), generator=g)
    q = torch.randn(11, 6, 64, generator=g)
    k = torch.randn(11, 2, 64, generator=g)
    rq, rk = native.rotary_embedding(pos, q, k, cs, is_neox)
    tq, tk = _triton("rotary_embedding")(*_to(DEVICE, pos, q, k, cs), is_neox)
    torch.testing.assert_close(tq.cpu(), rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tk.cpu(), rk, atol=1e-5, rtol=1e-5)
    # inputs untouched (the op returns new tensors)
    assert not torch.equal(tq.cpu(), q)


@pytest.mark.parametrize("is_neox,rot,D", [(True, 64, 64), (False, 64, 64), (True, 32, 64), (False, 16, 48)])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float8_e4m3fn)])
def test_rotary_kv_store(is_neox, rot, D, dtype, cache_dtype):
    """Rotary + KV store in one launch against the two native ops.  q and k are views of
    one projection output (strided rows, as in the model), v a view with another row
    stride, the V cache a view with another slot stride (a swapped stride shows); head
    counts past one head block (H=20 > 16)."""
    from portaserve.models.rope import cos_sin_cache

    g = torch.Generator().manual_seed(rot + D)
    T, H, Hk, S = 13, 20, 4, 40
    cs = cos_sin_cache(rot, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    pos = torch.randint(0, 512, (T,), generator=g)
    qk = (torch.randn(T, (H + Hk) * D, generator=g) * 4).to(dtype)
    vbuf = (torch.randn(T, Hk * D + 8, generator=g) * 4).to(dtype)
    kc = torch.randn(S, Hk, D, generator=g).to(cache_dtype)
    vcbuf = torch.randn(S, Hk + 1, D, generator=g).to(cache_dtype)
    loc = torch.randperm(S, generator=g)[:T]

    def views(qk, vbuf, vcbuf):  # made on each side: moving a view alone makes it contiguous
        q, k = (t.view(T, -1, D) for t in qk.split([H * D, Hk * D], 1))
        return q, k, vbuf[:, :Hk * D].view(T, Hk, D), vcbuf[:, :Hk]

    q, k, v, vc = views(qk, vbuf, vcbuf)
    rq, rk = native.rotary_embedding(pos, q, k, cs, is_neox)
    rkc, rvc = kc.clone(), vc.clone()
    native.kv_store(rkc, rvc, loc, rk, v)
    qk_d, vbuf_d, vcbuf_d, kc_d = _to(DEVICE, qk, vbuf, vcbuf, kc)
    q_d, k_d, v_d, vc_d = views(qk_d, vbuf_d, vcbuf_d)
    assert q_d.stride(0) == (H + Hk) * D != v_d.stride(0) and vc_d.stride(0) != kc_d.stride(0)
    tq = _triton("rotary_kv_store")(pos.to(DEVICE), q_d, k_d, v_d, cs.to(DEVICE), is_neox, kc_d, vc_d,
                                    loc.to(DEVICE))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(tq.cpu(), rq, **tol)
    torch.testing.assert_close(kc_d.cpu().float(), rkc.float(), **(tol if cache_dtype != torch.float8_e4m3fn
                                                                    else dict(atol=0.5, rtol=0.13)))
    torch.testing.assert_close(vc_d.cpu().float(), rvc.float(), atol=0, rtol=0)
    assert torch.equal(vcbuf_d[:, Hk].cpu().float(), vcbuf[:, Hk].float())  # the V cache's other head untouched
    assert torch.equal(qk_d.cpu(), qk) and torch.equal(vbuf_d.cpu(), vbuf)  # the inputs untouched


def test_rotary_kv_store_startup_selftest(monkeypatch):
    """The provider's start-up check (here on the interpreter as the 'accelerator'): None
    when the kernel agrees with native for the model's dtypes and head size, the reason when
    it fails or disagrees (the registry then chooses native); nothing to check without one."""
    from portaserve.platforms.triton_kernels import rotary, selftest

    model = {"dtype": torch.float32, "kv_dtype": torch.float32, "head_dim": 64}
    monkeypatch.setattr(selftest, "accel_device", lambda: None)
    assert rotary.selftest(model) is None
    monkeypatch.setattr(selftest, "accel_device", lambda: torch.device(DEVICE))
    monkeypatch.setattr(rotary, "_SELFTEST", {})
    assert rotary.selftest(model) is None
    monkeypatch.setattr(rotary, "_SELFTEST", {})
    good = rotary.rotary_kv_store
    monkeypatch.setattr(rotary, "rotary_kv_store", lambda *a: good(*a) * 1.5)
    assert "disagrees" in rotary.selftest(model)
    monkeypatch.setattr(rotary, "_SELFTEST", {})
    monkeypatch.setattr(rotary, "rotary_kv_store", lambda *a: 1 / 0)
    assert "ZeroDivisionError" in rotary.selftest(model)


def test_gemv_startup_selftest(monkeypatch):
    """The linear provider's start-up check: float32 models are refused with the reason
    (cuBLAS then runs everything); on the 'accelerator' (the interpreter here) every branch
    of the configuration rule is compared with torch, and a wrong or failing kernel is named."""
    from portaserve.platforms.triton_kernels import gemv, selftest

    assert "bfloat16/float16 only" in gemv.selftest({"dtype": torch.float32})
    monkeypatch.setattr(selftest, "accel_device", lambda: None)
    assert gemv.selftest({"dtype": torch.float16}) is None
    monkeypatch.setattr(selftest, "accel_device", lambda: torch.device(DEVICE))
    monkeypatch.setattr(gemv, "_SELFTEST", {})
    assert gemv.selftest({"dtype": torch.float16}) is None
    monkeypatch.setattr(gemv, "_SELFTEST", {})
    good = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, w: good(x, w) * (1.5 if x.shape[1] == 3 * 512 else 1))
    assert gemv.selftest({"dtype": torch.float16}).endswith("at K = [1536]")
    monkeypatch.setattr(gemv, "_SELFTEST", {})
    monkeypatch.setattr(gemv, "gemv", lambda x, w: 1 / 0)
    assert "ZeroDivisionError" in gemv.selftest({"dtype": torch.float16})


@pytest.mark.parametrize("T,H,I,E,K", [(1, 32, 16, 4, 2), (13, 64, 48, 6, 2), (40, 32, 32, 8, 3)])
def test_fused_moe(T, H, I, E, K):
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.2
    w2 = torch.randn(E, H, I, generator=g) * 0.2
    w, ids = native.moe_topk(torch.randn(T, E, generator=g), K, True)
    ref = native.fused_moe(x, w13, w2, w, ids)
    out = _triton("fused_moe")(*_to(DEVICE, x, w13, w2, w, ids))
    torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-4)


def test_mixed_tail_slices_reach_the_kernels_aligned(monkeypatch):
    """A mixed batch's decode tail is a slice at an odd offset of the batch tensors; the
    kernels must get 16-byte aligned pointers (Triton compiles one variant per alignment:
    a new one in the middle of serving cost ~0.5 s per mixed pass on the H200) and the
    same result as native decode attention on the slices."""
    from portaserve.platforms.triton_kernels import attention as ta

    g = torch.Generator().manual_seed(5)
    seq = [9, 40, 3, 77, 12]
    H, Hk, D = 4, 2, 32
    k, v, r2t, rows = _paged_setup(g, seq, [0] * len(seq), H, Hk, D, torch.float32)
    q = torch.randn(len(seq), H, D, generator=g)
    seq_lens = torch.tensor(seq)
    ref = native.attention_decode(q[1:], k, v, r2t, rows[1:], seq_lens[1:], D ** -0.5)
    q, k, v, r2t, rows, seq_lens = _to(DEVICE, q, k, v, r2t, rows, seq_lens)
    tail_rows, tail_lens = rows[1:], seq_lens[1:]  # int64 at offset 8: not 16-byte aligned
    assert tail_rows.data_ptr() % 16 and tail_lens.data_ptr() % 16
    seen = []
    kernel = ta._decode_stage1

    class Spy:  # the launch ta._decode makes, with its pointer arguments' alignment noted
        def __getitem__(self, grid):
            def call(*args, **kw):
                seen.append([a.data_ptr() % 16 for a in args[:7] if isinstance(a, torch.Tensor)])
                return kernel[grid](*args, **kw)
            return call

    monkeypatch.setattr(ta, "_decode_stage1", Spy())
    out = ta.attention_decode(q[1:], k, v, r2t, tail_rows, tail_lens, D ** -0.5)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)
    assert seen and all(m == 0 for m in seen[0]), seen


def test_the_register_cap_goes_to_nvidia_launches_only(monkeypatch):
    """Launch.maxnreg is an NVIDIA compile option: Triton's AMD and Intel backends refuse
    an unknown launch keyword, so _options leaves it out there (found by review: fp8 decode
    on XPU would have failed at its first launch)."""
    from portaserve.platforms.triton_kernels import attention as ta

    cfg = ta.Launch(warps=4, maxnreg=128)
    monkeypatch.setattr(torch.version, "hip", None)
    assert ta._options(cfg, torch.device("cuda")) == {"num_warps": 4, "maxnreg": 128}
    assert ta._options(cfg, torch.device("xpu")) == {"num_warps": 4}
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert ta._options(cfg, torch.device("cuda")) == {"num_warps": 4}
