"""Finding, describing and loading a model: a Hugging Face folder or a GGUF file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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


def resolve_model_path(model_path: Optional[str], revision: Optional[str] = None) -> ModelSource:
    """The model to load: the built-in default (None), a local Hugging Face folder or .gguf
    file, or a Hugging Face repo id ("org/name") taken from the local Hugging Face cache or
    downloaded into it (``revision``: branch, tag or commit of the repo)."""
    if model_path is None:
        p = default_model_path()
        return ModelSource("gguf", p, "SmolLM2-135M-Instruct")
    p = Path(model_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource("gguf", p.resolve(), p.stem)
    if p.is_dir():
        return _source_in_folder(p)
    if _looks_like_repo_id(model_path):
        return _source_in_folder(Path(_hub_snapshot(model_path, revision)), name=model_path,
                                 keep_file_links=True)
    what = "is not a .gguf file or a model folder" if p.exists() else "does not exist"
    raise ModelNotFound(
        f"model path {model_path!r} {what}: give a local Hugging Face folder or .gguf "
        "file, a Hugging Face repo id (org/name; taken from the local Hugging Face cache, else "
        "downloaded unless HF_HUB_OFFLINE=1), or omit --model-path for the built-in default model")


def _source_in_folder(p: Path, name: Optional[str] = None, keep_file_links: bool = False) -> ModelSource:
    if (p / "config.json").exists():
        return ModelSource("hf", p.resolve(), name or p.name)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        # a hub snapshot's files are links to content-named blobs: keep the file's own name
        path = p.resolve() / ggufs[0].name if keep_file_links else ggufs[0].resolve()
        return ModelSource("gguf", path, name or ggufs[0].stem)
    raise ModelNotFound(f"{p} has no config.json" + (
        f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""))


# ---- Hugging Face repo ids --------------------------------------------------------------
# "org/name" as the hub spells repo ids: one slash, no leading "/" or "." (those are paths)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")

# What portaserve reads from a repo, besides one set of weights (_hub_allow_patterns): the
# config, generation config, tokenizer and chat-template files, and the Python files a
# tokenizer with --trust-remote-code may import. All small.
_HUB_SMALL_FILES = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]


def _looks_like_repo_id(s: str) -> bool:
    return bool(_REPO_ID.fullmatch(s)) and ".." not in s and "--" not in s


def _hf_hub_cache() -> str:
    """The Hugging Face hub cache as huggingface_hub finds it (HF_HUB_CACHE, else
    HF_HOME/hub, else ~/.cache/huggingface/hub), read from the environment now rather than
    when huggingface_hub was first imported."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
           or os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub"))
    return os.path.expandvars(os.path.expanduser(hub))


def _hf_hub_offline() -> bool:
    val = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return val.upper() in ("1", "ON", "YES", "TRUE")


def _hub_allow_patterns(repo_files: list[str]) -> list[str]:
    """The files of a repo worth downloading: the small ones and one copy of the weights.
    Repos often hold the same weights several times (safetensors, pytorch_model*.bin, *.pt,
    *.pth, *.msgpack, *.h5, ONNX, a consolidated.safetensors); take the safetensors that
    transformers writes (model.safetensors or model-0000i-of-0000n.safetensors) where they
    exist, else any top-level safetensors, else pytorch_model*.bin (the fallback the loader
    reads), else the repo's .gguf if it has just one (as in a local folder)."""
    from fnmatch import fnmatch

    top = [f for f in repo_files if "/" not in f]
    if any(fnmatch(f, "model*.safetensors") for f in top):
        weights = ["model*.safetensors"]
    elif any(f.endswith(".safetensors") for f in top):
        weights = [f for f in top if f.endswith(".safetensors")]
    elif any(fnmatch(f, "pytorch_model*.bin") for f in top):
        weights = ["pytorch_model*.bin"]
    else:
        ggufs = [f for f in top if f.endswith(".gguf")]
        weights = ggufs if len(ggufs) == 1 else []
    return _HUB_SMALL_FILES + weights


