"""Top-k / top-p / min-p sampling without sorting the vocabulary.

The op's contract (core/ops/native.py): tokens rank by probability, equal probabilities by
token id; with Exp(1) noise the sample is argmax(p / noise) over the kept tokens, where a
token is kept when its rank is below k, the mass ranked before it is below top_p, and
p >= min_p * max(p) (rank 0 always is).  Every condition keeps a prefix of that ranking, so:

  1. candidate c = argmax(p / noise) over the tokens still allowed (first: p >= min_p*max);
  2. one pass counts the tokens ranked before c and sums their mass;
  3. if c passes top-k and top-p it is the answer (it beats every kept token, which are
     all allowed); otherwise no token ranked after c is kept: allow only those ranked
     before it and repeat.

Each round is two passes over the row and drops the candidate and everything ranked
after it, so a request needs few rounds (top-p 0.9: the first candidate is kept with
probability ~0.9); one program handles one row.  A row with no usable probability (NaN)
returns token 0.  Float32 probabilities only (the sampler's); the mass is summed in
another order than the native cumulative sum, so a token whose preceding mass is within
rounding of top_p may be decided differently.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.core.ops import native


@triton.jit
def _sample_kernel(p_ptr, n_ptr, k_ptr, topp_ptr, minp_ptr, out_ptr, V, stride_p, stride_n,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * stride_p
    n_row = n_ptr + row * stride_n
    k = tl.load(k_ptr + row)
    top_p = tl.load(topp_ptr + row)
    min_p = tl.load(minp_ptr + row)
    offs = tl.arange(0, BLOCK)

    pmax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        p = tl.load(p_row + start + offs, mask=start + offs < V, other=0.0)
        pmax = tl.maximum(pmax, p)
    floor = min_p * tl.max(pmax, axis=0)  # min-p: tokens below are never kept
    # later rounds allow only the tokens ranked before a rejected candidate (p_r, i_r)
    p_r = -1.0
    i_r = 0

    answer = -1
    while answer < 0:
        best_s = tl.full([BLOCK], -1.0, dtype=tl.float32)
        best_i = tl.full([BLOCK], V, dtype=tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            inside = idx < V
            p = tl.load(p_row + idx, mask=inside, other=0.0)
            n = tl.load(n_row + idx, mask=inside, other=1.0)
            ok = inside & (p >= floor) & ((p > p_r) | ((p == p_r) & (idx < i_r)))
            s = tl.where(ok, tl.div_rn(p, n), -1.0)
            better = s > best_s  # earlier index wins ties within a lane
            best_s = tl.where(better, s, best_s)
            best_i = tl.where(better, idx, best_i)
        top_s = tl.max(best_s, axis=0)
        cand = tl.min(tl.where(best_s == top_s, best_i, V), axis=0)
        found = top_s >= 0.0
        cand = tl.where(found, cand, 0)
        p_c = tl.load(p_row + cand)
        count = tl.zeros([BLOCK], dtype=tl.int32)
        mass = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            p = tl.load(p_row + idx, mask=idx < V, other=0.0)
            before = (p > p_c) | ((p == p_c) & (idx < cand))
            count += before.to(tl.int32)
            mass += tl.where(before, p, 0.0)
        n_before = tl.sum(count, axis=0)
        m_before = tl.sum(mass, axis=0)
        kept = (((k <= 0) | (n_before < k)) & (m_before < top_p)) | (n_before == 0)
        answer = tl.where(kept | (top_s < 0.0), cand, -1)
        p_r = p_c
        i_r = cand
    tl.store(out_ptr + row, answer.to(tl.int64))


def top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise):
    if probs.dtype != torch.float32 or noise.dtype != torch.float32:
        return native.top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise)
    B, V = probs.shape
    probs = probs.contiguous()
    noise = noise.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=probs.device)
    if B:
        k = top_k.clamp(max=V).to(torch.int32).contiguous()  # k >= V keeps every token
        _sample_kernel[(B,)](probs, noise, k, top_p.to(torch.float32).contiguous(),
                             min_p.to(torch.float32).contiguous(), out, V, probs.stride(0),
                             noise.stride(0), BLOCK=1024, num_warps=8)
    return out


_SELFTEST: dict = {}


def selftest() -> str | None:
    """Compile the kernel on the accelerator and compare it with the native op on a few
    rows (ties, top-k, top-p, min-p, a NaN row) before it is chosen: None when it agrees,
    else the reason (the registry then picks native and says why).  No accelerator:
    nothing to test.  Once per device and process."""
    from portaserve.platforms.triton_kernels import selftest as st

    dev = st.accel_device()
    if dev is None:
        return None

    def check():
        g = torch.Generator().manual_seed(0)
        B, V = 6, 5000
        logits = (torch.randn(B, V, generator=g) * 3).to(torch.bfloat16).float()
        logits[5] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty(B, V).exponential_(generator=g)
        k = torch.tensor([0, 1, 40, 0, 7, 5])
        p = torch.tensor([0.9, 1.0, 0.8, 1.0, 0.3, 1.0])
        m = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0])
        ref = native.top_k_top_p_min_p_sample(probs[:5], k[:5], p[:5], m[:5], noise[:5]).tolist()
        got = top_k_top_p_min_p_sample(*[t.to(dev) for t in (probs, k, p, m, noise)]).tolist()
        return None if got[:5] == ref and got[5] == 0 else \
            f"Triton sampler disagrees with native on {dev}: {got} vs {ref} + [0]"

    return st.once(_SELFTEST, str(dev), dev, "Triton sampler", check)


# ---- greedy: argmax over the vocabulary ----------------------------------------------------
# torch reduces a [1, 128256] row in one block (27 us on an H200, a tenth of the LM head's
# GEMV); here blocks of the row reduce in parallel, then one program per row picks among
# their winners.  Values compare as ordered int32 keys, so ties and NaN follow torch: the
# first index of the largest value, any NaN counting as the largest.
ARGMAX_BLOCK = 4096


@triton.jit
def _argmax_blocks(x_ptr, key_ptr, idx_ptr, V, stride_x, n_blocks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ordered like the floats
    key = tl.where(x == 0.0, 0, key)  # -0.0 ties +0.0
    key = tl.where(x != x, 0x7FFFFFFF, key)  # NaN above +inf
    key = tl.where(cols < V, key, -2147483648)
    best, at = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(key_ptr + row * n_blocks + blk, best)
    tl.store(idx_ptr + row * n_blocks + blk, blk * BLOCK + at)


@triton.jit
def _argmax_rows(key_ptr, idx_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCKS)
    key = tl.load(key_ptr + row * n_blocks + b, mask=b < n_blocks, other=-2147483648)
    _, at = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * n_blocks + at).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The op "argmax" (greedy tokens of logits [B, V]) in two launches."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return native.argmax(logits)
    B, V = logits.shape
    if B == 0 or V == 0:
        return native.argmax(logits)  # torch's answer (an error for V = 0)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n = triton.cdiv(V, ARGMAX_BLOCK)
    keys = torch.empty(B, n, dtype=torch.int32, device=logits.device)
    idx = torch.empty(B, n, dtype=torch.int32, device=logits.device)
    _argmax_blocks[(B, n)](logits, keys, idx, V, logits.stride(0), n, BLOCK=ARGMAX_BLOCK, num_warps=8)
    _argmax_rows[(B,)](keys, idx, out, n, BLOCKS=triton.next_power_of_2(n))
    return out


_ARGMAX_SELFTEST: dict = {}


def argmax_selftest() -> str | None:
    """As selftest(), for argmax: ties, NaN, infinities and signed zeros against torch."""
    from portaserve.platforms.triton_kernels import selftest as st

    dev = st.accel_device()
    if dev is None:
        return None

    def check():
        x = argmax_cases()
        want, got = native.argmax(x).tolist(), argmax(x.to(dev)).tolist()
        return None if got == want else f"Triton argmax disagrees with torch on {dev}: {got} vs {want}"

    return st.once(_ARGMAX_SELFTEST, str(dev), dev, "Triton argmax", check)


def argmax_cases(V: int = 3 * ARGMAX_BLOCK + 5) -> torch.Tensor:
    """Rows that tell argmax implementations apart: a tie across blocks, NaN before and
    after +inf, all -inf, negative values only, -0.0 before +0.0, the last column."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, V, generator=g)
    x[0, 5] = x[0, ARGMAX_BLOCK + 7] = 9.0  # tie in two blocks: the first
    x[1, 100], x[1, 50] = float("nan"), float("inf")  # NaN wins over an earlier +inf
    x[2, 30], x[2, 3 * ARGMAX_BLOCK] = float("nan"), float("nan")  # the first NaN
    x[3] = float("-inf")  # all -inf: index 0
    x[4] = -x[4].abs() - 1.0  # negatives only
    x[5] = -1.0
    x[5, 7], x[5, 9] = -0.0, 0.0  # -0.0 == +0.0: the first
    x[6, V - 1] = 50.0  # the last column
    x[7, 2 * ARGMAX_BLOCK - 1] = x[7, 2 * ARGMAX_BLOCK] = 20.0  # tie at a block boundary
    return x
