"""Finding, describing and loading a model: a Hugging Face folder or a GGUF file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from portaserve.models.config import ModelConfig
from portaserve.models.linear import LazyWeight
from portaserve.models.default_model import cache_dir, default_model_path
from portaserve.models.registry import build_config, model_class

logger = logging.getLogger(__name__)


class ModelNotFound(ValueError):
    pass


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf"
    path: Path  # folder (hf) or .gguf file
    name: str

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def resolve_model_path(model_path: Optional[str]) -> ModelSource:
    if model_path is None:
        p = default_model_path()
        return ModelSource("gguf", p, "SmolLM2-135M-Instruct")
    p = Path(model_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource("gguf", p.resolve(), p.stem)
    if p.is_dir():
        if (p / "config.json").exists():
            return ModelSource("hf", p.resolve(), p.name)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0].resolve(), ggufs[0].stem)
        raise ModelNotFound(f"{p} has no config.json" + (
            f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""))
    raise ModelNotFound(
        f"model path {model_path!r} does not exist (portaserve has no network access to a "
        "model hub: give a local Hugging Face folder or a .gguf file, or omit --model-path "
        "for the built-in default model)")


# ---- config and tokenizer ---------------------------------------------------------------
def _gguf_cache(src: ModelSource) -> Path:
    st = src.path.stat()
    h = hashlib.sha1(f"{src.path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf-meta" / h


def load_hf_config(src: ModelSource) -> dict:
    if src.kind == "hf":
        return json.loads((src.path / "config.json").read_text())
    meta = _gguf_cache(src)
    cfg_file = meta / "config.json"
    if cfg_file.exists():
        return json.loads(cfg_file.read_text())
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(src.path.parent), gguf_file=src.path.name).to_dict()
    meta.mkdir(parents=True, exist_ok=True)
    tmp = cfg_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg))
    os.replace(tmp, cfg_file)
    return cfg


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(src: ModelSource, tokenizer_path: Optional[str] = None):
    from transformers import AutoTokenizer

    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    if src.kind == "hf":
        if not any((src.path / f).exists() for f in TOKENIZER_FILES):
            raise ValueError(f"{src.path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); a "
                             "config-only folder, as for --load-format dummy, needs --tokenizer-path, or "
                             "--skip-tokenizer-init to take token ids only")
        return AutoTokenizer.from_pretrained(str(src.path))
    # Converting a GGUF vocabulary takes seconds: do it once, keep the result.
    meta = _gguf_cache(src) / "tokenizer"
    if (meta / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(meta))
    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    meta.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(meta))
    return tok


# ---- weights ----------------------------------------------------------------------------
def iter_hf_weights(folder: Path) -> Iterator[tuple[str, "LazyWeight"]]:
    """(name, LazyWeight) for every checkpoint tensor; safetensors tensors are read only
    as far as the model slices them (a tensor-parallel rank reads its part)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if files:
        for fname in files:
            with safe_open(str(folder / fname), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    yield k, LazyWeight(sl, sl.get_shape(), full=lambda f=f, k=k: f.get_tensor(k))
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelNotFound(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")
    for b in bins:
        yield from torch.load(str(b), map_location="cpu", weights_only=True).items()


_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp interleaves the rotary halves of llama Q/K rows; undo it."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def iter_gguf_weights(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "llama"
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, base, suffix = parts[1], parts[2], parts[3]
            if base not in _GGUF_NAMES:
                raise KeyError(f"GGUF tensor {t.name} is not understood")
            name = f"model.layers.{layer}.{_GGUF_NAMES[base]}.{suffix}"
        else:
            base, suffix = parts[0], parts[1]
            if base not in _GGUF_NAMES:
                raise KeyError(f"GGUF tensor {t.name} is not understood")
            name = f"{_GGUF_NAMES[base]}.{suffix}"
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if arch == "llama" and parts[0] == "blk" and base in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg.num_heads if base == "attn_q" else cfg.num_kv_heads)
        yield name, w


def iter_weights(src: ModelSource, cfg: ModelConfig):
    return iter_gguf_weights(src.path, cfg) if src.kind == "gguf" else iter_hf_weights(src.path)


def resolve_dtype(dtype: str, cfg: ModelConfig, platform) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype in (None, "auto"):
        if platform.device_type == "cpu":
            return torch.float32
        want = names.get((cfg.torch_dtype or "").replace("torch.", ""), torch.bfloat16)
        return torch.bfloat16 if want == torch.float32 else want
    if dtype not in names:
        raise ValueError(f"--dtype {dtype!r} not understood; use auto, float32, bfloat16 or float16")
    d = names[dtype]
    if d not in platform.supported_dtypes:
        raise ValueError(f"--dtype {dtype} is not supported on {platform.name}")
    return d


class _RandomTensor:
    """A checkpoint tensor of uniform(-0.02, 0.02) values (ones for norm weights),
    generated on the device from (seed, name) when read."""

    def __init__(self, name: str, shape, dtype, device, seed: int):
        self.name, self.shape, self.dtype, self.device = name, tuple(shape), dtype, device
        self.seed = (seed * 1_000_003 + int(hashlib.sha1(name.encode()).hexdigest()[:12], 16)) % 2**62

    def full(self) -> torch.Tensor:
        if self.name.endswith("norm.weight"):
            return torch.ones(self.shape, dtype=self.dtype, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return t.uniform_(-0.02, 0.02, generator=g)

    def __getitem__(self, index):
        return self.full()[index]


def dummy_weights(shapes, dtype, device, seed: int):
    for name, shape in shapes:
        t = _RandomTensor(name, shape, dtype, device, seed)
        yield name, LazyWeight(t, shape, full=t.full)


def load_model(src: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device,
               load_format: str = "auto", seed: int = 0) -> torch.nn.Module:
    cls = model_class(cfg)
    # build on meta in the target dtype (quantized parameters keep the dtype their method
    # chose), then materialise once on the device
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device=device)
    model.init_buffers(device)  # tensors computed at construction were lost on meta
    if load_format == "dummy" and cfg.quant_config is None and hasattr(cls, "checkpoint_shapes"):
        # random weights through the checkpoint path: the same values whatever the
        # tensor-parallel split (each tensor generated whole on the device from its name)
        model.load_weights(dummy_weights(cls.checkpoint_shapes(cfg), dtype, device, seed))
    elif load_format == "dummy":
        # random weights made on the device itself (an 8B model in seconds, no host copy)
        g = torch.Generator(device=device).manual_seed(seed)
        if cfg.quant_config is not None:  # integer / fp8 codes and their scales
            from portaserve.models.quantization import init_dummy_weights

            init_dummy_weights(model, g)
            for mod in model.modules():
                if hasattr(mod, "process_weights_after_loading"):
                    mod.process_weights_after_loading()
            return model.eval()
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.uniform_(-0.02, 0.02, generator=g)
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
    else:
        model.load_weights(iter_weights(src, cfg))
    return model.eval()
