"""--model-path as a Hugging Face repo id (from a local hub cache, or downloaded), --revision,
and the tokenizer flags --tokenizer-mode and --trust-remote-code.

The hub cache here is a fake one with huggingface_hub's real layout
(models--org--name/{blobs,snapshots/<commit>,refs/main}) whose files link to the default
model's GGUF; no test touches the network."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from portaserve.models import loader
from portaserve.models.loader import ModelNotFound, ModelSource, load_tokenizer, resolve_model_path
from portaserve.server_args import ServerArgs

MAIN = "a" * 40  # the commit refs/main points at
OTHER = "b" * 40  # an older commit, reachable only with revision=


def _fake_repo(cache: Path, gguf: Path, repo: str = "org/name") -> Path:
    """A hub cache holding `repo` at two commits; returns the cache folder."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / ("0" * 64)
    blob.parent.mkdir(parents=True)
    blob.symlink_to(gguf)  # a real cache holds the bytes; a link to them will do
    for commit in (MAIN, OTHER):
        snap = folder / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / gguf.name).symlink_to(Path("..", "..", "blobs", blob.name))  # as huggingface_hub links
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(MAIN)
    return cache


@pytest.fixture
def hub(tmp_path, monkeypatch, default_gguf):
    cache = _fake_repo(tmp_path / "hub", default_gguf)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return SimpleNamespace(cache=cache, gguf=default_gguf,
                           snap=lambda c: (cache / "models--org--name" / "snapshots" / c).resolve())


def test_repo_id_resolves_to_the_cached_snapshot(hub):
    src = resolve_model_path("org/name")
    assert src.kind == "gguf" and src.name == "org/name"
    # the snapshot's own file name (not the content-named blob it links to)
    assert src.path == hub.snap(MAIN) / hub.gguf.name
    assert resolve_model_path("org/name", revision="main").path == src.path
    assert resolve_model_path("org/name", revision=OTHER).path == hub.snap(OTHER) / hub.gguf.name
    # the GGUF metadata cache is keyed by the file the blob holds (here the default model's)
    assert loader._gguf_cache(src) == loader._gguf_cache(ModelSource("gguf", hub.gguf.resolve(), "x"))


def test_hf_home_locates_the_cache_too(tmp_path, monkeypatch, default_gguf):
    _fake_repo(tmp_path / "home" / "hub", default_gguf)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model_path("org/name")
    assert src.path.parent == (tmp_path / "home" / "hub" / "models--org--name" / "snapshots" / MAIN).resolve()


def test_missing_repo_id_names_the_repo_and_the_cache(hub):
    for repo, rev in (("org/missing", None), ("org/name", "no-such-branch")):
        with pytest.raises(ModelNotFound) as e:
            resolve_model_path(repo, revision=rev)
        msg = str(e.value)
        assert repo in msg and str(hub.cache) in msg and "not in the local Hugging Face cache" in msg
        assert "HF_HUB_OFFLINE is set" in msg and "\n" not in msg
    assert "no-such-branch" in msg
    # paths that are no repo id keep the plain message, which now mentions repo ids
    for path in ("./org/name", "/nonexistent/org/name", "nope"):
        with pytest.raises(ModelNotFound, match="does not exist: .*Hugging Face repo id"):
            resolve_model_path(path)


