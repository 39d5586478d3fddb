"""Op providers against the native oracle, and the native ops against independent
brute-force references.

* ``test_provider_matches_native``: every registered provider whose ``check`` passes on
  this host's platform (``resolve_platform()``, which honours PORTASERVE_DEVICE) runs on
  fresh random inputs from the op's factory in ``SPECS`` and is compared with the native
  op.  New providers (Triton, FlashInfer, ...) are picked up automatically; a new op must
  add a factory to ``SPECS`` (``test_every_op_has_a_factory``).
* The ``test_native_*`` tests check the native ops themselves against straightforward
  reimplementations (loops, float64, complex numbers, explicit masks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import portaserve.platforms.providers  # noqa: F401  (registers every provider)
from portaserve.core.ops import native
from portaserve.core.ops.registry import OPS, PROVIDERS
from portaserve.platforms import resolve_platform
from tests.quant_inputs import GEMM_TOL, make_fp8_scaled_mm, make_int4_gemm, make_int8_scaled_mm

PLATFORM = resolve_platform()
DEVICE = PLATFORM.device()


# ---- input factories ----------------------------------------------------------------------
# Each factory takes (generator, device, dtype) and returns the op's positional args.
# Random sizes come from the generator, so each seed is a different shape.
def _randint(g, lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(dtype)


def make_rmsnorm(g, device, dtype):
    D = _randint(g, 1, 6) * 16
    shape = [(_randint(g, 1, 9), D), (_randint(g, 1, 5), _randint(g, 1, 4), D)][_randint(g, 0, 1)]
    x = _randn(g, *shape, dtype=dtype, scale=3.0)
    w = (1 + 0.5 * _randn(g, D)).to(dtype)
    return x.to(device), w.to(device), [1e-6, 1e-5][_randint(g, 0, 1)]


def make_fused_add_rmsnorm(g, device, dtype):
    x, w, eps = make_rmsnorm(g, device, dtype)
    r = _randn(g, *x.shape, dtype=dtype).to(device)
    return x, r, w, eps


def make_silu_and_mul(g, device, dtype):
    inter = _randint(g, 1, 8) * 8
    lead = [(_randint(g, 1, 9),), (_randint(g, 1, 3), _randint(g, 1, 4))][_randint(g, 0, 1)]
    return (_randn(g, *lead, 2 * inter, dtype=dtype, scale=3.0).to(device),)


def rope_cache(rot: int, max_pos: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat((ang.cos(), ang.sin()), dim=-1).float()


def make_rotary(g, device, dtype, is_neox=None):
    D = [32, 64, 48][_randint(g, 0, 2)]
    rot = [D, D // 2][_randint(g, 0, 1)]  # full or partial rotary
    T, H, Hk = _randint(g, 1, 12), _randint(g, 1, 4), _randint(g, 1, 2)
    max_pos = 200
    positions = torch.randint(0, max_pos, (T,), generator=g)
    q = _randn(g, T, H, D, dtype=dtype)
    k = _randn(g, T, Hk, D, dtype=dtype)
    if is_neox is None:
        is_neox = bool(_randint(g, 0, 1))
    return (positions.to(device), q.to(device), k.to(device), rope_cache(rot, max_pos).to(device),
            is_neox)


def make_kv_store(g, device, dtype):
    S, Hk, D = _randint(g, 8, 40), _randint(g, 1, 3), [8, 16][_randint(g, 0, 1)]
    T = _randint(g, 1, S - 1)
    k_cache = _randn(g, S, Hk, D, dtype=dtype)
    v_cache = _randn(g, S, Hk, D, dtype=dtype)
    loc = (torch.randperm(S - 1, generator=g)[:T] + 1).to(torch.int64)
    k = _randn(g, T, Hk, D, dtype=dtype)
    v = _randn(g, T, Hk, D, dtype=dtype)
    return tuple(t.to(device) for t in (k_cache, v_cache, loc, k, v))


def make_rotary_kv_store(g, device, dtype):
    # q, k, v as views of one fused projection output (the model's layout: strided rows)
    positions, q, k, cos_sin, is_neox = make_rotary(g, device, dtype)
    T, H, D = q.shape
    Hk = k.shape[1]
    qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), _randn(g, T, Hk * D, dtype=dtype).to(device)], 1)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hk * D, Hk * D], 1))
    S = T + _randint(g, 1, 9)
    k_cache = _randn(g, S, Hk, D, dtype=dtype).to(device)
    v_cache = _randn(g, S, Hk, D, dtype=dtype).to(device)
    loc = (torch.randperm(S - 1, generator=g)[:T] + 1).to(device)
    return positions, q, k, v, cos_sin, is_neox, k_cache, v_cache, loc


@dataclass
class PagedBatch:
    """Requests over a KV pool with scattered slots.  Slot 0 is the zeroed padding slot;
    unused slots hold large garbage so reading a wrong slot shows."""
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    req_to_token: torch.Tensor  # [rows, ctx] int32
    rows: torch.Tensor  # [B] int64, the request rows
    prefix_lens: list
    extend_lens: list
    H: int
    scale: float


def make_paged(g, dtype, prefix_lens, extend_lens, H, Hk, D, Dv=None):
    Dv = Dv or D
    B = len(prefix_lens)
    totals = [p + e for p, e in zip(prefix_lens, extend_lens)]
    S = sum(totals) + 1 + _randint(g, 0, 16)
    k_cache = _randn(g, S, Hk, D, scale=50.0)
    v_cache = _randn(g, S, Hk, Dv, scale=50.0)
    k_cache[0] = 0
    v_cache[0] = 0
    perm = torch.randperm(S - 1, generator=g) + 1
    rows = torch.randperm(B + 3, generator=g)[:B].to(torch.int64)
    r2t = torch.zeros(B + 3, max(totals) + 4, dtype=torch.int32)
    off = 0
    for i, t in enumerate(totals):
        slots = perm[off:off + t]
        off += t
        r2t[rows[i], :t] = slots.to(torch.int32)
        # the slots a request uses hold ordinary values
        k_cache[slots] = _randn(g, t, Hk, D)
        v_cache[slots] = _randn(g, t, Hk, Dv)
    return PagedBatch(k_cache.to(dtype), v_cache.to(dtype), r2t, rows, list(prefix_lens),
                      list(extend_lens), H, 1.0 / math.sqrt(D))


def _attn_shape(g):
    Hk = _randint(g, 1, 2)
    return Hk * [1, 2, 4][_randint(g, 0, 2)], Hk, [16, 32][_randint(g, 0, 1)]


def make_attention_extend(g, device, dtype):
    H, Hk, D = _attn_shape(g)
    B = _randint(g, 1, 4)
    prefix = [_randint(g, 0, 12) for _ in range(B)]
    extend = [_randint(g, 1, 9) for _ in range(B)]
    pb = make_paged(g, dtype, prefix, extend, H, Hk, D)
    q = _randn(g, sum(extend), H, D, dtype=dtype)
    return (q.to(device), pb.k_cache.to(device), pb.v_cache.to(device), pb.req_to_token.to(device),
            pb.rows.to(device), torch.tensor(prefix, device=device),
            torch.tensor(extend, device=device), pb.scale)


def make_attention_decode(g, device, dtype):
    H, Hk, D = _attn_shape(g)
    B = _randint(g, 1, 5)
    seq = [_randint(g, 1, 20) for _ in range(B)]
    pb = make_paged(g, dtype, [s - 1 for s in seq], [1] * B, H, Hk, D)
    q = _randn(g, B, H, D, dtype=dtype)
    return (q.to(device), pb.k_cache.to(device), pb.v_cache.to(device), pb.req_to_token.to(device),
            pb.rows.to(device), torch.tensor(seq, device=device), pb.scale)


def make_attention_decode_shared(g, device, dtype):
    from tests.test_cascade_attention import paged_shared_batch

    H, Hk, D = _attn_shape(g)
    groups = [(_randint(g, 128, 160), _randint(g, 1, 18)) for _ in range(_randint(g, 1, 3))]
    groups[0] = (groups[0][0], max(groups[0][1], 2))  # at least one tile
    q, k, v, r2t, rows, seq, m = paged_shared_batch(g, groups, H, Hk, D, dtype, pad_tiles=_randint(g, 0, 2))
    return tuple(t.to(device) for t in (q, k, v, r2t, rows, seq)) + (D ** -0.5,) + tuple(
        t.to(device) for t in (m.kv_start, m.tile_rows, m.tile_lens, m.tile_members))


def make_apply_penalties(g, device, dtype):
    B, V = _randint(g, 1, 6), _randint(g, 4, 40)
    logits = _randn(g, B, V, scale=3.0)
    counts = torch.randint(0, 4, (B, V), generator=g, dtype=torch.int32)
    counts *= (torch.rand(B, V, generator=g) < 0.4).to(torch.int32)
    seen = (torch.rand(B, V, generator=g) < 0.3) | (counts > 0)
    freq = (torch.rand(B, generator=g) * 4 - 2) * (torch.rand(B, generator=g) < 0.7)
    pres = (torch.rand(B, generator=g) * 4 - 2) * (torch.rand(B, generator=g) < 0.7)
    rep = torch.where(torch.rand(B, generator=g) < 0.7, 0.5 + 1.5 * torch.rand(B, generator=g),
                      torch.ones(B))
    return tuple(t.to(device) for t in (logits, counts, seen, freq, pres, rep))


def make_argmax(g, device, dtype):
    """Rows with ties (small integers) or with a single winner, across the kernel's blocks."""
    B, V = _randint(g, 1, 6), _randint(g, 2, 9000)
    if _randint(g, 0, 1):
        x = torch.randint(-3, 4, (B, V), generator=g).float()
    else:
        x = _randn(g, B, V)
    return (x.to(device=device, dtype=dtype),)


