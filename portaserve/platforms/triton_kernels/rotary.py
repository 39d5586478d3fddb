"""Rotary position embedding for q [T, H, D] and k [T, Hk, D] (neox or interleaved)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.platforms.triton_kernels import pdl


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cs_ptr, n_heads, stride_t, stride_h, stride_cs,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                 IS_NEOX: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rmask = r < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + r, mask=rmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + r, mask=rmask, other=0.0).to(tl.float32)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < n_heads
    m = hmask[:, None] & rmask[None, :]
    base = x_ptr + t * stride_t + h[:, None] * stride_h
    if IS_NEOX:
        o1 = r[None, :]
        o2 = r[None, :] + HALF
    else:
        o1 = 2 * r[None, :]
        o2 = 2 * r[None, :] + 1
    x1 = tl.load(base + o1, mask=m, other=0.0)
    x2 = tl.load(base + o2, mask=m, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    y1 = x1f * cos[None, :] - x2f * sin[None, :]
    y2 = x2f * cos[None, :] + x1f * sin[None, :]
    tl.store(base + o1, y1.to(x1.dtype), mask=m)
    tl.store(base + o2, y2.to(x1.dtype), mask=m)


def _apply(x, positions, cos_sin_cache, is_neox):
    out = x.clone(memory_format=torch.contiguous_format)  # the op returns new tensors
    T, H, D = out.shape
    if T == 0:
        return out
    half = cos_sin_cache.shape[-1] // 2
    BLOCK_H = min(16, triton.next_power_of_2(H))
    _rope_kernel[(T, triton.cdiv(H, BLOCK_H))](
        out, positions, cos_sin_cache, H, out.stride(0), out.stride(1), cos_sin_cache.stride(0),
        HALF=half, BLOCK_H=BLOCK_H, BLOCK_R=triton.next_power_of_2(half), IS_NEOX=is_neox)
    return out


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True):
    return _apply(q, positions, cos_sin_cache, is_neox), _apply(k, positions, cos_sin_cache, is_neox)


# ---- rotary + KV store in one launch -----------------------------------------------------
@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, loc_ptr, cs_ptr,
                       n_q, n_kv, q_blocks, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                       s_kcs, s_kch, s_vcs, s_vch, s_cs, D, HALF,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, IS_NEOX: tl.constexpr,
                       PDL: tl.constexpr):
    pdl.start(PDL)
    pdl.wait(PDL)
    # Program (t, b): block b of q heads (b < q_blocks) rotated into qo, or block
    # b - q_blocks of KV heads: k rotated and v copied into the cache at slot loc[t].
    # Each element pairs with its rotation partner (neox: d +- HALF; interleaved: d ^ 1);
    # elements past the rotary dim 2*HALF pass through.
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    rot = d < 2 * HALF
    if IS_NEOX:
        first = d < HALF
        partner = tl.where(first, d + HALF, d - HALF)
        ci = tl.where(first, d, d - HALF)
    else:
        first = (d % 2) == 0
        partner = tl.where(first, d + 1, d - 1)
        ci = d // 2
    partner = tl.where(rot, partner, d)
    cmask = dmask & rot
    cos = tl.load(cs_ptr + pos * s_cs + ci, mask=cmask, other=1.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + ci, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.where(first, -sin, sin)  # y = x cos - partner sin (first), x cos + partner sin
    if b < q_blocks:
        h = b * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h < n_q)[:, None] & dmask[None, :]
        src = q_ptr + t * s_qt + h[:, None] * s_qh
        x = tl.load(src + d[None, :], mask=m, other=0.0)
        xp = tl.load(src + partner[None, :], mask=m, other=0.0).to(tl.float32)
        y = x.to(tl.float32) * cos[None, :] + xp * sin[None, :]
        tl.store(qo_ptr + t * s_ot + h[:, None] * s_oh + d[None, :], y.to(x.dtype), mask=m)
    else:
        slot = tl.load(loc_ptr + t).to(tl.int64)
        h = (b - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h < n_kv)[:, None] & dmask[None, :]
        src = k_ptr + t * s_kt + h[:, None] * s_kh
        x = tl.load(src + d[None, :], mask=m, other=0.0)
        xp = tl.load(src + partner[None, :], mask=m, other=0.0).to(tl.float32)
        ky = (x.to(tl.float32) * cos[None, :] + xp * sin[None, :]).to(x.dtype)  # as the model's k,
        tl.store(kc_ptr + slot * s_kcs + h[:, None] * s_kch + d[None, :],  # then the cache's dtype
                 ky.to(kc_ptr.dtype.element_ty), mask=m)
        vv = tl.load(v_ptr + t * s_vt + h[:, None] * s_vh + d[None, :], mask=m, other=0.0)
        tl.store(vc_ptr + slot * s_vcs + h[:, None] * s_vch + d[None, :],
                 vv.to(vc_ptr.dtype.element_ty), mask=m)


def rotary_kv_store(positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache, loc):
    """Rotary on q and k, k and v stored into the caches at slots loc; returns the rotated q.
    One launch per layer instead of rotary's two (plus their copies) and the store's two."""
    T, H, D = q.shape
    if (k_cache.element_size() == 1 or any(t.stride(-1) != 1 for t in (q, k, v))
            or not v.shape[-1] == k_cache.shape[-1] == v_cache.shape[-1] == D):
        # fp8 caches saturate on store (native's clamp); other layouts: the two ops as chosen
        from portaserve.core import ops

        q, k = ops.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
        ops.kv_store(k_cache, v_cache, loc, k, v)
        return q
    Hk = k.shape[1]
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    BLOCK_H = min(16, triton.next_power_of_2(max(H, Hk)))
    q_blocks = triton.cdiv(H, BLOCK_H)
    _rope_store_kernel[(T, q_blocks + triton.cdiv(Hk, BLOCK_H))](
        q, k, v, out, k_cache, v_cache, positions, loc, cos_sin_cache, H, Hk, q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), cos_sin_cache.stride(0), D, cos_sin_cache.shape[-1] // 2,
        BLOCK_H=BLOCK_H, BLOCK_D=triton.next_power_of_2(D), IS_NEOX=is_neox, **pdl.launch(q.device))
    return out


_SELFTEST: dict = {}


def selftest(model: dict) -> str | None:
    """The registry's model check: compile the fused kernel on the accelerator for the
    model's dtype, head size and KV cache dtype and compare it with the native ops on a few
    tokens before it is chosen.  None when it agrees (or there is nothing to test: no
    accelerator, no model shape yet), else the reason (native is then chosen, which runs
    the two ops through their own providers)."""
    from portaserve.core.ops import native
    from portaserve.platforms.triton_kernels import selftest as st

    dev, dt, kv, D = st.accel_device(), model.get("dtype"), model.get("kv_dtype"), model.get("head_dim")
    if dev is None or dt is None or D is None:
        return None
    kv = kv or dt

    def check():
        g = torch.Generator().manual_seed(0)
        T, S = 5, 16
        H, Hk = model.get("heads") or 4, model.get("kv_heads") or 2  # the engine's variant
        qkv = torch.randn(T, (H + 2 * Hk) * D, generator=g).to(dt)
        q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hk * D, Hk * D], 1))
        pos, loc = torch.tensor([0, 1, 7, 100, 3]), torch.tensor([3, 9, 1, 15, 4])
        cs = torch.randn(128, D, generator=g)
        kc, vc = torch.zeros(S, Hk, D, dtype=kv), torch.zeros(S, Hk, D, dtype=kv)
        want_q = native.rotary_kv_store(pos, q, k, v, cs, True, kc, vc, loc)
        qkv_d = qkv.to(dev)
        qd, kd, vd = (t.view(T, -1, D) for t in qkv_d.split([H * D, Hk * D, Hk * D], 1))
        kcd, vcd = torch.zeros_like(kc, device=dev), torch.zeros_like(vc, device=dev)
        got_q = rotary_kv_store(pos.to(dev), qd, kd, vd, cs.to(dev), True, kcd, vcd, loc.to(dev))
        tol = 1e-5 if dt == torch.float32 else 2e-2
        ok = (torch.allclose(got_q.cpu().float(), want_q.float(), atol=tol, rtol=tol)
              and torch.allclose(kcd.cpu().float(), kc.float(), atol=tol, rtol=tol)
              and torch.equal(vcd.cpu().float(), vc.float()))
        return None if ok else f"fused rotary + KV store disagrees with native on {dev}"

    return st.once(_SELFTEST, (str(dev), dt, kv, D), dev, "fused rotary + KV store", check)
