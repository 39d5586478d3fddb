"""Paged attention over the KV pool: split-KV decode and causal extend (prefill over a
cached prefix), GQA, variable lengths in one launch.

Both read K/V through req_to_token (the slot of each position of each request), so a
prefix shared through the radix cache is read in place.  The new tokens' K/V are already
in the pool when these run (the model stores them first).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from portaserve.platforms.triton_kernels import pdl

# The most splits of a decode sequence.  The count a launch uses depends only on shapes
# (batch size, KV heads), never on lengths, so a captured CUDA graph stays valid.
NUM_KV_SPLITS = 16
# Splits are used until about this many programs per SM run: enough to fill the device at
# small batches, none at large ones, where each extra split only adds partial results to
# write and merge (the remainder of a shared-prefix batch is a few hundred tokens: with 16
# splits its programs got one block each; H200, python -m portaserve.bench.cascade --profile).
PROGRAMS_PER_SM = 4


class Launch(NamedTuple):
    """How an attention kernel is launched: query rows per program (extend), keys per
    block, warps and pipeline stages (None: Triton's default for the device), and whether
    a program's rows are a KV head's query heads together (extend: positions x heads, so
    each K/V block read serves them all); maxnreg caps the registers per thread (NVIDIA's
    .maxnreg: more programs per SM, at the risk of spills; not passed on AMD or Intel)."""
    block_m: int = 64
    block_n: int = 64
    warps: Optional[int] = None
    stages: Optional[int] = None
    grouped: bool = False
    maxnreg: Optional[int] = None


# By the cache's bytes per element, on a GPU; ci/gpu/attention_sweep.py times alternatives.
# fp8 decode capped at 128 registers: 0.467 ms against 0.497 ms uncapped (156 registers),
# no spills, batch 256 x ~2.5k cached tokens (H200, session 20); a 16-bit cache's kernel
# spills under that cap and was no faster.
DECODE_LAUNCH = {4: Launch(), 2: Launch(), 1: Launch(maxnreg=128)}
# fp8 extend: 128 rows of a KV head's 4 heads x 32 positions, 128 keys, 8 warps: 1.4-1.6x
# the one-head launch (H200, session 19); for 16-bit caches the one-head launch was fastest.
# Head sizes above 128 keep the one-head launch: the large one's pipelined blocks would not
# fit an A100's or an MI300's shared memory (EXTEND_LAUNCH_WIDE).
EXTEND_LAUNCH = {4: Launch(block_n=32), 2: Launch(block_n=32),
                 1: Launch(block_m=128, block_n=128, warps=8, stages=2, grouped=True)}
EXTEND_LAUNCH_WIDE = Launch(block_n=32)
# On the CPU (the interpreter: tests), small blocks; tests switch the variants
DECODE_LAUNCH_CPU = Launch(block_n=32)
EXTEND_LAUNCH_CPU = Launch(block_m=32, block_n=32)
# Whether a bfloat16 q meets an fp8 cache in float16 (_q_for_fp8); the sweep compares.
FP8_DOTS_IN_F16 = True


def _num_splits(batch: int, kv_heads: int, device) -> int:
    # CPU: the interpreter, where tests exercise the split merge; XPU: its device
    # properties name no SM count, so keep the fixed count there
    if device.type != "cuda":  # ROCm devices are "cuda" too
        return NUM_KV_SPLITS
    want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), batch * kv_heads)
    return min(NUM_KV_SPLITS, triton.next_power_of_2(want))


_SMS: dict = {}


def _sm_count(device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


@triton.jit
def _e4m3_bits_to_f32(x):
    """float8_e4m3fn values from their bytes (x: uint8), for GPUs whose Triton has no e4m3
    type (NVIDIA before sm_89).  Exact for every finite value; the NaN pattern reads as
    +-480 (stores saturate, so only a NaN input writes it)."""
    b = x.to(tl.int32)
    e = (b >> 3) & 15
    m = b & 7
    normal = (((b & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # subnormal: m * 2^-9
    return tl.where(e == 0, tl.where((b & 0x80) != 0, -sub, sub), normal)


@triton.jit
def _q_for_fp8(q, Q_F16: tl.constexpr):
    """q as the dots over an fp8 cache take it.  Q_F16: in float16, into which e4m3 and e5m2
    convert in one instruction per pair (to bfloat16 they go through float32: three), so
    the keys' and values' conversion does not bound the kernel; float16 holds more of q's
    mantissa than bfloat16, and q is clamped to its range (NaN stays NaN)."""
    if Q_F16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float16)
    return q


@triton.jit
def _attend_range(q, k_ptr, v_ptr, row_ptr, kvh, stride_kt, stride_kh, stride_vt, stride_vh, start, end,
                  scale, d, dmask, dv, dvmask, qpos, ROWS: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, E4M3_BITS: tl.constexpr):
    """Online softmax of the ROWS query rows q (heads of one KV head, or a block of prompt
    positions) over positions [start, end) of one request-table row (row_ptr): the
    normalised output [ROWS, BLOCK_DV] and the log-sum-exp [ROWS] (float32; -inf for an
    empty range), the partial result the split merge (_decode_stage2) combines.  CAUSAL:
    row r sees positions <= qpos[r] only (every row must see position start).  E4M3_BITS:
    the caches are float8_e4m3fn seen as bytes (uint8 pointers), decoded here."""
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        slots = tl.load(row_ptr + n, mask=nmask, other=0).to(tl.int64)
        k = tl.load(k_ptr + slots[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        if E4M3_BITS:
            k = _e4m3_bits_to_f32(k)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee").to(tl.float32) * scale
        if CAUSAL:
            s = tl.where((n[None, :] <= qpos[:, None]) & nmask[None, :], s, float("-inf"))
        else:
            s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_ptr + slots[:, None] * stride_vt + kvh * stride_vh + dv[None, :],
                    mask=nmask[:, None] & dvmask[None, :], other=0.0)
        if E4M3_BITS:
            v = _e4m3_bits_to_f32(v)
        v = v.to(q.dtype)  # fp8 caches upcast
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    has = end > start
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _decode_stage1(q_ptr, k_ptr, v_ptr, r2t_ptr, rpi_ptr, seq_ptr, start_ptr, mid_o, mid_lse,
                   stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
                   stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   scale, n_heads, GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_START: tl.constexpr,
                   E4M3_BITS: tl.constexpr, Q_F16: tl.constexpr, DIRECT: tl.constexpr,
                   KV_HEADS: tl.constexpr, PDL: tl.constexpr):
    # DIRECT (one split, no shared prefix): mid_o is the output [B, H, DV] itself, in its
    # dtype, and there is nothing to merge.  The grid is (batch x KV heads, splits), the KV
    # head varying fastest: programs start in order of their ids, so a request's heads run
    # together (they read neighbouring bytes of the same slots), and requests start in batch
    # order, which the scheduler makes longest first, so no long sequence starts last and
    # runs alone at the end.  (One axis: a grid's second axis stops at 65,535.)
    pdl.start(PDL)
    pdl.wait(PDL)
    pid = tl.program_id(0)
    kvh = pid % KV_HEADS
    b = (pid // KV_HEADS).to(tl.int64)
    split = tl.program_id(1)
    heads = kvh * GROUP + tl.arange(0, BLOCK_H)
    hmask = (tl.arange(0, BLOCK_H) < GROUP) & (heads < n_heads)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dvmask = dv < DV
    seq_len = tl.load(seq_ptr + b).to(tl.int32)
    row = tl.load(rpi_ptr + b).to(tl.int64)
    kv0 = 0  # positions before kv0 (a shared prefix) are attended by _shared_prefix_kernel
    if HAS_START:
        kv0 = tl.load(start_ptr + b).to(tl.int32)
    # whole blocks per split: short sequences use few splits, the rest exit at once
    per = tl.cdiv(tl.cdiv(seq_len - kv0, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = kv0 + split * per
    end = tl.minimum(start + per, seq_len)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    q = _q_for_fp8(q, Q_F16)
    out, lse = _attend_range(q, k_ptr, v_ptr, r2t_ptr + row * stride_r2t, kvh, stride_kt, stride_kh,
                             stride_vt, stride_vh, start, end, scale, d, dmask, dv, dvmask, end,
                             ROWS=BLOCK_H, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, CAUSAL=False,
                             E4M3_BITS=E4M3_BITS)
    if DIRECT:
        tl.store(mid_o + b * stride_mb + heads[:, None] * stride_mh + dv[None, :],
                 out.to(mid_o.dtype.element_ty), mask=hmask[:, None] & dvmask[None, :])
    else:
        tl.store(mid_o + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + dv[None, :], out,
                 mask=hmask[:, None] & dvmask[None, :])
        tl.store(mid_lse + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _decode_stage2(mid_o, mid_lse, o_ptr, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   stride_ob, stride_oh, start_ptr, pmid_o, pmid_lse, stride_pb, stride_ph, stride_ps,
                   stride_plb, stride_plh, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, PREFIX_SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Merge the splits' partial outputs by their log-sum-exp; with PREFIX_SPLITS, also the
    shared-prefix partials of requests that have one (start > 0)."""
    pdl.start(PDL)
    pdl.wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    dvmask = dv < DV
    s = tl.arange(0, NUM_SPLITS)
    lse = tl.load(mid_lse + b * stride_lb + h * stride_lh + s)
    parts = tl.load(mid_o + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + dv[None, :],
                    mask=dvmask[None, :], other=0.0)
    m = tl.max(lse, axis=0)
    if PREFIX_SPLITS > 0:
        ps = tl.arange(0, PREFIX_SPLITS)
        pmask = (ps * 0 + tl.load(start_ptr + b)) > 0  # this request has a tile
        plse = tl.load(pmid_lse + b * stride_plb + h * stride_plh + ps, mask=pmask, other=float("-inf"))
        pparts = tl.load(pmid_o + b * stride_pb + h * stride_ph + ps[:, None] * stride_ps + dv[None, :],
                         mask=pmask[:, None] & dvmask[None, :], other=0.0)
        m = tl.maximum(m, tl.max(plse, axis=0))
        pw = tl.where(plse == float("-inf"), 0.0, tl.exp(plse - m))
    w = tl.exp(lse - m)
    w = tl.where(lse == float("-inf"), 0.0, w)
    num = tl.sum(parts * w[:, None], axis=0)
    den = tl.sum(w, axis=0)
    if PREFIX_SPLITS > 0:
        num += tl.sum(pparts * pw[:, None], axis=0)
        den += tl.sum(pw, axis=0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + dv, (num / den).to(o_ptr.dtype.element_ty), mask=dvmask)


@triton.jit
def _shared_prefix_kernel(q_ptr, k_ptr, v_ptr, r2t_ptr, tile_row_ptr, tile_len_ptr, tile_mem_ptr,
                          pmid_o, pmid_lse, stride_qb, stride_qh, stride_kt, stride_kh, stride_vt,
                          stride_vh, stride_r2t, stride_tm, stride_pb, stride_ph, stride_ps,
                          stride_plb, stride_plh, scale, n_heads,
                          GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_G: tl.constexpr,
                          MEMBERS: tl.constexpr, SUBTILES: tl.constexpr, BLOCK_N: tl.constexpr,
                          PREFIX_SPLITS: tl.constexpr, E4M3_BITS: tl.constexpr, Q_F16: tl.constexpr):
    """Cascade attention, level 1: the requests of one tile share the first tile_len
    positions of the KV (the same slots, through the radix cache).  Their queries (MEMBERS
    requests x the GROUP heads of one KV head, as the rows of one matrix) attend to that
    prefix together, so each prefix block is read once per tile instead of once per
    request and the score product is a real matrix product.  The partials (output and
    log-sum-exp per split) are merged with the per-request rest by _decode_stage2."""
    pid = tl.program_id(0)
    tile = pid // SUBTILES
    sub = pid % SUBTILES
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    plen = tl.load(tile_len_ptr + tile).to(tl.int32)
    first = tl.load(tile_mem_ptr + tile * stride_tm + sub * MEMBERS)  # members are packed left
    if (plen == 0) | (first < 0):
        return
    row = tl.load(tile_row_ptr + tile).to(tl.int64)
    i = tl.arange(0, MEMBERS * BLOCK_G)
    member = tl.load(tile_mem_ptr + tile * stride_tm + sub * MEMBERS + i // BLOCK_G).to(tl.int64)
    g = i % BLOCK_G
    heads = kvh * GROUP + g
    rmask = (member >= 0) & (g < GROUP) & (heads < n_heads)
    member = tl.where(rmask, member, 0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dvmask = dv < DV
    per = tl.cdiv(tl.cdiv(plen, PREFIX_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, plen)
    q = tl.load(q_ptr + member[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    q = _q_for_fp8(q, Q_F16)
    out, lse = _attend_range(q, k_ptr, v_ptr, r2t_ptr + row * stride_r2t, kvh, stride_kt, stride_kh,
                             stride_vt, stride_vh, start, end, scale, d, dmask, dv, dvmask, end,
                             ROWS=MEMBERS * BLOCK_G, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, CAUSAL=False,
                             E4M3_BITS=E4M3_BITS)
    tl.store(pmid_o + member[:, None] * stride_pb + heads[:, None] * stride_ph + split * stride_ps + dv[None, :],
             out, mask=rmask[:, None] & dvmask[None, :])
    tl.store(pmid_lse + member * stride_plb + heads * stride_plh + split, lse, mask=rmask)


def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    return _decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale)


def attention_decode_shared(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale,
                            kv_start, tile_rows, tile_lens, tile_members):
    """Decode attention with cascade over shared prefixes (core/shared_prefix.py): each tile's
    prefix once for all its requests, then each request's own positions [kv_start, seq_len)."""
    return _decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale,
                   (kv_start, tile_rows, tile_lens, tile_members))


# The shared-prefix kernel's launch: prefix splits (fixed, for CUDA graphs, like
# NUM_KV_SPLITS), keys per block, warps and pipeline stages (python -m portaserve.bench.cascade
# --sweep times the alternatives).
PREFIX_SPLITS = 4
PREFIX_BLOCK_N = 64
PREFIX_WARPS = 4
PREFIX_STAGES = 3


_E4M3_BYTES: dict = {}


def _e4m3_as_bytes(device) -> bool:
    """Whether this device's Triton lacks the float8_e4m3fn type (NVIDIA before sm_89, e.g.
    the A100; on AMD it depends on the Triton release): its kernels then read an e4m3 cache
    as bytes and decode them (_e4m3_bits_to_f32).  Triton's backend for the device says; if
    it cannot be asked, bytes (correct everywhere).  The interpreter (CPU) has the type."""
    if device.type in ("cpu", "meta"):
        return False
    if device not in _E4M3_BYTES:
        try:
            from triton.compiler.compiler import make_backend
            from triton.runtime import driver

            with (torch.xpu.device(device) if device.type == "xpu" else torch.cuda.device(device)):
                target = driver.active.get_current_target()
            has = "fp8e4nv" in make_backend(target).parse_options({}).supported_fp8_dtypes
        except Exception:
            has = False
        _E4M3_BYTES[device] = not has
    return _E4M3_BYTES[device]


def _options(cfg: Launch, device: torch.device) -> dict:
    """A Launch's compile options for a GPU launch, those it sets (maxnreg on NVIDIA only:
    Triton's AMD and Intel backends refuse it)."""
    nvidia = torch.version.hip is None and device.type != "xpu"
    opts = {"num_warps": cfg.warps, "num_stages": cfg.stages, "maxnreg": cfg.maxnreg if nvidia else None}
    return {k: v for k, v in opts.items() if v is not None}


def _kv_operands(q, k_cache, v_cache):
    """The caches as the kernels read them, whether as e4m3 bytes (E4M3_BITS), and whether
    a bfloat16 q meets an fp8 cache in float16 (Q_F16, _q_for_fp8)."""
    if k_cache.dtype == torch.float8_e4m3fn and _e4m3_as_bytes(k_cache.device):
        return k_cache.view(torch.uint8), v_cache.view(torch.uint8), False, True
    fp8 = k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    return k_cache, v_cache, fp8 and q.dtype == torch.bfloat16 and FP8_DOTS_IN_F16, False


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, copied if its address is not 16-byte aligned.  Triton compiles a kernel variant
    per pointer alignment: a mixed batch's decode tail (a slice at an odd offset) would
    otherwise compile a second variant of each kernel mid-serving (~0.5 s on the H200)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale, shared=None):
    q, req_pool_indices, seq_lens = _aligned(q), _aligned(req_pool_indices), _aligned(seq_lens)
    if shared is not None:
        shared = tuple(_aligned(t) for t in shared)
    B, H, D = q.shape
    Hk = k_cache.shape[1]
    DV = v_cache.shape[-1]
    group = H // Hk
    o = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    on_cpu = q.device.type == "cpu"
    k_cache, v_cache, q_f16, e4m3_bits = _kv_operands(q, k_cache, v_cache)
    splits = _num_splits(B, Hk, q.device)
    direct = splits == 1 and shared is None  # a full device: stage 1 writes the output
    if direct:
        mid_o, mid_lse = o, None
    else:
        mid_o = torch.empty(B, H, splits, DV, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    BLOCK_H = max(16, triton.next_power_of_2(group))
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_DV = triton.next_power_of_2(DV)
    kv_start = pmid_o = pmid_lse = None
    if shared is not None:
        kv_start, tile_rows, tile_lens, tile_members = shared
        pmid_o = torch.empty(B, H, PREFIX_SPLITS, DV, dtype=torch.float32, device=q.device)
        pmid_lse = torch.empty(B, H, PREFIX_SPLITS, dtype=torch.float32, device=q.device)
        block_g = triton.next_power_of_2(group)
        tile = tile_members.shape[1]  # a power of two (core/shared_prefix.TILE)
        members = max(1, min(tile, 64 // block_g))  # query rows per program: members x heads
        if tile_rows.shape[0]:
            _shared_prefix_kernel[(tile_rows.shape[0] * (tile // members), Hk, PREFIX_SPLITS)](
                q, k_cache, v_cache, req_to_token, tile_rows, tile_lens, tile_members, pmid_o, pmid_lse,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                v_cache.stride(1), req_to_token.stride(0), tile_members.stride(0), pmid_o.stride(0),
                pmid_o.stride(1), pmid_o.stride(2), pmid_lse.stride(0), pmid_lse.stride(1), scale, H,
                GROUP=group, D=D, DV=DV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_G=block_g,
                MEMBERS=members, SUBTILES=tile // members, BLOCK_N=32 if on_cpu else PREFIX_BLOCK_N,
                PREFIX_SPLITS=PREFIX_SPLITS, E4M3_BITS=e4m3_bits, Q_F16=q_f16,
                **({} if on_cpu else dict(num_warps=PREFIX_WARPS, num_stages=PREFIX_STAGES)))
    launch = pdl.launch(q.device)
    cfg = DECODE_LAUNCH_CPU if on_cpu else DECODE_LAUNCH[k_cache.element_size()]
    if cfg.maxnreg and (max(D, DV) > 128 or e4m3_bits):
        # the cap was measured at head size 128 over a float8 cache Triton reads as such;
        # wider heads or the byte decoder (before sm_89) need more registers: no cap there
        cfg = cfg._replace(maxnreg=None)
    _decode_stage1[(B * Hk, splits)](
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, kv_start, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        req_to_token.stride(0), mid_o.stride(0), mid_o.stride(1), 0 if direct else mid_o.stride(2),
        0 if direct else mid_lse.stride(0), 0 if direct else mid_lse.stride(1), scale, H, GROUP=group,
        D=D, DV=DV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_H=BLOCK_H,
        BLOCK_N=cfg.block_n, NUM_SPLITS=splits, HAS_START=shared is not None, E4M3_BITS=e4m3_bits,
        Q_F16=q_f16, DIRECT=direct, KV_HEADS=Hk, **launch, **_options(cfg, q.device))
    if direct:
        return o
    ps = (0, 0, 0, 0, 0) if shared is None else (
        pmid_o.stride(0), pmid_o.stride(1), pmid_o.stride(2), pmid_lse.stride(0), pmid_lse.stride(1))
    _decode_stage2[(B, H)](
        mid_o, mid_lse, o, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), o.stride(0), o.stride(1), kv_start, pmid_o, pmid_lse, *ps,
        DV=DV, BLOCK_DV=BLOCK_DV, NUM_SPLITS=splits,
        PREFIX_SPLITS=0 if shared is None else PREFIX_SPLITS, **launch)
    return o


@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, r2t_ptr, rpi_ptr, prefix_ptr, ext_ptr, qstart_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   stride_r2t, scale, GROUP: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr,
                   DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, E4M3_BITS: tl.constexpr, Q_F16: tl.constexpr):
    """One program: BLOCK_M query rows, BLOCK_M // HEADS prompt positions x HEADS query
    heads of one KV head (HEADS divides GROUP), so the K/V blocks it reads serve HEADS
    heads at once."""
    POS: tl.constexpr = BLOCK_M // HEADS
    b = tl.program_id(0).to(tl.int64)
    hblk = tl.program_id(1)
    mblk = tl.program_id(2)
    ext = tl.load(ext_ptr + b).to(tl.int32)
    if mblk * POS >= ext:
        return
    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    q0 = tl.load(qstart_ptr + b).to(tl.int64)
    row = tl.load(rpi_ptr + b).to(tl.int64)
    kvh = (hblk * HEADS) // GROUP
    r = tl.arange(0, BLOCK_M)
    m = mblk * POS + r // HEADS  # each row's prompt position and head
    h = hblk * HEADS + r % HEADS
    mmask = m < ext
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dvmask = dv < DV
    q = tl.load(q_ptr + (q0 + m[:, None]) * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    q = _q_for_fp8(q, Q_F16)
    # causal: prompt position prefix + m sees the cache up to itself (position 0 always)
    kv_end = tl.minimum(prefix + (mblk + 1) * POS, prefix + ext)
    out, _ = _attend_range(q, k_ptr, v_ptr, r2t_ptr + row * stride_r2t, kvh, stride_kt, stride_kh,
                           stride_vt, stride_vh, 0, kv_end, scale, d, dmask, dv, dvmask, prefix + m,
                           ROWS=BLOCK_M, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, CAUSAL=True,
                           E4M3_BITS=E4M3_BITS)
    tl.store(o_ptr + (q0 + m[:, None]) * stride_ot + h[:, None] * stride_oh + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dvmask[None, :])


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens, scale,
                     max_extend=None):
    T, H, D = q.shape
    Hk = k_cache.shape[1]
    DV = v_cache.shape[-1]
    o = torch.empty(T, H, DV, dtype=q.dtype, device=q.device)
    B = extend_lens.shape[0]
    if T == 0 or B == 0:
        return o
    q, req_pool_indices, prefix_lens, extend_lens = (_aligned(t) for t in (q, req_pool_indices, prefix_lens,
                                                                          extend_lens))
    qstart = torch.zeros(B, dtype=torch.int64, device=q.device)
    qstart[1:] = torch.cumsum(extend_lens, 0)[:-1]
    on_cpu = q.device.type == "cpu"
    if on_cpu:
        cfg = EXTEND_LAUNCH_CPU
    elif max(D, DV) > 128:
        cfg = EXTEND_LAUNCH_WIDE
    else:
        cfg = EXTEND_LAUNCH[k_cache.element_size()]
    block_m = cfg.block_m
    group = H // Hk
    heads = 1
    while cfg.grouped and group % (heads * 2) == 0 and block_m // (heads * 2) >= 16:
        heads *= 2  # the most heads of one KV head per program: a power of two dividing the group
    # the grid needs the longest extend on the host: the engine passes it (ForwardBatch.
    # max_extend_len); reading it from the device would wait for all queued work
    max_ext = int(extend_lens.max()) if max_extend is None else max_extend
    k_cache, v_cache, q_f16, e4m3_bits = _kv_operands(q, k_cache, v_cache)
    _extend_kernel[(B, H // heads, triton.cdiv(max_ext, block_m // heads))](
        q, k_cache, v_cache, o, req_to_token, req_pool_indices, prefix_lens, extend_lens, qstart,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o.stride(0), o.stride(1), req_to_token.stride(0), scale, GROUP=group, HEADS=heads, D=D, DV=DV,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV), BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, E4M3_BITS=e4m3_bits, Q_F16=q_f16, **_options(cfg, q.device))
    return o
