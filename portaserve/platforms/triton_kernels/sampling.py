"""Top-k / top-p / min-p sampling without sorting the vocabulary.

The op's contract (core/ops/native.py): with Exp(1) noise, the sample is argmax(p / noise)
over the kept tokens, where a token is kept when fewer than k tokens are more probable,
the mass of the more probable tokens is below top_p, and p >= min_p * max(p) (the most
probable token always is).  Every condition keeps an upper set of probabilities, so:

  1. candidate c = argmax(p / noise) over the tokens still allowed (first: p >= min_p*max);
  2. one pass counts the tokens more probable than c and sums their mass;
  3. if c passes top-k and top-p it is the answer (it beats every kept token, which are
     all allowed); otherwise no token with p <= p_c is kept: exclude them and repeat.

Each round is two passes over the row and drops the candidate and everything less
probable, so a request needs few rounds (top-p 0.9: the first candidate is kept with
probability ~0.9); one program handles one row.  Float32 probabilities only (the
sampler's); the mass is summed in another order than the native cumulative sum, so a
token whose preceding mass is within rounding of top_p may be decided differently.
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
    p_top = tl.max(pmax, axis=0)
    floor = min_p * p_top  # min-p: tokens below are never kept
    above = -1.0  # later rounds: only tokens more probable than a rejected candidate

    answer = -1
    while answer < 0:
        best_s = tl.full([BLOCK], -1.0, dtype=tl.float32)
        best_i = tl.full([BLOCK], V, dtype=tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            inside = idx < V
            p = tl.load(p_row + idx, mask=inside, other=0.0)
            n = tl.load(n_row + idx, mask=inside, other=1.0)
            ok = inside & (p >= floor) & (p > above)
            s = tl.where(ok, p / n, -1.0)
            better = s > best_s  # earlier index wins ties within a lane
            best_s = tl.where(better, s, best_s)
            best_i = tl.where(better, idx, best_i)
        top_s = tl.max(best_s, axis=0)
        cand = tl.min(tl.where(best_s == top_s, best_i, V), axis=0)
        p_c = tl.load(p_row + cand)
        count = tl.zeros([BLOCK], dtype=tl.int32)
        mass = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            p = tl.load(p_row + start + offs, mask=start + offs < V, other=0.0)
            more = p > p_c
            count += more.to(tl.int32)
            mass += tl.where(more, p, 0.0)
        n_more = tl.sum(count, axis=0)
        m_more = tl.sum(mass, axis=0)
        kept = ((k <= 0) | (n_more < k)) & (m_more < top_p)
        kept = kept | (p_c >= p_top)
        answer = tl.where(kept, cand, -1)
        above = p_c
    tl.store(out_ptr + row, answer.to(tl.int64))


def top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise):
    if probs.dtype != torch.float32 or noise.dtype != torch.float32:
        return native.top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise)
    B, V = probs.shape
    probs = probs.contiguous()
    noise = noise.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=probs.device)
    if B:
        _sample_kernel[(B,)](probs, noise, top_k.to(torch.int32).contiguous(),
                             top_p.to(torch.float32).contiguous(), min_p.to(torch.float32).contiguous(),
                             out, V, probs.stride(0), noise.stride(0), BLOCK=1024, num_warps=8)
    return out