def test_download_when_not_cached(hub, monkeypatch):
    """Not cached and not offline: list the repo, download config, tokenizer and one copy of
    the weights; a failed download is one clear line."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.delenv("HF_HUB_OFFLINE")
    listing = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "merges.txt", "vocab.json", "README.md",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin",
               "flax_model.msgpack", "tf_model.h5", "original/consolidated.00.pth", "onnx/model.onnx"]
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(hub.snap(MAIN))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: listing)
    src = resolve_model_path("org/other", revision="v1")
    assert src.path == hub.snap(MAIN) / hub.gguf.name and src.name == "org/other"
    (_, local), (_, remote) = calls
    assert local["local_files_only"] and local["cache_dir"] == str(hub.cache) and local["revision"] == "v1"
    assert not remote.get("local_files_only") and remote["revision"] == "v1"
    got = set(filter_repo_objects(listing, allow_patterns=remote["allow_patterns"]))
    assert got == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "merges.txt", "vocab.json", "model.safetensors.index.json",
                   "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    # without safetensors: the .bin weights the loader also reads; never *.pt/*.pth/msgpack/h5
    bins = ["config.json", "pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "model.pt"]
    assert set(filter_repo_objects(bins, allow_patterns=loader._hub_allow_patterns(bins))) == {
        "config.json", "pytorch_model.bin"}

    def offline(self, repo_id, revision=None):
        raise ConnectionError("[Errno -2] Name or service not known\nsecond line")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    with pytest.raises(ModelNotFound) as e:
        resolve_model_path("org/other")
    msg = str(e.value)
    assert "'org/other'" in msg and str(hub.cache) in msg and "\n" not in msg
    assert msg.endswith("downloading it failed: ConnectionError: [Errno -2] Name or service not known second line")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_generate_command_from_the_hub_cache(hub):
    env = {**os.environ, "HF_HUB_CACHE": str(hub.cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "portaserve.cli", "generate", "hi", "--model-path", "org/name",
                        "--max-new-tokens", "2", "--max-total-tokens", "2048"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"model: {hub.snap(MAIN) / hub.gguf.name}" in r.stderr and "2 generated" in r.stderr


def _recording_autotokenizer(monkeypatch):
    import transformers

    calls = []

    def fake(path, *args, **kw):
        calls.append((str(path), kw))
        return SimpleNamespace(encode=lambda s: [1], chat_template=None, save_pretrained=lambda p: None)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    return calls


def test_tokenizer_flags_reach_autotokenizer(monkeypatch, tmp_path, default_gguf):
    calls = _recording_autotokenizer(monkeypatch)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    hf = ModelSource("hf", folder, "hf")
    gguf = ModelSource("gguf", tmp_path / "m.gguf", "m")
    monkeypatch.setattr(loader, "_gguf_cache", lambda src: tmp_path / "meta")
    for src, tok_path in ((hf, None), (hf, "some/tokenizer"), (gguf, None)):
        calls.clear()
        load_tokenizer(src, tok_path)  # the defaults: fast tokenizer, no remote code
        assert calls[-1][1].get("trust_remote_code") is False and "use_fast" not in calls[-1][1]
        calls.clear()
        load_tokenizer(src, tok_path, trust_remote_code=True, tokenizer_mode="slow")
        assert calls and all(kw["use_fast"] is False and kw["trust_remote_code"] is True for _, kw in calls)
    assert calls[-1][0] == str(tmp_path) and calls[-1][1]["gguf_file"] == "m.gguf"
    with pytest.raises(ValueError, match="tokenizer-mode"):
        load_tokenizer(hf, tokenizer_mode="fast")


def test_server_flags_and_the_server_tokenizer(monkeypatch, hub):
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    args = ServerArgs.from_cli(p.parse_args(["--model-path", "org/name", "--revision", OTHER,
                                             "--trust-remote-code", "--tokenizer-mode", "slow"]))
    assert (args.revision, args.trust_remote_code, args.tokenizer_mode) == (OTHER, True, "slow")
    default = ServerArgs()
    assert (default.revision, default.trust_remote_code, default.tokenizer_mode) == (None, False, "auto")
    with pytest.raises(SystemExit):
        p.parse_args(["--tokenizer-mode", "fast"])
    # the HTTP server's own tokenizer (SchedulerClient) follows all three
    from portaserve.server.manager import SchedulerClient

    calls = _recording_autotokenizer(monkeypatch)
    monkeypatch.setattr(loader, "_gguf_cache", lambda src: hub.cache / "meta")
    SchedulerClient._load_tokenizer(SimpleNamespace(args=args))
    path, kw = calls[-1]
    assert path == str(hub.snap(OTHER)) and kw["gguf_file"] == hub.gguf.name
    assert kw["use_fast"] is False and kw["trust_remote_code"] is True


def test_a_cached_snapshot_without_weights_is_not_the_model(hub, tmp_path):
    """A snapshot that AutoTokenizer alone filled (config and tokenizer, no weights) is not
    taken for the model: offline it is a clear error, not a failed load later."""
    folder = hub.cache / "models--org--tok-only"
    snap = folder / "snapshots" / MAIN
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "tokenizer.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(MAIN)
    with pytest.raises(ModelNotFound, match="holds no weights") as e:
        resolve_model_path("org/tok-only")
    assert "HF_HUB_OFFLINE is set" in str(e.value)