def make_sample(g, device, dtype, filtered=None):
    """Filter thresholds sit midway between the values they separate, so float rounding of
    the cumulative sums cannot flip a decision."""
    B, V = _randint(g, 1, 8), _randint(g, 2, 40)
    probs = torch.softmax(_randn(g, B, V, scale=2.0).double(), dim=-1)
    sp, _ = probs.sort(dim=-1, descending=True)
    excl = sp.cumsum(-1) - sp  # probability mass ranked above each token
    if filtered is None:
        filtered = _randint(g, 0, 3) > 0
    top_k = torch.zeros(B, dtype=torch.int64)
    top_p = torch.ones(B, dtype=torch.float64)
    min_p = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        if not filtered:
            continue
        for which in range(3):
            if _randint(g, 0, 1) == 0:
                continue
            m = _randint(g, 0, V - 1)  # keep ranks 0..m by this criterion
            if which == 0:
                top_k[b] = m + 1
            elif which == 1 and m < V - 1:
                top_p[b] = float(excl[b, m] + excl[b, m + 1]) / 2
            elif which == 2 and m < V - 1:
                min_p[b] = float(sp[b, m] + sp[b, m + 1]) / 2 / float(sp[b, 0])
    noise = torch.empty(B, V, dtype=torch.float64).exponential_(generator=g)
    return (probs.float().to(device), top_k.to(device), top_p.float().to(device),
            min_p.float().to(device), noise.float().to(device))


