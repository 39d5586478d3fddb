"""Op declarations and dispatch.

Model and engine code call ``ops.rmsnorm(...)`` etc.; each call goes to the provider the
registry chose for the current platform (see registry.py).  Until ``use_table`` is called
the native implementations run, so the ops work in isolation (tests, notebooks).
"""
from __future__ import annotations

import torch

from portaserve.core import parallel
from portaserve.core.ops import native
from portaserve.core.ops.registry import (
    OPS,
    PROVIDERS,
    OpResolutionError,
    OpTable,
    declare_op,
    parse_kernel_overrides,
    register_provider,
    resolve_ops,
)

# (op name, family, native implementation)
_DECLARATIONS = [
    ("rmsnorm", "norm", native.rmsnorm),
    ("fused_add_rmsnorm", "norm", native.fused_add_rmsnorm),
    ("silu_and_mul", "activation", native.silu_and_mul),
    ("rotary_embedding", "rotary", native.rotary_embedding),
    ("kv_store", "kv_cache", native.kv_store),
    ("rotary_kv_store", "rotary", native.rotary_kv_store),
    ("attention_extend", "attention", native.attention_extend),
    ("attention_decode", "attention", native.attention_decode),
    ("attention_decode_shared", "attention", native.attention_decode_shared),
    ("attention_prepare", "attention", native.attention_prepare),
    ("apply_penalties", "sampling", native.apply_penalties),
    ("top_k_top_p_min_p_sample", "sampling", native.top_k_top_p_min_p_sample),
    ("argmax", "sampling", native.argmax),
    ("moe_topk", "moe", native.moe_topk),
    ("fused_moe", "moe", native.fused_moe),
    ("all_reduce", "collective", native.all_reduce),
    ("all_gather", "collective", native.all_gather),
    ("linear", "gemm", native.linear),
    ("fp8_scaled_mm", "gemm", native.fp8_scaled_mm),
    ("int8_scaled_mm", "gemm", native.int8_scaled_mm),
    ("int4_gemm", "gemm", native.int4_gemm),
]
for _name, _family, _fn in _DECLARATIONS:
    declare_op(_name, _family, _fn)

_fns = {name: fn for name, _, fn in _DECLARATIONS}
_impl = dict(_fns)  # the chosen providers; _fns routes through opaque ops under torch.compile
_table: OpTable | None = None


def use_table(table: OpTable) -> None:
    """Route every op call to the providers chosen in ``table``."""
    global _table
    _table = table
    _impl.update({op: c.fn for op, c in table.choices.items()})
    for op, composed in _COMPOSED.items():  # no fused kernel chosen: the parts, as chosen
        if table.choices.get(op) is not None and table.choices[op].provider == "native":
            _impl[op] = composed
    _fns.update({op: fn for op, fn in _impl.items() if op not in _OPAQUE_ROUTES})


# ---- fused ops ------------------------------------------------------------------------
# An op that fuses others (one kernel where a platform has it) runs, where its native
# provider is chosen, as its parts through their own chosen providers; its declared
# native implementation stays plain torch (the tests' oracle, and what torch.compile traces).
def _rotary_then_store(positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache, loc):
    q, k = _fns["rotary_embedding"](positions, q, k, cos_sin_cache, is_neox)
    _fns["kv_store"](k_cache, v_cache, loc, k, v)
    return q


_COMPOSED = {"rotary_kv_store": _rotary_then_store}


# ---- torch.compile ---------------------------------------------------------------------
# Under --enable-torch-compile the ops split in two while a forward is being compiled:
# * attention and the collectives (shapes that depend on data, communication) become
#   torch custom ops: the compiler sees each as one opaque node running the provider
#   the registry chose;
# * the elementwise ops (norms, rotary, activation, the KV store) are traced in their
#   native torch form, so the compiler fuses them with each other and with the residual
#   adds between the GEMMs (a provider's hand-written kernel would stay one launch each);
#   so is the plain linear, whose GEMM the compiler then chooses.
# Outside compiled code (eager extend passes) every op still runs its chosen provider.
_OPAQUE_ROUTES: dict = {}
_FUSED_WHEN_COMPILED = ("rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "rotary_embedding", "kv_store",
                        "rotary_kv_store", "linear")


def _native_when_compiling(name: str):
    native_fn = OPS[name].native

    def route(*args):
        if torch.compiler.is_compiling():
            return native_fn(*args)
        return _impl[name](*args)

    return route


