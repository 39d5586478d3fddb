"""Native (pure torch) implementations of every op.

These run on any device torch supports and are the oracle for every other provider.
They favour clarity; where a vectorised form is as clear as a loop, it is used so the
CPU platform stays usable.

Tensor conventions
  tokens are packed: T tokens of B requests, request i owning extend_lens[i] of them;
  q: [T, H, D]; k/v caches: [num_slots, H_kv, D] per layer; slot 0 is a padding slot;
  req_to_token: [max_reqs, max_context] int32, the KV slot of each position of a request.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# ---- normalisation -----------------------------------------------------------------
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)  # the same rounding order as Hugging Face's LlamaRMSNorm


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rmsnorm(x + residual), x + residual)."""
    residual = x + residual
    return rmsnorm(residual, weight, eps), residual


# ---- activation --------------------------------------------------------------------
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] = [gate | up] -> silu(gate) * up."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


# ---- rotary ------------------------------------------------------------------------
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """Apply rotary embedding.  q: [T, H, D], k: [T, Hk, D]; cos_sin_cache: [max_pos, R]
    holding cos (first R/2) and sin (last R/2) for rotary dim R <= D.  Returns (q, k)."""
    cos_sin = cos_sin_cache.index_select(0, positions)
    rot = cos_sin.shape[-1]
    cos, sin = cos_sin.chunk(2, dim=-1)  # [T, R/2]
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def apply(x):
        xr = x[..., :rot].float()
        if is_neox:
            x1, x2 = xr.chunk(2, dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if is_neox:
            out = torch.cat((o1, o2), dim=-1)
        else:
            out = torch.stack((o1, o2), dim=-1).flatten(-2)
        out = out.to(x.dtype)
        if rot < x.shape[-1]:
            out = torch.cat((out, x[..., rot:]), dim=-1)
        return out

    return apply(q), apply(k)


# ---- KV cache ----------------------------------------------------------------------
def kv_store(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k/v [T, Hk, D] into the caches at slots loc [T] (in place).  An fp8 cache
    saturates out-of-range values (a plain cast may give NaN for |x| > the format's max)."""
    if k_cache.dtype.is_floating_point and k_cache.element_size() == 1:
        lim = torch.finfo(k_cache.dtype).max
        k, v = k.clamp(-lim, lim), v.clamp(-lim, lim)
    k_cache[loc] = k.to(k_cache.dtype)
    v_cache[loc] = v.to(v_cache.dtype)


def rotary_kv_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, is_neox: bool, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """rotary_embedding on q and k, then kv_store of the rotated k and v; returns the rotated
    q.  One op so a platform can do both in one kernel (a decode step's small launches add
    up).  Where the native provider is chosen, the engine runs the two ops through their
    own chosen providers instead (ops.use_table)."""
    q, k = rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    kv_store(k_cache, v_cache, loc, k, v)
    return q


# ---- attention ---------------------------------------------------------------------
def attention_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     scale: float, max_extend: Optional[int] = None) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached prefix plus
    themselves.  The new tokens' K/V must already be in the cache.  GQA by head groups."""
    T, H, D = q.shape
    Hk = k_cache.shape[1]
    out = torch.empty(T, H, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    start = 0
    for rp, pl, el in zip(req_pool_indices.tolist(), prefix_lens.tolist(), extend_lens.tolist()):
        total = pl + el
        slots = req_to_token[rp, :total].long()
        k = k_cache[slots].to(q.dtype).transpose(0, 1)  # [Hk, L, D]
        v = v_cache[slots].to(q.dtype).transpose(0, 1)
        qi = q[start:start + el].transpose(0, 1)  # [H, el, D]
        qpos = torch.arange(pl, total, device=q.device).unsqueeze(1)
        kpos = torch.arange(total, device=q.device).unsqueeze(0)
        mask = kpos <= qpos  # [el, L]
        if H != Hk:
            k = k.repeat_interleave(H // Hk, dim=0)
            v = v.repeat_interleave(H // Hk, dim=0)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[start:start + el] = o.transpose(0, 1)
        start += el
    return out


def attention_prepare(fb, graph: bool = False) -> None:
    """Called once before each forward with its ForwardBatch (and by a graph runner
    before each replay, graph=True): attention providers that plan a batch on the host
    (FlashInfer) plan it here, from fb.seq_lens_cpu / fb.extend_lens_cpu, so that the
    layers' attention calls only launch.  The native and Triton ops need no plan."""
    return None


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per request (q: [B, H, D]) over its seq_lens[i] cached tokens."""
    B, H, D = q.shape
    Hk = k_cache.shape[1]
    max_len = int(seq_lens.max())
    pos = torch.arange(max_len, device=q.device)
    valid = pos.unsqueeze(0) < seq_lens.unsqueeze(1)  # [B, L]
    slots = req_to_token[req_pool_indices, :max_len].long()
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    k = k_cache[slots].to(q.dtype)  # [B, L, Hk, D]
    v = v_cache[slots].to(q.dtype)
    g = H // Hk
    qg = q.view(B, Hk, g, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg.float(), k.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = torch.einsum("bkgl,blkd->bkgd", p, v.float())
    return o.reshape(B, H, -1).to(q.dtype)


def _attend(q, k, v, scale):
    """q [M, Hk, g, D] over k, v [L, Hk, D]: output [M, Hk, g, DV] and log-sum-exp [M, Hk, g]
    (float32)."""
    s = torch.einsum("mkgd,lkd->mkgl", q.float(), k.float()) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("mkgl,lkd->mkgd", torch.exp(s - lse.unsqueeze(-1)), v.float())
    return o, lse


def attention_decode_shared(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale,
                            kv_start, tile_rows, tile_lens, tile_members):
    """attention_decode computed as a cascade (core/shared_prefix.py): each tile's requests
    attend to their shared prefix (positions [0, tile_len) of req_to_token[tile_row]) as one
    batch, each request to its own positions [kv_start, seq_len), and the two partial
    softmaxes merge by their log-sum-exp.  Equal to attention_decode; this form checks the
    tiles (a wrong tile changes the result) and is the reference for the kernels."""
    B, H, D = q.shape
    Hk = k_cache.shape[1]
    g = H // Hk
    qg = q.view(B, Hk, g, D)
    dv = v_cache.shape[-1]
    pre_o = torch.zeros(B, Hk, g, dv, dtype=torch.float32, device=q.device)
    pre_lse = torch.full((B, Hk, g), float("-inf"), device=q.device)
    for row, n, members in zip(tile_rows.tolist(), tile_lens.tolist(), tile_members.tolist()):
        members = [m for m in members if m >= 0]
        if n == 0 or not members:
            continue
        slots = req_to_token[row, :n].long()
        idx = torch.tensor(members, device=q.device)
        pre_o[idx], pre_lse[idx] = _attend(qg[idx], k_cache[slots].to(q.dtype), v_cache[slots].to(q.dtype), scale)
    out = torch.empty(B, Hk, g, dv, dtype=q.dtype, device=q.device)
    for i, (rp, start, end) in enumerate(zip(req_pool_indices.tolist(), kv_start.tolist(), seq_lens.tolist())):
        slots = req_to_token[rp, start:end].long()
        o, lse = _attend(qg[i:i + 1], k_cache[slots].to(q.dtype), v_cache[slots].to(q.dtype), scale)
        m = torch.maximum(lse[0], pre_lse[i])
        w_own, w_pre = torch.exp(lse[0] - m), torch.exp(pre_lse[i] - m)
        out[i] = ((o[0] * w_own.unsqueeze(-1) + pre_o[i] * w_pre.unsqueeze(-1))
                  / (w_own + w_pre).unsqueeze(-1)).to(q.dtype)
    return out.reshape(B, H, dv)


# ---- sampling ----------------------------------------------------------------------
def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, seen_mask: torch.Tensor,
                    frequency: torch.Tensor, presence: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """The CTRL/HF repetition penalty over every token seen (prompt and output), applied
    to the model's logits (its sign test is on the raw score, as in HF and vLLM), then the
    OpenAI frequency/presence penalties over output-token counts.  logits: [B, V] float."""
    rep = repetition.unsqueeze(1).to(logits.dtype)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen_mask, penalised, logits)
    counts = output_counts.to(logits.dtype)
    logits = logits - frequency.unsqueeze(1) * counts
    return logits - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row of logits [B, V]: the first index of the largest value,
    a NaN counting as larger than any number (torch's argmax)."""
    return logits.argmax(dim=-1)


def top_k_top_p_min_p_sample(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                             min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of probs [B, V] after top-k (k<=0: off), top-p and min-p
    filtering.  noise [B, V] are Exp(1) draws: the sample is argmax(p / noise) over the
    kept tokens (an exact draw from the renormalised distribution), so a provider given
    the same noise must return the same ids.  Tokens rank by probability, equal ones by
    id; a token is kept when its rank is below k, the mass ranked before it is below
    top_p and p >= min_p * max(p) (rank 0 always)."""
    B, V = probs.shape
    # stable: equal probabilities rank by token id, so the cut-offs are defined under ties
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=probs.device).unsqueeze(0)
    k = torch.where(top_k <= 0, torch.full_like(top_k, V), top_k).unsqueeze(1)
    keep = rank < k
    cum = sorted_p.cumsum(-1)
    keep &= (cum - sorted_p) < top_p.unsqueeze(1)
    keep &= sorted_p >= min_p.unsqueeze(1) * sorted_p[:, :1]
    keep[:, 0] = True
    sorted_noise = noise.gather(1, order)
    score = torch.where(keep, sorted_p / sorted_noise, torch.full_like(sorted_p, -1.0))
    choice = score.argmax(dim=-1, keepdim=True)
    return order.gather(1, choice).squeeze(1)


# ---- mixture of experts ------------------------------------------------------------
def moe_topk(router_logits: torch.Tensor, k: int, renormalize: bool):
    """Softmax routing: (weights [T, k] float32, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, ids = probs.topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k weight[t,k] * expert_{ids[t,k]}(x[t]) with SwiGLU experts:
    expert_e(x) = w2[e] @ (silu(w13[e][:I] @ x) * (w13[e][I:] @ x)).
    x: [T, H]; w13: [E, 2I, H]; w2: [E, H, I]."""
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = silu_and_mul(x[tok] @ w13[e].t()) @ w2[e].t()
        out.index_add_(0, tok, h * topk_weights[tok, slot, None].to(h.dtype))
    return out


# ---- collectives (tensor parallelism) --------------------------------------------------
def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of x over the ranks of group, in place; returns x."""
    import torch.distributed as dist

    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's x concatenated along dim, in rank order.  One fused collective into
    one buffer where the backend has it; gloo (which lacks all_gather_into_tensor in some
    builds) takes the list form."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    x = x.contiguous()
    if dist.get_backend(group) == "gloo":
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x, group=group)
    else:
        out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        if dim % x.dim() == 0:
            return out
        parts = out.chunk(n, dim=0)
    return torch.cat(parts, dim=dim)


# ---- GEMM (family "gemm") ---------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ W^T (no bias) for an unquantized W [N, K]."""
    return torch.nn.functional.linear(x, w)


# Quantized: each computes x @ W^T for a quantized W by dequantizing everything to float32
# first: the oracle the fused providers are compared with.  x: [..., K]; the result has x's leading
# dims.  Formats and quantizers: core/ops/quant.py.
def fp8_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  input_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 FP8 (e4m3).  w: [N, K] float8_e4m3fn; w_scale: per-tensor ([] / [1]) or
    per-channel ([N] / [N, 1]) float; input_scale: None (dynamic per-token activation
    scales) or a static per-tensor scale."""
    from portaserve.core.ops.quant import quantize_fp8, weight_scale_vector

    lead, K = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_fp8(x.reshape(-1, K), input_scale)
    wd = w.float() * weight_scale_vector(w_scale, w.shape[0])[:, None]
    y = (xq.float() * xs) @ wd.t()
    return y.to(out_dtype).reshape(*lead, w.shape[0])


def int8_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   input_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 INT8, symmetric.  w: [N, K] int8; w_scale per-tensor or per-channel;
    input_scale: None (dynamic per-token) or a static per-tensor scale."""
    from portaserve.core.ops.quant import quantize_int8, weight_scale_vector

    lead, K = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_int8(x.reshape(-1, K), input_scale)
    wd = w.float() * weight_scale_vector(w_scale, w.shape[0])[:, None]
    y = (xq.float() * xs) @ wd.t()
    return y.to(out_dtype).reshape(*lead, w.shape[0])


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
              g_idx, layout: str) -> torch.Tensor:
    """Weight-only INT4 with group-wise scales and zero points, in the AWQ or GPTQ
    layout (layout: "awq", "gptq" (v1 zeros, stored minus one) or "gptq_v2"); g_idx: None
    for the plain k // group_size grouping.  Returns x's dtype."""
    from portaserve.core.ops.quant import int4_dequantize

    wt = int4_dequantize(qweight, scales, qzeros, g_idx, layout)  # [K, N]
    lead, K = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, K).float() @ wt
    return y.to(x.dtype).reshape(*lead, wt.shape[1])
