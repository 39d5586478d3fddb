"""Weight-only INT4 GEMM for the AWQ and GPTQ layouts: Triton kernels that unpack and
dequantize tiles of W^T in registers, so the 4-bit weights are read from memory once and
never written back dequantized.

Same contract as ``portaserve.core.ops.native.int4_gemm`` (layouts documented in
``portaserve.core.ops.quant``).

Two kernels:

* ``_decode_kernel`` -- AWQ, and GPTQ without act-order, M <= 64 (decode).  A GEMV / split-K
  kernel: each program owns BLOCK_N = 8 * BLOCK_W output columns and a slice of K, loads
  every packed word once (cp.async, pipelined) and keeps its eight nibbles in registers.
  M == 1 ("fma" mode): a nibble-major [8, BLOCK_K, BLOCK_W] tile (no reshape, no shuffle;
  the AWQ column interleave touches only the scale loads and the output store); q becomes
  the float 1 + q/16 by OR-ing it into the mantissa of 1.0 (no int->float conversion, which
  runs at a fraction of the FMA rate), one FFMA per weight accumulates x * (1 + q/16), rows
  a thread holds are folded in registers, and the group's zero point and scale are applied
  to those partial sums: sum x (q - z) s = s (16 sum x (1 + q/16) - (16 + z) sum x).
  2 <= M <= 64 ("dot" mode): the 16-bit bits of 128 + q (bf16) / 1024 + q (fp16) go to
  tl.dot, (128 + z) * sum(x) is subtracted and the scale applied per [M, BLOCK_N] tile.
  The grid is (N / BLOCK_N) x split, sized to fill the SMs; float32 partials [split, M, N]
  (L2-resident, at most half the weight bytes) are summed and cast by one small reduction
  kernel (or the result is stored directly when split == 1).
  GPTQ (words along K) takes the same two modes; there the nibble dim is a K sub-index,
  so the FMA mode folds it in registers directly and columns need no permutation.
* ``_int4_gemm_kernel`` -- every layout (AWQ, GPTQ, act-order g_idx) and any M: a tiled
  dequant-GEMM with tl.dot, split-K for small grids; used for 64 < M < 256 and act-order.
* ``_dequant_kernel`` + the vendor GEMM for prefill (M >= 256, as vLLM does for AWQ): the
  weights dequantized to the activation dtype in column chunks of at most 64 MB scratch,
  then ``x @ W`` on cuBLAS / hipBLAS, whose large-M efficiency a dequant-in-the-loop
  Triton kernel does not reach; the extra weight traffic is small next to the GEMM.

Startup self-test (``selftest()``, the provider's requirement): both kernels compiled on
the device and checked against the oracle on tiny shapes; a failing general kernel
rejects the provider (native runs, the reason is in the op table), a failing decode
kernel is disabled with a warning.  At call time a kernel that fails to compile for a new
shape also falls back (decode -> general -> native) with one warning, never an exception.
"""
from __future__ import annotations

import logging
import warnings

import torch
import triton
import triton.language as tl

_log = logging.getLogger(__name__)