def make_linear(g, device, dtype):
    # one row (the batch-1 GEMV path) or several; the weight sometimes a row slice of a
    # fused projection (a row stride longer than K)
    T, K, N = (1 if _randint(g, 0, 1) else _randint(g, 2, 9)), _randint(g, 1, 300), _randint(g, 1, 70)
    w = _randn(g, N + 5, K + _randint(g, 0, 1) * 8, dtype=dtype, scale=K ** -0.5).to(device)[2:N + 2, :K]
    return _randn(g, T, K, dtype=dtype).to(device), w


def make_moe_topk(g, device, dtype):
    T, E = _randint(g, 1, 12), _randint(g, 2, 10)
    k = _randint(g, 1, min(4, E))
    return _randn(g, T, E, dtype=dtype, scale=2.0).to(device), k, bool(_randint(g, 0, 1))


def make_fused_moe(g, device, dtype):
    T, H, I, E = _randint(g, 1, 20), _randint(g, 1, 4) * 16, _randint(g, 1, 4) * 16, _randint(g, 2, 8)
    k = _randint(g, 1, min(3, E))
    x = _randn(g, T, H, dtype=dtype)
    w13 = _randn(g, E, 2 * I, H, dtype=dtype, scale=0.2)
    w2 = _randn(g, E, H, I, dtype=dtype, scale=0.2)
    w, ids = native.moe_topk(_randn(g, T, E, scale=2.0), k, True)
    return (x.to(device), w13.to(device), w2.to(device), w.to(dtype).to(device), ids.to(device))


