"""Model registry keyed by the ``architectures`` entry of config.json."""
from __future__ import annotations

from portaserve.models.config import ModelConfig, llama_family_config

# architecture -> (config builder, "module:class")
_LLAMA = (llama_family_config, "portaserve.models.llama:LlamaForCausalLM")
MODELS = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "MixtralForCausalLM": _LLAMA,
    "Qwen2MoeForCausalLM": _LLAMA,
    "Qwen3MoeForCausalLM": _LLAMA,
}
# model_type -> architecture, for configs (e.g. read from GGUF) without `architectures`
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
               "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


class UnsupportedModel(ValueError):
    pass


def resolve_architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in MODELS:
            return a
    if not archs and hf.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[hf["model_type"]]
    raise UnsupportedModel(
        f"unsupported model architecture {archs or hf.get('model_type')!r}; "
        f"supported: {', '.join(sorted(MODELS))}")


def build_config(hf: dict) -> ModelConfig:
    arch = resolve_architecture(hf)
    return MODELS[arch][0](arch, hf)


def model_class(cfg: ModelConfig):
    import importlib

    mod, cls = MODELS[cfg.architecture][1].split(":")
    return getattr(importlib.import_module(mod), cls)
