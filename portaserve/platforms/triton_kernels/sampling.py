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
    from portaserve.platforms.triton_kernels.int4_gemm import _accel_device

    dev = _accel_device()
    if dev is None:
        return None
    key = str(dev)
    if key not in _SELFTEST:
        try:
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
            _SELFTEST[key] = (None if got[:5] == ref and got[5] == 0 else
                              f"Triton sampler disagrees with native on {dev}: {got} vs {ref} + [0]")
        except Exception as e:  # a kernel that does not compile here
            _SELFTEST[key] = f"Triton sampler failed on {dev}: {type(e).__name__}: {e}"
    return _SELFTEST[key]