# ---- op specs ----------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float32, torch.bfloat16)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@dataclass
class OpSpec:
    make: Callable
    # tensors to compare after a call: fn(args, return value) -> list of tensors
    outputs: Callable = lambda args, ret: list(ret) if isinstance(ret, tuple) else [ret]
    dtypes: tuple = FLOAT_DTYPES
    exact: bool = False
    tol: dict = None  # per dtype, instead of TOL


SPECS: dict[str, OpSpec] = {
    "rmsnorm": OpSpec(make_rmsnorm),
    "fused_add_rmsnorm": OpSpec(make_fused_add_rmsnorm),
    "silu_and_mul": OpSpec(make_silu_and_mul),
    "rotary_embedding": OpSpec(make_rotary),
    "kv_store": OpSpec(make_kv_store, outputs=lambda args, ret: [args[0], args[1]]),
    "rotary_kv_store": OpSpec(make_rotary_kv_store, outputs=lambda args, ret: [ret, args[6], args[7]]),
    "attention_extend": OpSpec(make_attention_extend),
    "attention_decode": OpSpec(make_attention_decode),
    "attention_decode_shared": OpSpec(make_attention_decode_shared),
    "apply_penalties": OpSpec(make_apply_penalties, dtypes=(torch.float32,)),
    "top_k_top_p_min_p_sample": OpSpec(make_sample, dtypes=(torch.float32,), exact=True),
    "argmax": OpSpec(make_argmax, exact=True),
    "moe_topk": OpSpec(make_moe_topk),
    "fused_moe": OpSpec(make_fused_moe),
    "linear": OpSpec(make_linear, tol=GEMM_TOL),
    # quantized GEMMs: providers accumulate in another order and round through bf16
    "fp8_scaled_mm": OpSpec(make_fp8_scaled_mm, tol=GEMM_TOL),
    "int8_scaled_mm": OpSpec(make_int8_scaled_mm, tol=GEMM_TOL),
    "int4_gemm": OpSpec(make_int4_gemm, tol=GEMM_TOL),
}


def _clone(args):
    # same strides as the original (views of a fused projection stay strided views)
    return tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
                 if isinstance(a, torch.Tensor) else a for a in args)


def _usable_providers():
    cases = []
    for (op, name), prov in PROVIDERS.items():
        if op in SPECS and prov.check(PLATFORM.name) is None:
            for dt in SPECS[op].dtypes:
                if dt in PLATFORM.supported_dtypes:
                    cases.append(pytest.param(op, name, dt, id=f"{op}-{name}-{str(dt)[6:]}"))
    return cases


def test_every_op_has_a_factory():
    # collectives need a process group: tests/test_tensor_parallel.py checks them on two ranks
    # attention_prepare is a planning hook with no output of its own: the attention ops
    # it plans for are what gets checked (tests/gpu for FlashInfer, its one planner)
    local_ops = {name for name, d in OPS.items() if d.family != "collective"} - {"attention_prepare"}
    assert set(SPECS) == local_ops, "give every declared op an input factory in SPECS"


@pytest.mark.parametrize("op,provider,dtype", _usable_providers())
@pytest.mark.parametrize("seed", range(6))
def test_provider_matches_native(op, provider, dtype, seed):
    spec = SPECS[op]
    fn = PROVIDERS[(op, provider)].load()
    if provider == "native":
        assert fn is OPS[op].native, "the native provider's target is not the declared op"
    g = torch.Generator().manual_seed(1000 * seed + len(op))
    args = spec.make(g, DEVICE, dtype)
    ref_args, got_args = _clone(args), _clone(args)
    ref = spec.outputs(ref_args, OPS[op].native(*ref_args))
    got = spec.outputs(got_args, fn(*got_args))
    assert len(ref) == len(got)
    for r, o in zip(ref, got):
        assert o.shape == r.shape and o.dtype == r.dtype and o.device.type == r.device.type
        if spec.exact:
            assert torch.equal(o.cpu(), r.cpu())
        else:
            torch.testing.assert_close(o.cpu().float(), r.cpu().float(), **(spec.tol or TOL)[dtype])


# ---- native ops against independent references ------------------------------------------------
SEEDS = range(8)


