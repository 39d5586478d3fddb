"""Quantized linear layers: the QuantConfig a checkpoint (or ``--quantization``) asks for,
and the LinearMethods that store and multiply quantized weights.

  method                 weights (per layer)                          GEMM op
  Fp8LinearMethod        weight fp8 e4m3 [N, K], weight_scale          fp8_scaled_mm
                         (per tensor: one per fused shard; or per
                         channel [N, 1]), input_scale if static
  Fp8OnlineLinearMethod  the checkpoint's bf16/fp32 weight, quantized   fp8_scaled_mm
                         after loading (per-channel scales)
  Int8LinearMethod       weight int8 [N, K], weight_scale, input_scale  int8_scaled_mm
  AWQLinearMethod        qweight / qzeros / scales (AutoAWQ gemm)       int4_gemm
  GPTQLinearMethod       qweight / qzeros / scales / g_idx (GPTQ v1/v2) int4_gemm

Activations of the W8A8 methods are quantized per token at run time (dynamic) or with the
checkpoint's static per-tensor scale.  Per-tensor weight scales of fused layers (q|k|v,
gate|up each with their own scale) are loaded one per shard and turned into a per-channel
scale vector after loading: exact, no requantization.  Static input scales of fused
shards are merged by taking their maximum (what vLLM and SGLang do).

Checkpoint configs understood (``quant_config_from_hf``): quant_method ``fp8`` (AutoFP8 /
vLLM style, per-tensor scales), ``awq`` (4-bit, gemm version, zero points), ``gptq``
(4-bit, any group size, act-order, v1 or v2 zero points), ``compressed-tensors`` when the
scheme is FP8 or INT8 W8A8 with tensor/channel weight scales and per-token dynamic or
per-tensor static activation scales.  Anything else is an UnsupportedQuantization error
naming what is not supported.  Layers named in ``modules_to_not_convert`` / ``ignore`` /
``ignored_layers`` stay unquantized (the LM head and MoE routers are never quantized).
"""
from __future__ import annotations

import logging
import re
import weakref
from typing import Optional

import torch
from torch import nn

from portaserve.core import ops
from portaserve.core.ops import quant
from portaserve.models.linear import LinearMethod, UnquantizedLinearMethod, add_param

logger = logging.getLogger(__name__)

# --quantization choices: formats read from a checkpoint, plus the two online ones
CLI_CHOICES = ["fp8", "w8a8_int8", "awq", "gptq", "compressed-tensors"]
ONLINE = ("fp8", "w8a8_int8")


class UnsupportedQuantization(ValueError):
    pass


def _param(layer, name, t):
    """Replace a registered parameter by t (kept frozen, tags unchanged)."""
    setattr(layer, name, nn.Parameter(t, requires_grad=False))


def _shard_sizes(layer, out_features: int) -> list:
    return list(getattr(layer, "local_sizes", None) or [out_features])