def use_opaque_ops() -> None:
    """Prepare the op routes for torch.compile (idempotent); see above."""
    if _OPAQUE_ROUTES:
        return
    from portaserve.core.ops import opaque

    _OPAQUE_ROUTES.update(opaque.routes(_impl))
    _OPAQUE_ROUTES.update({name: _native_when_compiling(name) for name in _FUSED_WHEN_COMPILED})
    _fns.update(_OPAQUE_ROUTES)


def current_table() -> OpTable | None:
    return _table


def rmsnorm(x, weight, eps):
    return _fns["rmsnorm"](x, weight, eps)


def fused_add_rmsnorm(x, residual, weight, eps):
    return _fns["fused_add_rmsnorm"](x, residual, weight, eps)


def silu_and_mul(x):
    return _fns["silu_and_mul"](x)


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True):
    return _fns["rotary_embedding"](positions, q, k, cos_sin_cache, is_neox)


def kv_store(k_cache, v_cache, loc, k, v):
    return _fns["kv_store"](k_cache, v_cache, loc, k, v)


def rotary_kv_store(positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache, loc):
    """rotary_embedding on q and k, k and v stored at slots loc; returns the rotated q."""
    return _fns["rotary_kv_store"](positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache, loc)


def attention_extend(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                     extend_lens, scale, max_extend=None):
    """max_extend: extend_lens.max() when the caller knows it on the host (providers that
    size a launch by it then need not read the device), else None."""
    return _fns["attention_extend"](q, k_cache, v_cache, req_to_token, req_pool_indices,
                                    prefix_lens, extend_lens, scale, max_extend)


def attention_decode(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    return _fns["attention_decode"](q, k_cache, v_cache, req_to_token, req_pool_indices,
                                    seq_lens, scale)


def attention_decode_shared(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale,
                            kv_start, tile_rows, tile_lens, tile_members):
    """attention_decode for a batch whose requests share cached prefixes, as a cascade
    (see core/shared_prefix.py for the tiles)."""
    return _fns["attention_decode_shared"](q, k_cache, v_cache, req_to_token, req_pool_indices,
                                           seq_lens, scale, kv_start, tile_rows, tile_lens,
                                           tile_members)


def attention_prepare(fb, graph=False):
    """Plan the coming forward's attention on the host (see native.attention_prepare)."""
    return _fns["attention_prepare"](fb, graph)


def apply_penalties(logits, output_counts, seen_mask, frequency, presence, repetition):
    return _fns["apply_penalties"](logits, output_counts, seen_mask, frequency, presence,
                                   repetition)


def top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise):
    return _fns["top_k_top_p_min_p_sample"](probs, top_k, top_p, min_p, noise)


def argmax(logits):
    return _fns["argmax"](logits)


def moe_topk(router_logits, k, renormalize):
    return _fns["moe_topk"](router_logits, k, renormalize)


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    return _fns["fused_moe"](x, w13, w2, topk_weights, topk_ids)


def all_reduce(x):
    """Sum over the tensor-parallel ranks (in place; identity on one rank)."""
    if parallel.tp_size() == 1:
        return x
    return _fns["all_reduce"](x, parallel.tp_group())


def all_gather(x, dim=-1):
    """Concatenation over the tensor-parallel ranks along dim (identity on one rank)."""
    if parallel.tp_size() == 1:
        return x
    return _fns["all_gather"](x, dim, parallel.tp_group())


def linear(x, w):
    """x @ W^T for an unquantized W [N, K] (bias added by the caller)."""
    return _fns["linear"](x, w)


def fp8_scaled_mm(x, w, w_scale, input_scale, out_dtype):
    """x @ W^T for an FP8 W [N, K] with per-tensor or per-channel weight scales and
    per-token dynamic (input_scale None) or static per-tensor activation scales."""
    return _fns["fp8_scaled_mm"](x, w, w_scale, input_scale, out_dtype)


def int8_scaled_mm(x, w, w_scale, input_scale, out_dtype):
    """x @ W^T for an INT8 W [N, K] (W8A8, symmetric)."""
    return _fns["int8_scaled_mm"](x, w, w_scale, input_scale, out_dtype)


def int4_gemm(x, qweight, scales, qzeros, g_idx, layout):
    """x @ W^T for a weight-only INT4 W in the AWQ or GPTQ layout (core/ops/quant.py)."""
    return _fns["int4_gemm"](x, qweight, scales, qzeros, g_idx, layout)


__all__ = ["OPS", "PROVIDERS", "OpResolutionError", "OpTable", "parse_kernel_overrides",
           "register_provider", "resolve_ops", "use_table", "current_table"]