def _close(got, want, dtype):
    torch.testing.assert_close(got.double(), want.double().to(got.device), **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_native_rmsnorm(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x, w, eps = make_rmsnorm(g, "cpu", dtype)
    xd = x.double()
    want = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * w.double()
    got = native.rmsnorm(x, w, eps)
    assert got.dtype == dtype and got.shape == x.shape
    _close(got, want, dtype)

    r = _randn(g, *x.shape, dtype=dtype)
    normed, res = native.fused_add_rmsnorm(x, r, w, eps)
    s = x + r
    torch.testing.assert_close(res, s)
    sd = s.double()
    _close(normed, sd / torch.sqrt((sd * sd).mean(-1, keepdim=True) + eps) * w.double(), dtype)


def test_native_rmsnorm_small_inputs_where_eps_matters():
    x = torch.full((3, 16), 1e-3)
    x[1] *= -2.0
    x[2, ::2] = 0.0
    w = torch.linspace(0.5, 1.5, 16)
    for eps in (1e-6, 1e-5):
        xd = x.double()
        want = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * w.double()
        torch.testing.assert_close(native.rmsnorm(x, w, eps).double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_native_silu_and_mul(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    (x,) = make_silu_and_mul(g, "cpu", dtype)
    d = x.shape[-1] // 2
    gate, up = x[..., :d].double(), x[..., d:].double()
    want = gate / (1 + torch.exp(-gate)) * up
    got = native.silu_and_mul(x)
    assert got.shape == (*x.shape[:-1], d)
    _close(got, want, dtype)


def rotary_reference(positions, x, rot, is_neox, base=10000.0):
    """Rotate pairs of x as complex numbers by position * frequency (float64)."""
    half = rot // 2
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    rotor = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                        positions.double()[:, None] * inv[None])[:, None, :]  # [T, 1, R/2]
    xr = x[..., :rot].double()
    if is_neox:  # pairs (i, i + R/2)
        z = torch.complex(xr[..., :half], xr[..., half:]) * rotor
        out = torch.cat((z.real, z.imag), dim=-1)
    else:  # pairs (2i, 2i + 1)
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * rotor
        out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((out, x[..., rot:].double()), dim=-1)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_native_rotary(seed, dtype, is_neox):
    g = torch.Generator().manual_seed(seed)
    positions, q, k, cache, _ = make_rotary(g, "cpu", dtype, is_neox)
    rot = cache.shape[-1]
    q0, k0 = q.clone(), k.clone()
    qo, ko = native.rotary_embedding(positions, q, k, cache, is_neox)
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    _close(qo, rotary_reference(positions, q0, rot, is_neox), dtype)
    _close(ko, rotary_reference(positions, k0, rot, is_neox), dtype)
    # the part beyond the rotary dim passes through untouched
    assert torch.equal(qo[..., rot:], q0[..., rot:])


def test_native_rotary_layouts_differ():
    """Guard against a reference that cannot tell the two layouts apart."""
    g = torch.Generator().manual_seed(0)
    positions, q, k, cache, _ = make_rotary(g, "cpu", torch.float32, True)
    a = native.rotary_embedding(positions.clamp(min=1), q, k, cache, True)[0]
    b = native.rotary_embedding(positions.clamp(min=1), q, k, cache, False)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("seed", SEEDS)
def test_native_kv_store(seed):
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache, loc, k, v = make_kv_store(g, "cpu", torch.float32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(loc.tolist()):
        want_k[slot] = k[t]
        want_v[slot] = v[t]
    assert native.kv_store(k_cache, v_cache, loc, k, v) is None
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    # a bf16 cache stores the rounded values
    kb, vb = torch.zeros(k_cache.shape, dtype=torch.bfloat16), torch.zeros(v_cache.shape, dtype=torch.bfloat16)
    native.kv_store(kb, vb, loc, k, v)
    assert torch.equal(kb[loc], k.to(torch.bfloat16)) and torch.equal(vb[loc], v.to(torch.bfloat16))


def attention_reference(q_rows, pb: PagedBatch, positions_of_rows, req_of_rows):
    """Brute force: for each query row and head, softmax over an explicitly masked
    score row of q . k_l for every cached position l of its request, then sum p_l v_l."""
    H = pb.H
    Hk = pb.k_cache.shape[1]
    group = H // Hk
    out = torch.zeros(q_rows.shape[0], H, pb.v_cache.shape[-1], dtype=torch.float64)
    for t in range(q_rows.shape[0]):
        i, pos = req_of_rows[t], positions_of_rows[t]
        total = pb.prefix_lens[i] + pb.extend_lens[i]
        row = int(pb.rows[i])
        slots = [int(pb.req_to_token[row, l]) for l in range(total)]
        mask = [l <= pos for l in range(total)]  # causal: keys at or before the query
        for h in range(H):
            kvh = h // group
            scores = []
            for l in range(total):
                if mask[l]:
                    kl = pb.k_cache[slots[l], kvh].double()
                    scores.append(float(q_rows[t, h].double() @ kl) * pb.scale)
                else:
                    scores.append(-math.inf)
            mx = max(scores)
            w = [math.exp(s - mx) for s in scores]
            z = sum(w)
            for l in range(total):
                if w[l]:
                    out[t, h] += (w[l] / z) * pb.v_cache[slots[l], kvh].double()
    return out


def _extend_case(g, dtype, prefix, extend, H, Hk, D, Dv=None):
    pb = make_paged(g, dtype, prefix, extend, H, Hk, D, Dv)
    q = _randn(g, sum(extend), H, D, dtype=dtype)
    pos, req = [], []
    for i, (p, e) in enumerate(zip(prefix, extend)):
        pos += list(range(p, p + e))
        req += [i] * e
    return pb, q, pos, req


ATTN_CASES = [
    # (prefix lens, extend lens, H, Hk, D)
    ([0], [7], 4, 4, 16),  # plain causal prefill, MHA
    ([5, 0, 12], [3, 6, 1], 8, 2, 32),  # GQA 4:1, mixed prefix/extend lengths
    ([9, 3], [4, 11], 6, 3, 16),  # GQA 2:1
    ([1, 16, 4, 0], [1, 2, 9, 1], 4, 1, 16),  # MQA, single-token extends
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
def test_native_attention_extend(case, dtype):
    prefix, extend, H, Hk, D = ATTN_CASES[case]
    g = torch.Generator().manual_seed(case)
    pb, q, pos, req = _extend_case(g, dtype, prefix, extend, H, Hk, D)
    got = native.attention_extend(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.rows,
                                  torch.tensor(prefix), torch.tensor(extend), pb.scale)
    assert got.shape == (sum(extend), H, D) and got.dtype == dtype
    _close(got, attention_reference(q, pb, pos, req), dtype)


def test_native_attention_extend_v_head_dim():
    g = torch.Generator().manual_seed(7)
    prefix, extend = [3, 0], [2, 4]
    pb, q, pos, req = _extend_case(g, torch.float32, prefix, extend, 4, 2, 32, Dv=16)
    got = native.attention_extend(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.rows,
                                  torch.tensor(prefix), torch.tensor(extend), pb.scale)
    assert got.shape == (6, 4, 16)
    _close(got, attention_reference(q, pb, pos, req), torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_native_attention_decode(seed, dtype):
    g = torch.Generator().manual_seed(100 + seed)
    H, Hk, D = [(4, 4, 16), (8, 2, 32), (6, 3, 16), (4, 1, 16)][seed]
    seq = [_randint(g, 1, 24) for _ in range(_randint(g, 1, 5))]
    B = len(seq)
    pb = make_paged(g, dtype, [s - 1 for s in seq], [1] * B, H, Hk, D)
    q = _randn(g, B, H, D, dtype=dtype)
    seq_lens = torch.tensor(seq)
    got = native.attention_decode(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.rows, seq_lens,
                                  pb.scale)
    assert got.shape == (B, H, D) and got.dtype == dtype
    _close(got, attention_reference(q, pb, [s - 1 for s in seq], list(range(B))), dtype)
    # decode == extend of one token over a prefix of seq_len - 1
    ext = native.attention_extend(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.rows,
                                  seq_lens - 1, torch.ones(B, dtype=torch.int64), pb.scale)
    torch.testing.assert_close(got.float(), ext.float(), **TOL[dtype])


def test_native_attention_ignores_other_slots():
    """Changing K/V in slots no request uses (or beyond seq_len) changes nothing."""
    g = torch.Generator().manual_seed(3)
    seq = [5, 9]
    pb = make_paged(g, torch.float32, [4, 8], [1, 1], 4, 2, 16)
    q = _randn(g, 2, 4, 16)
    args = (pb.req_to_token, pb.rows, torch.tensor(seq), pb.scale)
    before = native.attention_decode(q, pb.k_cache, pb.v_cache, *args)
    used = {int(s) for i, r in enumerate(pb.rows) for s in pb.req_to_token[r, :seq[i]]}
    k2, v2 = pb.k_cache.clone(), pb.v_cache.clone()
    for s in range(1, k2.shape[0]):
        if s not in used:
            k2[s] = 1e4
            v2[s] = -1e4
    torch.testing.assert_close(native.attention_decode(q, k2, v2, *args), before)


def penalties_reference(logits, counts, seen, freq, pres, rep):
    """HF/CTRL repetition penalty on the model's logits of every seen token, then the
    OpenAI penalties: minus frequency * count, minus presence if the token was output."""
    out = logits.clone().double()
    B, V = logits.shape
    for b in range(B):
        for v in range(V):
            x = float(logits[b, v])
            if seen[b, v]:
                x = x / float(rep[b]) if x > 0 else x * float(rep[b])
            c = int(counts[b, v])
            x -= float(freq[b]) * c
            if c > 0:
                x -= float(pres[b])
            out[b, v] = x
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_native_apply_penalties(seed):
    g = torch.Generator().manual_seed(seed)
    args = make_apply_penalties(g, "cpu", torch.float32)
    logits0 = args[0].clone()
    got = native.apply_penalties(*args)
    assert torch.equal(args[0], logits0), "logits were modified in place"
    torch.testing.assert_close(got.double(), penalties_reference(*args), atol=1e-5, rtol=1e-5)


def test_native_apply_penalties_worked_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2, 1, 1, 0]], dtype=torch.int32)
    seen = torch.tensor([[True, True, True, False]])
    got = native.apply_penalties(logits, counts, seen, torch.tensor([0.5]), torch.tensor([1.0]),
                                 torch.tensor([2.0]))
    # 2/2 - 0.5*2 - 1 = -1 ; -1*2 - 0.5 - 1 = -3.5 ; 0.5/2 - 0.5 - 1 = -1.25 ; 3 untouched
    torch.testing.assert_close(got, torch.tensor([[-1.0, -3.5, -1.25, 3.0]]))


def sample_reference(probs, top_k, top_p, min_p, noise):
    """Per row: rank tokens by probability; keep rank r if r < k, the mass ranked above
    it is < top_p and p >= min_p * p_max (the top token always); among the kept tokens
    pick argmax p / noise."""
    out = []
    B, V = probs.shape
    for b in range(B):
        p = probs[b].tolist()
        order = sorted(range(V), key=lambda j: -p[j])
        k = int(top_k[b]) if int(top_k[b]) > 0 else V
        above = 0.0
        kept = []
        for rank, j in enumerate(order):
            if rank == 0 or (rank < k and above < float(top_p[b]) and p[j] >= float(min_p[b]) * p[order[0]]):
                kept.append(j)
            above += p[j]
        out.append(max(kept, key=lambda j: p[j] / float(noise[b, j])))
    return out


@pytest.mark.parametrize("seed", range(16))
def test_native_sample_with_given_noise(seed):
    g = torch.Generator().manual_seed(seed)
    args = make_sample(g, "cpu", torch.float32, filtered=seed % 4 != 0)
    got = native.top_k_top_p_min_p_sample(*args)
    assert got.dtype == torch.int64 and got.shape == (args[0].shape[0],)
    assert got.tolist() == sample_reference(*args)


def _chi2_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard normal z."""
    a = 2.0 / (9.0 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


SAMPLE_CASES = {
    # name: (top_k, top_p, min_p, tokens expected to survive)
    "unfiltered": (0, 1.0, 0.0, 10),
    "top_k": (4, 1.0, 0.0, 4),
    "top_p": (0, 0.8, 0.0, None),
    "min_p": (0, 1.0, 0.12, None),
    "top_p_binds": (7, 0.9, 0.05, 6),  # all three active, top-p the tightest
    "min_p_binds": (8, 0.97, 0.2, 5),  # all three active, min-p the tightest
}


@pytest.mark.parametrize("name", list(SAMPLE_CASES))
def test_native_sample_distribution(name):
    top_k, top_p, min_p, _ = SAMPLE_CASES[name]
    V, N = 10, 40_000
    probs = torch.softmax(torch.linspace(2.0, -1.5, V, dtype=torch.float64), 0)
    probs = probs[torch.tensor([3, 0, 7, 1, 9, 2, 5, 4, 8, 6])]  # not sorted by id
    # the filtered, renormalised target distribution, computed directly
    order = sorted(range(V), key=lambda j: -float(probs[j]))
    keep = set()
    above = 0.0
    for rank, j in enumerate(order):
        pj = float(probs[j])
        if rank == 0 or ((top_k <= 0 or rank < top_k) and above < top_p
                         and pj >= min_p * float(probs[order[0]])):
            keep.add(j)
        above += pj
    assert 1 < len(keep) <= V
    if SAMPLE_CASES[name][3] is not None:
        assert len(keep) == SAMPLE_CASES[name][3]
    else:
        assert len(keep) < V, "the case must actually filter"
    target = torch.zeros(V, dtype=torch.float64)
    for j in keep:
        target[j] = probs[j]
    target /= target.sum()

    g = torch.Generator().manual_seed(1234)
    P = probs.float().expand(N, V).contiguous()
    noise = torch.empty(N, V).exponential_(generator=g)
    ids = native.top_k_top_p_min_p_sample(
        P, torch.full((N,), top_k), torch.full((N,), top_p), torch.full((N,), min_p), noise)
    counts = torch.bincount(ids, minlength=V).double()
    assert all(counts[j] == 0 for j in range(V) if j not in keep), "sampled a filtered token"
    exp = target * N
    idx = [j for j in range(V) if j in keep]
    chi2 = float(((counts[idx] - exp[idx]) ** 2 / exp[idx]).sum())
    assert chi2 < _chi2_quantile(len(idx) - 1, 4.0), (chi2, counts.tolist(), exp.tolist())
    # and it is not merely plausible by luck: every kept token is near its share
    assert torch.allclose(counts[idx] / N, target[idx], atol=0.015)


def test_native_moe_against_dense_loop():
    """fused_moe equals running every token through each of its experts one by one."""
    g = torch.Generator().manual_seed(5)
    x, w13, w2, w, ids = make_fused_moe(g, "cpu", torch.float32)
    T, K = ids.shape
    I = w2.shape[2]
    ref = torch.zeros_like(x, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            a = w13[e].double() @ x[t].double()
            h = torch.nn.functional.silu(a[:I]) * a[I:]
            ref[t] += float(w[t, j]) * (w2[e].double() @ h)
    torch.testing.assert_close(native.fused_moe(x, w13, w2, w, ids).double(), ref, atol=1e-4, rtol=1e-4)
    logits = _randn(g, 7, 6)
    wt, it = native.moe_topk(logits, 2, False)
    p = torch.softmax(logits.double(), -1)
    for t in range(7):
        order = sorted(range(6), key=lambda e: -float(p[t, e]))[:2]
        assert it[t].tolist() == order
        torch.testing.assert_close(wt[t].double(), p[t, order], atol=1e-6, rtol=1e-6)
    wr, _ = native.moe_topk(logits, 2, True)
    torch.testing.assert_close(wr.sum(-1), torch.ones(7))


def test_rotary_kv_store_without_a_fused_provider_runs_each_part_as_chosen():
    """Where native is chosen for rotary_kv_store (no fused kernel on the platform, or
    --kernel rotary_kv_store=native), the engine runs rotary_embedding and kv_store through
    their own chosen providers; the declared native op (the tests' oracle) stays pure torch."""
    from portaserve.core import ops

    saved = dict(ops._impl), dict(ops._fns), ops._table
    calls = []
    try:
        table = ops.resolve_ops(PLATFORM, {"rotary_kv_store": "native"})
        ops.use_table(table)
        assert table.choices["rotary_kv_store"].provider == "native"
        chosen_rotary = ops._fns["rotary_embedding"]

        def spy(*a):
            calls.append("rotary")
            return chosen_rotary(*a)

        ops._fns["rotary_embedding"] = spy
        g = torch.Generator().manual_seed(3)
        args = make_rotary_kv_store(g, DEVICE, torch.float32)
        ref_args, got_args = _clone(args), _clone(args)
        want = native.rotary_kv_store(*ref_args)
        assert calls == []  # the oracle does not dispatch
        got = ops.rotary_kv_store(*got_args)
        assert calls == ["rotary"]
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_args[6], ref_args[6])
        torch.testing.assert_close(got_args[7], ref_args[7])
    finally:
        ops._impl.clear()
        ops._impl.update(saved[0])
        ops._fns.clear()
        ops._fns.update(saved[1])
        ops._table = saved[2]