# ---- W8A8: FP8 and INT8 ------------------------------------------------------------------
class _W8A8LinearMethod(LinearMethod):
    """Shared by FP8 and INT8 checkpoints: weight [N, K] of ``qdtype``, weight_scale per
    tensor (one per fused shard) or per channel, optional static input_scale."""

    qdtype: torch.dtype
    op = None  # the GEMM op

    def __init__(self, per_channel: bool, static_input: bool):
        self.per_channel = per_channel
        self.static_input = static_input

    def create_weights(self, layer, in_features, out_features, dtype):
        n = len(_shard_sizes(layer, out_features))
        add_param(layer, "weight", torch.empty(out_features, in_features, dtype=self.qdtype),
                  output_dim=0, input_dim=1)
        if self.per_channel:
            add_param(layer, "weight_scale", torch.empty(out_features, 1, dtype=torch.float32),
                      output_dim=0, input_dim=None)
        else:
            add_param(layer, "weight_scale", torch.empty(n, dtype=torch.float32),
                      output_dim=None, input_dim=None, shard_indexed=True)
        if self.static_input:
            add_param(layer, "input_scale", torch.empty(n, dtype=torch.float32),
                      output_dim=None, input_dim=None, shard_indexed=True)
        else:
            layer.input_scale = None

    def process_weights_after_loading(self, layer):
        s = layer.weight_scale.data.float()
        if self.per_channel:
            s = s.reshape(-1)
        else:
            sizes = _shard_sizes(layer, layer.weight.shape[0])
            if len(sizes) > 1 and not bool((s == s[0]).all()):
                # one scale per fused shard -> the same numbers as a per-channel vector
                s = torch.repeat_interleave(s, torch.tensor(sizes, device=s.device))
            else:
                s = s[:1]
        _param(layer, "weight_scale", s.contiguous())
        if self.static_input:
            _param(layer, "input_scale", layer.input_scale.data.float().max().reshape(1))

    def apply(self, layer, x):
        return type(self).op(x, layer.weight, layer.weight_scale, layer.input_scale, x.dtype)

    def init_dummy(self, layer, g):
        qmax = quant.FP8_MAX if self.qdtype != torch.int8 else quant.INT8_MAX
        w = torch.empty(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
        w.uniform_(-qmax, qmax, generator=g)
        layer.weight.data.copy_(w.round() if self.qdtype == torch.int8 else w)
        layer.weight_scale.data.fill_(0.02 / qmax)  # dequantized weights in (-0.02, 0.02)
        if self.static_input:
            layer.input_scale.data.fill_(4.0 / qmax)


class Fp8LinearMethod(_W8A8LinearMethod):
    qdtype = torch.float8_e4m3fn
    op = staticmethod(ops.fp8_scaled_mm)


class Int8LinearMethod(_W8A8LinearMethod):
    qdtype = torch.int8
    op = staticmethod(ops.int8_scaled_mm)


class _OnlineW8A8LinearMethod(UnquantizedLinearMethod):
    """Loads the checkpoint's full-precision weight, then quantizes it per output channel;
    activations are quantized per token at run time."""

    quantize = None
    op = None

    def process_weights_after_loading(self, layer):
        wq, s = type(self).quantize(layer.weight.data)
        _param(layer, "weight", wq)
        add_param(layer, "weight_scale", s, output_dim=0, input_dim=None)
        layer.input_scale = None

    def apply(self, layer, x):
        return type(self).op(x, layer.weight, layer.weight_scale, None, x.dtype)


class Fp8OnlineLinearMethod(_OnlineW8A8LinearMethod):
    quantize = staticmethod(quant.quantize_weight_fp8_per_channel)
    op = staticmethod(ops.fp8_scaled_mm)


class Int8OnlineLinearMethod(_OnlineW8A8LinearMethod):
    quantize = staticmethod(quant.quantize_weight_int8_per_channel)
    op = staticmethod(ops.int8_scaled_mm)


# ---- INT4 weight-only: AWQ and GPTQ ----------------------------------------------------------
class _Int4LinearMethod(LinearMethod):
    layout = "awq"

    def __init__(self, group_size: int):
        self.group_size = group_size
        self._layer = None

    def _group(self, layer, in_features):
        """(group size on this rank, input_dim tag of the zeros/scales).  group_size -1
        is one group over the whole input: every rank keeps that single row of scales
        and zeros (it is not split with the input features)."""
        if self.group_size in (-1, 0, None):
            return in_features, None
        g = self.group_size
        if in_features % g:
            raise UnsupportedQuantization(
                f"{layer.prefix}: {in_features} input features (this rank's part) are not a "
                f"multiple of the quantization group size {g}")
        return g, 0

    def _check_out(self, layer, out_features):
        for s in _shard_sizes(layer, out_features):
            if s % 8:
                raise UnsupportedQuantization(
                    f"{layer.prefix}: output size {s} (this rank's part of a shard) is not a "
                    "multiple of 8, the 4-bit packing width")

    @property
    def ignored_params(self):
        # AutoGPTQ / AutoAWQ write a (zero) bias for every layer, biased or not
        layer = self._layer() if self._layer is not None else None
        return ("bias",) if layer is not None and layer.bias is None else ()

    def init_dummy(self, layer, g):
        for name in ("qweight", "qzeros"):
            p = getattr(layer, name)
            p.data.random_(-2 ** 31, 2 ** 31 - 1, generator=g)
        layer.scales.data.fill_(0.02 / 8)  # (q - z) in [-15, 15]: weights about (-0.04, 0.04)


class AWQLinearMethod(_Int4LinearMethod):
    layout = "awq"

    def create_weights(self, layer, in_features, out_features, dtype):
        self._layer = weakref.ref(layer)
        g, gdim = self._group(layer, in_features)
        self._check_out(layer, out_features)
        i32 = torch.int32
        add_param(layer, "qweight", torch.empty(in_features, out_features // 8, dtype=i32),
                  output_dim=1, input_dim=0)
        add_param(layer, "qzeros", torch.empty(in_features // g, out_features // 8, dtype=i32),
                  output_dim=1, input_dim=gdim)
        add_param(layer, "scales", torch.empty(in_features // g, out_features, dtype=dtype),
                  output_dim=1, input_dim=gdim)

    def apply(self, layer, x):
        return ops.int4_gemm(x, layer.qweight, layer.scales, layer.qzeros, None, "awq")


class GPTQLinearMethod(_Int4LinearMethod):
    def __init__(self, group_size: int, desc_act: bool, v2: bool):
        super().__init__(group_size)
        self.desc_act = desc_act
        self.layout = "gptq_v2" if v2 else "gptq"

    @property
    def ignored_params(self):
        return super().ignored_params + (() if self.desc_act else ("g_idx",))

    def create_weights(self, layer, in_features, out_features, dtype):
        self._layer = weakref.ref(layer)
        g, gdim = self._group(layer, in_features)
        self._check_out(layer, out_features)
        i32 = torch.int32
        full_in = getattr(layer, "in_full", in_features)
        add_param(layer, "qweight", torch.empty(in_features // 8, out_features, dtype=i32),
                  output_dim=1, input_dim=0)
        if gdim is None:  # one group over the whole input
            groups, idim = 1, None
        elif self.desc_act and full_in != in_features:
            # act-order under a split input: this rank's rows may use any group, so every
            # rank keeps all groups' zeros and scales (vLLM does the same)
            groups, idim = full_in // g, None
        else:
            groups, idim = in_features // g, gdim
        add_param(layer, "qzeros", torch.empty(groups, out_features // 8, dtype=i32),
                  output_dim=1, input_dim=idim)
        add_param(layer, "scales", torch.empty(groups, out_features, dtype=dtype),
                  output_dim=1, input_dim=idim)
        if self.desc_act:
            n = len(_shard_sizes(layer, out_features))
            if hasattr(layer, "local_sizes"):  # column-parallel: one row per fused shard
                add_param(layer, "g_idx", torch.empty(n, in_features, dtype=i32),
                          output_dim=None, input_dim=None, shard_indexed=True)
            else:
                add_param(layer, "g_idx", torch.empty(in_features, dtype=i32),
                          output_dim=None, input_dim=0)

    def process_weights_after_loading(self, layer):
        if self.desc_act and layer.g_idx.dim() == 2:
            # act-order follows the input's statistics, shared by the layers fused here
            # (q|k|v, gate|up read the same input): their g_idx are one and the same
            gi = layer.g_idx.data
            if not bool((gi == gi[:1]).all()):
                raise UnsupportedQuantization(
                    f"{layer.prefix}: the act-order g_idx of the fused layers differ")
            _param(layer, "g_idx", gi[0].contiguous())

    def apply(self, layer, x):
        g_idx = layer.g_idx if self.desc_act else None
        return ops.int4_gemm(x, layer.qweight, layer.scales, layer.qzeros, g_idx, self.layout)

    def init_dummy(self, layer, g):
        super().init_dummy(layer, g)
        if self.desc_act:
            groups = layer.scales.shape[0]
            n = layer.g_idx.shape[-1]
            perm = torch.randperm(n, generator=g, device=layer.g_idx.device)
            layer.g_idx.data.copy_((perm * groups // n).to(torch.int32).expand_as(layer.g_idx))


# ---- configs ---------------------------------------------------------------------------------
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _hf_names(prefix: str) -> list:
    """Checkpoint module names of the (possibly fused) layer called prefix."""
    head, _, last = prefix.rpartition(".")
    parts = _FUSED_PARTS.get(last, (last,))
    return [f"{head}.{p}" if head else p for p in parts]


def _matches(name: str, pattern: str, substring: bool) -> bool:
    for cand in (name, "model." + name):
        if pattern.startswith("re:"):
            if re.match(pattern[3:], cand):
                return True
        elif cand == pattern or cand.endswith("." + pattern) or (substring and pattern in cand):
            return True
    return False


class QuantConfig:
    """What a model's linear layers are quantized as (one method for every layer but the
    ignored ones)."""

    name = "base"

    def __init__(self, ignore=(), substring_ignore: bool = False):
        self.ignore = list(ignore or [])
        self.substring_ignore = substring_ignore

    def is_ignored(self, prefix: str) -> bool:
        if not self.ignore:
            return False
        hits = [any(_matches(n, p, self.substring_ignore) for p in self.ignore)
                for n in _hf_names(prefix)]
        if any(hits) and not all(hits):
            raise UnsupportedQuantization(
                f"{prefix}: the checkpoint quantizes only some of the layers fused into it "
                f"({', '.join(n for n, h in zip(_hf_names(prefix), hits) if not h)})")
        return all(hits)

    def linear_method(self, prefix: str) -> LinearMethod:
        if self.is_ignored(prefix):
            return UnquantizedLinearMethod()
        return self.make_method(prefix)

    def make_method(self, prefix: str) -> LinearMethod:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<QuantConfig {self.name}>"


class Fp8Config(QuantConfig):
    def __init__(self, per_channel=False, static_input=False, ignore=(), source="fp8"):
        super().__init__(ignore)
        self.per_channel, self.static_input = per_channel, static_input
        act = "static per-tensor" if static_input else "dynamic per-token"
        self.name = f"{source} (weights per-{'channel' if per_channel else 'tensor'}, activations {act})"

    def make_method(self, prefix):
        return Fp8LinearMethod(self.per_channel, self.static_input)


class Int8Config(Fp8Config):
    def __init__(self, per_channel=True, static_input=False, ignore=(), source="w8a8_int8"):
        super().__init__(per_channel, static_input, ignore, source)

    def make_method(self, prefix):
        return Int8LinearMethod(self.per_channel, self.static_input)


class OnlineConfig(QuantConfig):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.name = f"{kind} (online: per-channel weight scales, dynamic per-token activations)"

    def make_method(self, prefix):
        return Fp8OnlineLinearMethod() if self.kind == "fp8" else Int8OnlineLinearMethod()


class AWQConfig(QuantConfig):
    def __init__(self, group_size: int, ignore=()):
        super().__init__(ignore, substring_ignore=True)
        self.group_size = group_size
        self.name = f"awq (4-bit, group {group_size})"

    def make_method(self, prefix):
        return AWQLinearMethod(self.group_size)


class GPTQConfig(QuantConfig):
    def __init__(self, group_size: int, desc_act: bool, v2: bool, ignore=()):
        super().__init__(ignore, substring_ignore=True)
        self.group_size, self.desc_act, self.v2 = group_size, desc_act, v2
        self.name = (f"gptq{'_v2' if v2 else ''} (4-bit, group {group_size}"
                     f"{', act-order' if desc_act else ''})")

    def make_method(self, prefix):
        return GPTQLinearMethod(self.group_size, self.desc_act, self.v2)


# ---- reading a checkpoint's quantization_config ---------------------------------------------
_SUPPORTED = ("fp8, awq (4-bit gemm), gptq (4-bit), compressed-tensors (FP8 or INT8 W8A8); "
              "or --quantization fp8 / w8a8_int8 on a bf16/fp16/fp32 checkpoint")


def _unsupported(what: str) -> UnsupportedQuantization:
    return UnsupportedQuantization(f"{what} is not supported (supported: {_SUPPORTED})")


def _fp8_from_hf(qc: dict) -> QuantConfig:
    if qc.get("weight_block_size"):
        raise _unsupported(f"fp8 with block-wise weight scales (weight_block_size="
                           f"{qc['weight_block_size']})")
    act = qc.get("activation_scheme", "dynamic")
    if act not in ("dynamic", "static"):
        raise _unsupported(f"fp8 activation_scheme {act!r}")
    ignore = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
    return Fp8Config(per_channel=False, static_input=act == "static", ignore=ignore)


def _awq_from_hf(qc: dict) -> QuantConfig:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise _unsupported(f"awq with {bits}-bit weights")
    if not qc.get("zero_point", True):
        raise _unsupported("awq without zero points (zero_point: false)")
    if version != "gemm":
        raise _unsupported(f"awq version {version!r} (only the 'gemm' packing)")
    return AWQConfig(group, qc.get("modules_to_not_convert") or [])


def _gptq_from_hf(qc: dict) -> QuantConfig:
    bits = int(qc.get("bits", 4))
    if bits != 4:
        raise _unsupported(f"gptq with {bits}-bit weights")
    if qc.get("lm_head"):
        raise _unsupported("gptq with a quantized lm_head")
    if qc.get("dynamic"):
        raise _unsupported("gptq with per-module overrides ('dynamic')")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(f"gptq checkpoint_format {fmt!r}")
    return GPTQConfig(int(qc.get("group_size", 128)), bool(qc.get("desc_act", False)),
                      fmt == "gptq_v2", qc.get("modules_to_not_convert") or [])


def _describe_ct(w, a) -> str:
    def one(d):
        if not d:
            return "none"
        return (f"{d.get('num_bits')}-bit {d.get('type')} {d.get('strategy')}"
                f"{' dynamic' if d.get('dynamic') else ''}"
                f"{'' if d.get('symmetric', True) else ' asymmetric'}")
    return f"weights {one(w)}, input activations {one(a)}"


def _compressed_tensors_from_hf(qc: dict) -> QuantConfig:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise _unsupported("compressed-tensors without config_groups")
    schemes = {repr((g.get("weights"), g.get("input_activations"))) for g in groups}
    if len(schemes) > 1:
        raise _unsupported("compressed-tensors with several different schemes")
    grp = groups[0]
    w, a = grp.get("weights") or {}, grp.get("input_activations")
    targets = grp.get("targets") or ["Linear"]
    desc = _describe_ct(w, a)
    if any(t != "Linear" for t in targets):
        raise _unsupported(f"compressed-tensors targets {targets} (only 'Linear')")
    if qc.get("kv_cache_scheme"):
        raise _unsupported("compressed-tensors kv_cache_scheme (a quantized KV cache with "
                           "checkpoint scales; use --kv-cache-dtype fp8_e4m3 instead)")
    ok_w = (w.get("num_bits") == 8 and w.get("symmetric", True) and not w.get("dynamic", False)
            and w.get("strategy") in ("tensor", "channel") and w.get("type") in ("float", "int"))
    ok_a = (a is not None and a.get("num_bits") == 8 and a.get("type") == w.get("type")
            and a.get("symmetric", True)
            and ((a.get("strategy") == "token" and a.get("dynamic"))
                 or (a.get("strategy") == "tensor" and not a.get("dynamic"))))
    if not (ok_w and ok_a):
        raise _unsupported(f"compressed-tensors scheme ({desc})")
    cls = Fp8Config if w["type"] == "float" else Int8Config
    return cls(per_channel=w["strategy"] == "channel", static_input=a["strategy"] == "tensor",
               ignore=qc.get("ignore") or [], source=f"compressed-tensors {w['type']}8")


_READERS = {"fp8": _fp8_from_hf, "awq": _awq_from_hf, "gptq": _gptq_from_hf,
            "compressed-tensors": _compressed_tensors_from_hf,
            "compressed_tensors": _compressed_tensors_from_hf}


def quant_config_from_hf(hf: dict, cli_quantization: Optional[str] = None) -> Optional[QuantConfig]:
    """The QuantConfig for a Hugging Face config dict and the --quantization flag (None:
    whatever the checkpoint declares, unquantized if nothing)."""
    qc = hf.get("quantization_config") or hf.get("compression_config")
    cli = (cli_quantization or "").lower() or None
    if cli in ("none", "auto"):
        cli = None
    if cli is not None and cli not in CLI_CHOICES:
        raise UnsupportedQuantization(f"--quantization {cli_quantization!r} is not supported; "
                                      f"choose from {', '.join(CLI_CHOICES)}")
    moe = bool(hf.get("num_experts") or hf.get("num_local_experts") or hf.get("n_routed_experts"))
    if qc is None:
        if cli is None:
            return None
        if cli not in ONLINE:
            raise UnsupportedQuantization(
                f"--quantization {cli} needs a checkpoint quantized with {cli} (its config.json "
                f"has no quantization_config); to quantize at load time use one of {', '.join(ONLINE)}")
        if moe:
            logger.warning("--quantization %s: the MoE experts stay unquantized", cli)
        return OnlineConfig(cli)
    if not isinstance(qc, dict):
        raise UnsupportedQuantization(f"quantization_config must be an object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method not in _READERS:
        raise _unsupported(f"quantization method {method or '(none given)'!r} in the checkpoint's "
                           "quantization_config")
    canonical = method.replace("_", "-")
    if cli is not None and cli != canonical and not (cli == "w8a8_int8" and canonical == "compressed-tensors"):
        raise UnsupportedQuantization(
            f"--quantization {cli} conflicts with the checkpoint, which is quantized with {method}")
    if moe:
        raise _unsupported(f"{method} on a mixture-of-experts model (quantized experts)")
    return _READERS[method](qc)


# ---- random weights (--load-format dummy) ------------------------------------------------------
@torch.no_grad()
def init_dummy_weights(model: nn.Module, g: torch.Generator) -> None:
    """Random weights of the right kinds: floats in (-0.02, 0.02), norms one, quantized
    layers random integer / fp8 codes with scales that dequantize to the same range."""
    done = set()
    for mod in model.modules():
        m = getattr(mod, "method", None)
        if hasattr(m, "init_dummy"):
            m.init_dummy(mod, g)
            done.update(id(p) for n, p in mod.named_parameters(recurse=False) if n != "bias")
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        if p.dtype.is_floating_point and p.element_size() > 1:
            p.fill_(1.0) if name.endswith("norm.weight") else p.uniform_(-0.02, 0.02, generator=g)
        else:
            raise TypeError(f"no dummy initialisation for {name} ({p.dtype})")