def _has_weights(folder: Path) -> bool:
    """Any file of weights portaserve reads: safetensors, pytorch_model*.bin or a .gguf."""
    return any(any(folder.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin", "*.gguf"))


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _hub_snapshot(repo_id: str, revision: Optional[str]) -> str:
    """The local snapshot folder of a Hugging Face repo: from the cache, else downloaded
    (unless HF_HUB_OFFLINE is set). Any failure is a ModelNotFound naming the repo, the
    cache and the error, in one line."""
    cache = _hf_hub_cache()
    at = f" at revision {revision!r}" if revision else ""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as e:  # comes with transformers; a broken install
        raise ModelNotFound(f"model path {repo_id!r} is not a local file or folder, and the Hugging "
                            f"Face repo {repo_id}{at} cannot be looked up: {_one_line(e)}") from None
    try:
        # the local cache first, no network at all; a snapshot holding no weights (a cache
        # that AutoTokenizer or AutoConfig alone filled, an interrupted download) is not it
        local = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                  allow_patterns=_HUB_SMALL_FILES)
        if _has_weights(Path(local)):
            return local
        local_error = FileNotFoundError(f"the cached snapshot {local} holds no weights")
    except Exception as e:  # noqa: BLE001 - not cached (or not completely): download below
        local_error = e
    where = (f"model path {repo_id!r} is not a local file or folder, and the Hugging Face repo "
             f"{repo_id}{at} is not in the local Hugging Face cache at {cache}")
    if _hf_hub_offline():
        # huggingface_hub's plain "not cached" says to pass local_files_only=False: leave it
        # out; other reasons (a half-downloaded snapshot, an invalid repo id) say more
        why = "" if type(local_error).__name__ == "LocalEntryNotFoundError" else f" ({_one_line(local_error)})"
        raise ModelNotFound(f"{where}, and HF_HUB_OFFLINE is set, so it was not downloaded{why}") from None
    logger.info("downloading %s%s from the Hugging Face hub into %s", repo_id, at, cache)
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        return snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                 allow_patterns=_hub_allow_patterns(files))
    except Exception as e:  # noqa: BLE001 - network, authentication, no such repo or revision
        raise ModelNotFound(f"{where}, and downloading it failed: {_one_line(e)}") from None


# ---- config and tokenizer ---------------------------------------------------------------
def _gguf_cache(src: ModelSource) -> Path:
    # a hub snapshot's .gguf is a link to a content-named blob of the cache: key by the blob,
    # which every snapshot holding it shares (other sources' paths are not links)
    real = src.path.resolve() if src.path.is_symlink() else src.path
    st = real.stat()
    h = hashlib.sha1(f"{real}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
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


def load_tokenizer(src: ModelSource, tokenizer_path: Optional[str] = None, *,
                   trust_remote_code: bool = False, tokenizer_mode: str = "auto",
                   chat_template: Optional[str] = None):
    """The model's tokenizer through transformers' AutoTokenizer (``tokenizer_path`` if
    given). ``trust_remote_code`` lets a repo's own tokenizer code run; ``tokenizer_mode``
    "slow" asks for the Python tokenizer (use_fast=False; transformers 5 has fast ones only
    and ignores it); ``chat_template`` (--chat-template: a file holding a Jinja template,
    or the template itself) replaces the model's."""
    tok = _load_tokenizer(src, tokenizer_path, trust_remote_code, tokenizer_mode)
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        elif "{%" not in chat_template and "{{" not in chat_template:
            raise ValueError(f"--chat-template {chat_template!r} is neither a file nor a Jinja template")
        tok.chat_template = chat_template
    return tok


def _load_tokenizer(src: ModelSource, tokenizer_path, trust_remote_code: bool, tokenizer_mode: str):
    from transformers import AutoTokenizer

    if tokenizer_mode not in ("auto", "slow"):
        raise ValueError(f"--tokenizer-mode {tokenizer_mode!r}: choose from auto, slow")
    kw = {"trust_remote_code": trust_remote_code}
    if tokenizer_mode == "slow":
        kw["use_fast"] = False
    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path, **kw)
    if src.kind == "hf":
        if not any((src.path / f).exists() for f in TOKENIZER_FILES):
            raise ValueError(f"{src.path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); a "
                             "config-only folder, as for --load-format dummy, needs --tokenizer-path, or "
                             "--skip-tokenizer-init to take token ids only")
        return AutoTokenizer.from_pretrained(str(src.path), **kw)
    # Converting a GGUF vocabulary takes seconds: do it once, keep the result.
    meta = _gguf_cache(src) / "tokenizer"
    if (meta / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(meta), **kw)
    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name, **kw)
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