_LAYOUT_ID = {"awq": 0, "gptq": 1, "gptq_v2": 2}


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, gidx_ptr, y_ptr, M, N, K, k_per_split,
                      stride_xm, stride_xk, stride_q0, stride_q1, stride_s0, stride_s1,
                      stride_z0, stride_z1, stride_ys, stride_ym, stride_yn, group_size,
                      LAYOUT: tl.constexpr, HAS_GIDX: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # packed words along N
    mmask = rm < M
    nmask = rn < N
    wnmask = rw < tl.cdiv(N, 8)
    # nibble shift of the j-th column of a word: AWQ interleaves [0,2,4,6,1,3,5,7]
    # (column j sits in nibble 4*(j%2) + j//2); GPTQ's zeros are sequential
    j = tl.arange(0, 8)
    if LAYOUT == 0:
        col_shift = ((j % 2) * 4 + j // 2) * 4
    else:
        col_shift = j * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < k_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        # each packed word is loaded once and its eight nibbles spread in registers
        if LAYOUT == 0:  # AWQ qweight [K, N/8]: words along N
            qw = tl.load(qw_ptr + rk[:, None] * stride_q0 + rw[None, :] * stride_q1,
                         mask=kmask[:, None] & wnmask[None, :], other=0)
            q = tl.reshape((qw[:, :, None] >> col_shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
        else:  # GPTQ qweight [K/8, N]: words along K
            rkw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            qw = tl.load(qw_ptr + rkw[:, None] * stride_q0 + rn[None, :] * stride_q1,
                         mask=(rkw * 8 < k_end)[:, None] & nmask[None, :], other=0)
            q = tl.reshape((qw[:, None, :] >> (j * 4)[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        if GROUP_ALIGNED:  # the whole K tile is in one group: one row of scales/zeros
            g = k0 // group_size
            qz = tl.load(qz_ptr + g * stride_z0 + rw * stride_z1, mask=wnmask, other=0)
            z = tl.reshape((qz[:, None] >> col_shift[None, :]) & 0xF, (BLOCK_N,))[None, :]
            s = tl.load(s_ptr + g * stride_s0 + rn * stride_s1, mask=nmask, other=0.0)[None, :]
        else:
            if HAS_GIDX:
                g = tl.load(gidx_ptr + rk, mask=kmask, other=0)
            else:
                g = rk // group_size
            qz = tl.load(qz_ptr + g[:, None] * stride_z0 + rw[None, :] * stride_z1,
                         mask=kmask[:, None] & wnmask[None, :], other=0)
            z = tl.reshape((qz[:, :, None] >> col_shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
            s = tl.load(s_ptr + g[:, None] * stride_s0 + rn[None, :] * stride_s1,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
        if LAYOUT == 1:
            z = z + 1  # GPTQ v1 checkpoints store zero - 1
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, w, input_precision="ieee")
    tl.store(y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _config(M: int, N: int, K: int, device_type: str, esize: int):
    if device_type == "cpu":  # the interpreter: small tiles keep the tests quick
        return 16, 32, 32, 1, 1
    if M <= 64:  # decode: memory bound, long K tiles, split-K fills the device
        return (16 if M <= 16 else 32 if M <= 32 else 64), 64, 128, 4, 3
    return 128, 128, 32, 8, 3


# ---- decode: AWQ GEMV / split-K -------------------------------------------------------------
@triton.jit
def _decode_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, p_ptr, M, N, K, k_per_split,
                   stride_xm, stride_q0, stride_s0, stride_z0, stride_ps, stride_pm, group_size,
                   BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
                   X_KIND: tl.constexpr, STAGES: tl.constexpr = 3, K_FOLD: tl.constexpr = 1,
                   LAYOUT: tl.constexpr = 0):
    # preconditions (checked by the caller): K % BLOCK_K == 0, group_size % BLOCK_K == 0,
    # k_per_split % BLOCK_K == 0, N % 8 == 0, x's last dim contiguous, no g_idx
    if LAYOUT == 0:
        _awq_decode_body(x_ptr, qw_ptr, s_ptr, qz_ptr, p_ptr, M, N, K, k_per_split, stride_xm,
                         stride_q0, stride_s0, stride_z0, stride_ps, stride_pm, group_size,
                         BLOCK_M, BLOCK_W, BLOCK_K, X_KIND, STAGES, K_FOLD)
    else:
        _gptq_decode_body(x_ptr, qw_ptr, s_ptr, qz_ptr, p_ptr, M, N, K, k_per_split, stride_xm,
                          stride_q0, stride_s0, stride_z0, stride_ps, stride_pm, group_size,
                          BLOCK_M, BLOCK_W * 8, BLOCK_K, X_KIND, STAGES, LAYOUT)


@triton.jit
def _dot_nibbles(xt, nib, z, s, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, X_KIND: tl.constexpr):
    """sum_k x[m, k] (q[k, n] - z[n]) s[n] for an x tile [BLOCK_M, BLOCK_K] and nibbles q
    that reshape to [BLOCK_K, BLOCK_N], on the tensor cores: each nibble is set into the
    mantissa of a float that then equals base + q exactly, so the dot needs no conversion,
    and base and the zero are taken off the dot's result."""
    if X_KIND == 2:  # float32: (2^23 + q) - 2^23 = q, exact; the dot sees q
        qf = (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        d = tl.dot(xt, tl.reshape(qf, (BLOCK_K, BLOCK_N)), input_precision="ieee")
        out = (d - tl.sum(xt, axis=1)[:, None] * z[None, :]) * s[None, :]
    else:  # 16-bit: the bits of 128 + q (bf16) / 1024 + q (fp16), exact
        if X_KIND == 0:
            wb = (nib | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            base = 128.0
        else:
            wb = (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            base = 1024.0
        d = tl.dot(xt, tl.reshape(wb, (BLOCK_K, BLOCK_N)))  # sum_k x (base + q), fp32 accumulation
        xsum = tl.sum(xt.to(tl.float32), axis=1)
        out = (d - xsum[:, None] * (base + z)[None, :]) * s[None, :]
    return out


@triton.jit
def _awq_decode_body(x_ptr, qw_ptr, s_ptr, qz_ptr, p_ptr, M, N, K, k_per_split, stride_xm,
                     stride_q0, stride_s0, stride_z0, stride_ps, stride_pm, group_size,
                     BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
                     X_KIND: tl.constexpr, STAGES: tl.constexpr, K_FOLD: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NW = N // 8
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    c = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)  # packed word columns of this program
    cmask = c < NW
    i = tl.arange(0, 8)  # nibble i of word c holds column 8c + AWQ_ORDER[i]
    shift = i * 4
    if BLOCK_M == 1:
        # nibble-major [8, BLOCK_K, BLOCK_W]: the nibble dim lies in each thread's registers
        # (Triton spreads threads over the trailing dims), the words across lanes, coalesced.
        # A nibble q becomes w' = 1 + q/16 exactly (q in the top mantissa bits of 1.0f: one
        # shift and one LOP3), so sum_k x (q - z) = 16 sum_k x w' - (16 + z) sum_k x: one FFMA
        # per weight; the group's zero and scale are applied to per-thread partial sums
        # after K_FOLD rows have been folded in registers.
        col = c[None, :] * 8 + ((i % 4) * 2 + i // 4)[:, None]  # [8, BW]
        acc = tl.zeros([8, BLOCK_K // K_FOLD, BLOCK_W], dtype=tl.float32)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            rk = k0 + tl.arange(0, BLOCK_K)
            qw = tl.load(qw_ptr + rk[:, None] * stride_q0 + c[None, :], mask=cmask[None, :], other=0)
            g = k0 // group_size
            qz = tl.load(qz_ptr + g * stride_z0 + c, mask=cmask, other=0)
            s = tl.load(s_ptr + g * stride_s0 + col, mask=cmask[None, :], other=0.0).to(tl.float32)
            z = ((qz[None, :] >> shift[:, None]) & 0xF).to(tl.float32)  # [8, BW]
            wq = ((((qw[None, :, :] >> shift[:, None, None]) & 0xF) << 19) | 0x3F800000).to(
                tl.float32, bitcast=True)  # 1 + q / 16
            xv = tl.load(x_ptr + rk).to(tl.float32)
            prod = xv[None, :, None] * wq
            if K_FOLD == 1:
                sx = prod
                xs = xv
            else:  # rows k and k + BLOCK_K / K_FOLD * j sit in one thread: fold them there
                sx = tl.sum(tl.reshape(prod, (8, K_FOLD, BLOCK_K // K_FOLD, BLOCK_W)), axis=1)
                xs = tl.sum(tl.reshape(xv, (K_FOLD, BLOCK_K // K_FOLD)), axis=0)
            acc += (16.0 * sx - (16.0 + z)[:, None, :] * xs[None, :, None]) * s[:, None, :]
        out = tl.sum(acc, axis=1)  # [8, BW]
        tl.store(p_ptr + pid_k * stride_ps + col, out.to(p_ptr.dtype.element_ty), mask=cmask[None, :])
    else:
        n1 = tl.arange(0, BLOCK_W * 8)  # tile column n1 = nibble n1 % 8 of word n1 // 8
        c1 = pid_n * BLOCK_W + n1 // 8
        i1 = n1 % 8
        col1 = c1 * 8 + (i1 % 4) * 2 + i1 // 4
        c1mask = c1 < NW
        rm = tl.arange(0, BLOCK_M)
        mmask = rm < M
        acc = tl.zeros([BLOCK_M, BLOCK_W * 8], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None], other=0.0)
            qw = tl.load(qw_ptr + rk[:, None] * stride_q0 + c[None, :], mask=cmask[None, :], other=0)
            g = k0 // group_size
            qz = tl.load(qz_ptr + g * stride_z0 + c1, mask=c1mask, other=0)
            z = ((qz >> (i1 * 4)) & 0xF).to(tl.float32)
            s = tl.load(s_ptr + g * stride_s0 + col1, mask=c1mask, other=0.0).to(tl.float32)
            nib = (qw[:, :, None] >> shift[None, None, :]) & 0xF
            acc += _dot_nibbles(xt, nib, z, s, BLOCK_K, BLOCK_W * 8, X_KIND)
        tl.store(p_ptr + pid_k * stride_ps + rm[:, None] * stride_pm + col1[None, :],
                 acc.to(p_ptr.dtype.element_ty), mask=mmask[:, None] & c1mask[None, :])


@triton.jit
def _gptq_decode_body(x_ptr, qw_ptr, s_ptr, qz_ptr, p_ptr, M, N, K, k_per_split, stride_xm,
                      stride_q0, stride_s0, stride_z0, stride_ps, stride_pm, group_size,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      X_KIND: tl.constexpr, STAGES: tl.constexpr, LAYOUT: tl.constexpr):
    """GPTQ (words along K: nibble i of word r is row 8r + i; columns in order).  The nibble
    dim is a K sub-index here, so the FMA mode folds it in registers for free."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    i = tl.arange(0, 8)
    r = tl.arange(0, BLOCK_K // 8)
    zadd = 1 if LAYOUT == 1 else 0  # v1 checkpoints store zero - 1
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            qw = tl.load(qw_ptr + (k0 // 8 + r)[:, None] * stride_q0 + n[None, :], mask=nmask[None, :],
                         other=0)  # [BK/8, BN]
            g = k0 // group_size
            qz = tl.load(qz_ptr + g * stride_z0 + n // 8, mask=nmask, other=0)
            z = (((qz >> ((n % 8) * 4)) & 0xF) + zadd).to(tl.float32)
            s = tl.load(s_ptr + g * stride_s0 + n, mask=nmask, other=0.0).to(tl.float32)
            wq = ((((qw[None, :, :] >> (i * 4)[:, None, None]) & 0xF) << 19) | 0x3F800000).to(
                tl.float32, bitcast=True)  # [8, BK/8, BN]: 1 + q / 16
            xv = tl.load(x_ptr + k0 + r[None, :] * 8 + i[:, None]).to(tl.float32)  # [8, BK/8]
            sx = tl.sum(xv[:, :, None] * wq, axis=0)  # the nibble dim: in registers
            xs = tl.sum(xv, axis=0)
            acc += (16.0 * sx - xs[:, None] * (16.0 + z)[None, :]) * s[None, :]
        out = tl.sum(acc, axis=0)
        tl.store(p_ptr + pid_k * stride_ps + n, out.to(p_ptr.dtype.element_ty), mask=nmask)
    else:
        rm = tl.arange(0, BLOCK_M)
        mmask = rm < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None], other=0.0)
            qw = tl.load(qw_ptr + (k0 // 8 + r)[:, None] * stride_q0 + n[None, :], mask=nmask[None, :],
                         other=0)
            g = k0 // group_size
            qz = tl.load(qz_ptr + g * stride_z0 + n // 8, mask=nmask, other=0)
            z = (((qz >> ((n % 8) * 4)) & 0xF) + zadd).to(tl.float32)
            s = tl.load(s_ptr + g * stride_s0 + n, mask=nmask, other=0.0).to(tl.float32)
            nib = (qw[:, None, :] >> (i * 4)[None, :, None]) & 0xF  # [BK/8, 8, BN]: row 8r + i
            acc += _dot_nibbles(xt, nib, z, s, BLOCK_K, BLOCK_N, X_KIND)
        tl.store(p_ptr + pid_k * stride_ps + rm[:, None] * stride_pm + n[None, :],
                 acc.to(p_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _splitk_reduce_kernel(p_ptr, y_ptr, MN, SPLIT, stride_ps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sp in range(0, SPLIT):
        acc += tl.load(p_ptr + sp * stride_ps + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
DECODE_MAX_M = 64  # larger M: the general tiled kernel
# Measured on an H200 (2026-11-30, python -m portaserve.bench.gemm, docs/BENCHMARKS.md):
# the split-K FMA path wins at M == 1 (gate_up 41.7 us vs the general kernel's 116, bf16
# 56.8), but the tl.dot variant loses to the general tiled kernel at every M in 8..64
# (qkv M=32: 79 vs 39 us), so without an explicit path the decode kernel takes M == 1 only.
DECODE_AUTO_MAX_M = 1
_SM_COUNT: dict = {}
_disabled: dict = {}  # kernel name -> reason it failed on this device


def _sm_count(device) -> int:
    if device.type == "cpu":
        return 4
    key = (device.type, device.index)
    if key not in _SM_COUNT:
        try:
            mod = getattr(torch, device.type)
            props = mod.get_device_properties(device.index if device.index is not None else mod.current_device())
            _SM_COUNT[key] = int(getattr(props, "multi_processor_count", 0) or
                                 getattr(props, "gpu_subslice_count", 0) or 128)
        except Exception:
            _SM_COUNT[key] = 128
    return _SM_COUNT[key]


def _decode_config(M: int, group_size: int, device_type: str, mode=None):
    """(BLOCK_M, BLOCK_W, BLOCK_K, K_FOLD, num_warps, programs per SM, max split) or None
    when the decode kernel does not apply.  mode: None (FMA for M == 1, tl.dot for
    2..16), "fma" (M == 1 only) or "dot".

    FMA mode, 4 warps, BLOCK_W = 16: a CTA covers 8 K rows per register repetition (2 lanes
    x 4 warps), so K_FOLD = BLOCK_K / 8 folds a thread's own rows with no shuffle.  Checked
    on sm_90 SASS (Triton 3.x, ptxas): BLOCK_K 128 -> ~5.6 instructions per weight, 162
    registers, 3 CTAs / SM with two 8 KB tiles in flight each (cp.async, 3 stages)."""
    mode = mode or ("fma" if M == 1 else "dot")
    if mode == "fma" and M != 1:
        return None
    dot_bm = 16 if M <= 16 else 32 if M <= 32 else 64
    if device_type == "cpu":  # the interpreter: small tiles keep the tests quick
        bm, bw, bk, warps, per_sm, max_split = (1 if mode == "fma" else dot_bm), 2, 16, 1, 2, 64
    elif mode == "fma":  # short loops over many programs, one group per K tile
        bm, bw, bk, warps, per_sm, max_split = 1, 16, 128, 4, 6, 64
    else:  # BLOCK_N 128 (64 for M > 32: twice the programs, half the accumulator)
        bm, bw, bk, warps, per_sm, max_split = dot_bm, (16 if M <= 32 else 8), 64, (4 if M <= 16 else 8), 4, 32
    bk = min(bk, group_size)
    if group_size % bk or bk < 16:
        return None
    fold = max(1, bk // 8) if mode == "fma" else 1
    if device_type == "cpu" and mode == "fma":
        fold = 4  # exercise the in-register fold under the interpreter
    return bm, bw, bk, fold, warps, per_sm, max_split


def _reduce_into(p, y2, split):
    MN = y2.numel()
    blk = 256 if y2.device.type == "cpu" else 1024
    _splitk_reduce_kernel[(triton.cdiv(MN, blk),)](p, y2, MN, split, p.stride(0), BLOCK=blk,
                                                   num_warps=4)


def _awq_decode(x2, qweight, scales, qzeros, group_size, split_k=None, mode=None, layout="awq"):
    M, K = x2.shape
    N = scales.shape[1]
    bm, bw, bk, fold, warps, per_sm, max_split = _decode_config(M, group_size, x2.device.type, mode)
    grid_n = triton.cdiv(N // 8, bw)
    kblocks = K // bk
    if split_k is None:  # fill the device: per_sm programs per SM; float32 partial sums
        # [split, M, N] of at most half the INT4 weight bytes (K N / 2)
        split_k = min(kblocks, max_split, max(1, K // (16 * M)),
                      max(1, triton.cdiv(per_sm * _sm_count(x2.device), grid_n)))
    split_k = max(1, min(split_k, kblocks))
    k_per_split = triton.cdiv(kblocks, split_k) * bk
    split = triton.cdiv(K, k_per_split)
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    p = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x2.device)
    stride_ps = 0 if split == 1 else p.stride(0)
    _decode_kernel[(grid_n, split)](
        x2, qweight, scales, qzeros, p, M, N, K, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), stride_ps, N,
        group_size, BLOCK_M=bm, BLOCK_W=bw, BLOCK_K=bk, X_KIND=_X_KIND[x2.dtype], STAGES=3,
        K_FOLD=fold, LAYOUT=_LAYOUT_ID[layout], num_warps=warps, num_stages=3)
    if split > 1:
        _reduce_into(p, y, split)
    return y


def _decode_applies(x2, qweight, scales, qzeros, g_idx, layout, mode=None) -> bool:
    M, K = x2.shape
    N = scales.shape[1]
    packed = (K, N // 8) if layout == "awq" else (K // 8, N)
    return (g_idx is None and 1 <= M <= DECODE_MAX_M and x2.dtype in _X_KIND
            and N % 8 == 0 and K % scales.shape[0] == 0 and x2.stride(1) == 1
            and qweight.stride(1) == 1 and qzeros.stride(1) == 1 and scales.stride(1) == 1
            and tuple(qweight.shape) == packed and tuple(qzeros.shape) == (scales.shape[0], N // 8)
            and _decode_config(M, K // scales.shape[0], x2.device.type, mode) is not None)


# ---- general: tiled dequant-GEMM, every layout -----------------------------------------------
def _general(x2, qweight, scales, qzeros, g_idx, layout, split_k=None):
    M, K = x2.shape
    N = scales.shape[1]
    group_size = K // scales.shape[0]
    bm, bn, bk, warps, stages = _config(M, N, K, x2.device.type, x2.element_size())
    if x2.element_size() == 4 and x2.device.type != "cpu":  # float32 tiles: stay within shared memory
        bm, bn, bk, stages = min(bm, 64), 64, 32, 2
    grid_m, grid_n = triton.cdiv(M, bm), triton.cdiv(N, bn)
    # split-K for small grids: aim at ~2 programs per SM-sized unit of work
    split = 1
    if split_k is not None:
        split = split_k
    elif x2.device.type != "cpu":
        split = max(1, min(2 * _sm_count(x2.device) // (grid_m * grid_n), K // (bk * 4)))
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per_split)
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    y = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x2.device)
    has_gidx = g_idx is not None
    aligned = (not has_gidx) and group_size % bk == 0 and k_per_split % bk == 0
    gi = g_idx if has_gidx else qweight  # any pointer; unused
    _int4_gemm_kernel[(grid_m, grid_n, split)](
        x2, qweight, scales, qzeros, gi, y, M, N, K, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
        0 if split == 1 else y.stride(0), N, 1, group_size,
        LAYOUT=_LAYOUT_ID[layout], HAS_GIDX=has_gidx, GROUP_ALIGNED=aligned,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if split > 1:
        _reduce_into(y, out, split)
    return out


# ---- prefill: dequantize to the activation dtype, then the vendor GEMM --------------------------
@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, qz_ptr, gidx_ptr, w_ptr, K, N, n0, stride_q0, stride_s0,
                    stride_z0, stride_w0, group_size, LAYOUT: tl.constexpr, HAS_GIDX: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W^T[k, n0 + j] = (q - z) * s as w's dtype, into w [K, chunk] (column j)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rj = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = n0 + rj
    kmask = rk < K
    nmask = rn < N
    j = tl.arange(0, 8)
    if HAS_GIDX:
        g = tl.load(gidx_ptr + rk, mask=kmask, other=0)
    else:
        g = rk // group_size
    if LAYOUT == 0:  # AWQ: words along N, column 8c + j in nibble AWQ_REVERSE_ORDER[j]
        col_shift = ((j % 2) * 4 + j // 2) * 4
        rw = (n0 // 8) + tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        wmask = rw < N // 8
        qw = tl.load(qw_ptr + rk[:, None] * stride_q0 + rw[None, :], mask=kmask[:, None] & wmask[None, :],
                     other=0)
        q = tl.reshape((qw[:, :, None] >> col_shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
    else:  # GPTQ: words along K
        qw = tl.load(qw_ptr + (rk // 8)[:, None] * stride_q0 + rn[None, :],
                     mask=kmask[:, None] & nmask[None, :], other=0)
        q = (qw >> ((rk % 8) * 4)[:, None]) & 0xF
        col_shift = j * 4
    qz = tl.load(qz_ptr + g[:, None] * stride_z0 + (rn // 8)[None, :], mask=kmask[:, None] & nmask[None, :],
                 other=0)
    if LAYOUT == 0:
        z = (qz >> (((rn % 8) % 2) * 4 + (rn % 8) // 2)[None, :] * 4) & 0xF
    else:
        z = (qz >> ((rn % 8) * 4)[None, :]) & 0xF
    if LAYOUT == 1:
        z = z + 1  # GPTQ v1 checkpoints store zero - 1
    sc = tl.load(s_ptr + g[:, None] * stride_s0 + rn[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
    w = (q - z).to(tl.float32) * sc.to(tl.float32)
    tl.store(w_ptr + rk[:, None] * stride_w0 + rj[None, :], w.to(w_ptr.dtype.element_ty),
             mask=kmask[:, None] & nmask[None, :])


DEQUANT_MIN_M = 256  # from here on: dequantize + cuBLAS/hipBLAS (prefill)
DEQUANT_CHUNK_BYTES = 64 << 20  # the dequantized scratch is cut into column chunks


def _dequant_matmul(x2, qweight, scales, qzeros, g_idx, layout, chunk_bytes=None):
    M, K = x2.shape
    N = scales.shape[1]
    group_size = K // scales.shape[0]
    cpu = x2.device.type == "cpu"
    bk, bn = (16, 16) if cpu else (32, 128)
    per = max(bn, ((chunk_bytes or DEQUANT_CHUNK_BYTES) // (K * x2.element_size())) // bn * bn)
    y = None
    has_gidx = g_idx is not None
    gi = g_idx if has_gidx else qweight
    for n0 in range(0, N, per):
        n1 = min(N, n0 + per)
        w = torch.empty(K, n1 - n0, dtype=x2.dtype, device=x2.device)
        _dequant_kernel[(triton.cdiv(K, bk), triton.cdiv(n1 - n0, bn))](
            qweight, scales, qzeros, gi, w, K, n1, n0, qweight.stride(0), scales.stride(0),
            qzeros.stride(0), w.stride(0), group_size, LAYOUT=_LAYOUT_ID[layout], HAS_GIDX=has_gidx,
            BLOCK_K=bk, BLOCK_N=bn, num_warps=4)
        if n0 == 0 and n1 == N:
            return x2 @ w
        if y is None:
            y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
        y[:, n0:n1] = x2 @ w
    return y


def _disable(name: str, e: Exception) -> None:
    _disabled[name] = f"{type(e).__name__}: {e}"
    nxt = ("the general Triton kernel" if name in ("decode", "dequant")
           else "the native dequantize-then-matmul op")
    msg = f"portaserve: the Triton INT4 {name} kernel failed ({_disabled[name]}); using {nxt} instead"
    _log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def int4_gemm(x, qweight, scales, qzeros, g_idx, layout, split_k=None, path=None):
    """path (tests and benchmarks): None chooses (decode kernel for M <= DECODE_AUTO_MAX_M
    without act-order, dequantize + vendor GEMM for M >= 256, else the tiled kernel); "decode" /
    "decode_fma" / "decode_dot" force the decode kernel (its mode), "general" the tiled
    kernel, "dequant" the dequantize + GEMM path; forced paths raise."""
    if layout not in _LAYOUT_ID:
        raise ValueError(f"unknown int4 layout {layout!r}")
    lead, K = x.shape[:-1], x.shape[-1]
    N = scales.shape[1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    group_size = K // scales.shape[0]
    if path is not None and path.startswith("decode"):
        mode = path[len("decode_"):] or None
        if not _decode_applies(x2, qweight, scales, qzeros, g_idx, layout, mode):
            raise ValueError(f"the INT4 decode kernel ({path}) does not apply to this call")
        return _awq_decode(x2, qweight, scales, qzeros, group_size, split_k, mode, layout).reshape(*lead, N)
    if path == "general":
        return _general(x2, qweight, scales, qzeros, g_idx, layout, split_k).reshape(*lead, N)
    if path == "dequant":
        return _dequant_matmul(x2, qweight, scales, qzeros, g_idx, layout).reshape(*lead, N)
    if (M >= DEQUANT_MIN_M and "dequant" not in _disabled and N % 8 == 0 and qweight.stride(1) == 1
            and qzeros.stride(1) == 1 and scales.stride(1) == 1):
        try:
            return _dequant_matmul(x2, qweight, scales, qzeros, g_idx, layout).reshape(*lead, N)
        except Exception as e:
            _disable("dequant", e)
    if (M <= DECODE_AUTO_MAX_M and "decode" not in _disabled
            and _decode_applies(x2, qweight, scales, qzeros, g_idx, layout)):
        try:
            return _awq_decode(x2, qweight, scales, qzeros, group_size, split_k, None,
                               layout).reshape(*lead, N)
        except Exception as e:  # a compile failure on this device: never crash the engine
            _disable("decode", e)
    if "general" not in _disabled:
        try:
            return _general(x2, qweight, scales, qzeros, g_idx, layout, split_k).reshape(*lead, N)
        except Exception as e:
            _disable("general", e)
    from portaserve.core.ops import native

    return native.int4_gemm(x, qweight, scales, qzeros, g_idx, layout)


# ---- startup self-test (the provider's requirement) ---------------------------------------------
_SELFTEST: dict = {}


def selftest() -> str | None:
    """Compile both kernels on the accelerator and compare them with the native oracle on
    tiny shapes.  None when the general kernel works (a failing decode kernel is disabled
    with a warning), else the reason.  No accelerator: nothing to test, None.  Once per
    device and process."""
    from portaserve.platforms.triton_kernels import selftest as st

    dev = st.accel_device()
    if dev is None:
        return None
    if str(dev) not in _SELFTEST:
        _SELFTEST[str(dev)] = _selftest(dev)
    return _SELFTEST[str(dev)]


def _selftest(dev) -> str | None:
    from portaserve.core.ops import native
    from portaserve.core.ops.quant import pack_cols

    g = torch.Generator().manual_seed(0)
    K, N, group = 256, 256, 128
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (K // group, N), generator=g, dtype=torch.int32)
    s = (torch.rand(K // group, N, generator=g) * 0.5 + 0.25) / (8 * K ** 0.5)
    qw, qz = pack_cols(q, True).to(dev), pack_cols(z, True).to(dev)
    s = s.to(torch.bfloat16).to(dev)
    for M in (1, 4, 20, 256):
        x = torch.randn(M, K, generator=g).to(torch.bfloat16).to(dev)
        ref = native.int4_gemm(x, qw, s, qz, None, "awq").float()
        for path in ("general", "decode_fma", "decode_dot", "dequant"):
            kernel = path.split("_")[0]
            if kernel == "decode" and ("decode" in _disabled or not _decode_applies(
                    x, qw, s, qz, None, "awq", path[len("decode_"):])):
                continue
            if kernel == "dequant" and (M < DEQUANT_MIN_M or "dequant" in _disabled):
                continue
            try:
                out = int4_gemm(x, qw, s, qz, None, "awq", path=path).float()
                err = (out - ref).abs().max().item()
                if not err <= 3e-2 + 3e-2 * ref.abs().max().item():
                    raise RuntimeError(f"M={M}: max abs error {err:.3g} against the oracle")
            except Exception as e:
                if kernel == "general":
                    return f"Triton INT4 kernel self-test failed on {dev}: {type(e).__name__}: {e}"
                _disable(kernel, e)
    return None
