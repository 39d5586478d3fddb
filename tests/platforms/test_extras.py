"""Every per-platform extra resolves: ``pip install --dry-run -e .[X]`` for X in cpu, cuda,
rocm, xpu, tpu, run in parallel against the package index.  Dry runs, because on this CPU
host the accelerator stacks cannot (and must not) actually be installed: [tpu] pins torch
2.9.0 for torch_xla and [cuda]'s triton is a CUDA build.  Needs PyPI; skipped without it."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLATFORM_EXTRAS = ["cpu", "cuda", "rocm", "xpu", "tpu"]
# what each extra must bring (beyond the base dependencies)
# (on this host torch 2.13 and triton are installed already, so only [tpu] must add them)
MUST_INSTALL = {"tpu": {"torch", "torch-xla", "libtpu"}, "cuda": {"flashinfer-python"}}


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5).close()
        return True
    except Exception:
        return False


def test_every_platform_has_an_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(PLATFORM_EXTRAS) <= set(extras)
    for name in ("rocm", "xpu", "cuda", "cpu", "tpu"):
        assert not any(d.split("[")[0].split("=")[0].strip().lower() == "aiter" for d in extras[name]), \
            "never depend on PyPI's unrelated `aiter`"


@pytest.mark.network
def test_extras_resolve(tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI not reachable")
    procs = {}
    for x in PLATFORM_EXTRAS:
        report = tmp_path / f"{x}.json"
        procs[x] = (report, subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
             "--report", str(report), "-e", f".[{x}]"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failures = {}
    for x, (report, p) in procs.items():
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            failures[x] = out[-2000:]
            continue
        names = {i["metadata"]["name"].lower().replace("_", "-")
                 for i in json.loads(report.read_text())["install"]}
        missing = MUST_INSTALL.get(x, set()) - names
        assert not missing, f"[{x}] does not install {missing}"
        assert "aiter" not in names
    assert not failures, failures
