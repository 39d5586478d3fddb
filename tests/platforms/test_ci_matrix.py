"""ci/matrix.yaml and the GitHub Actions workflow generated from it: both parse, every
platform has a leg with suites, the accelerator legs run on self-hosted runners, and the
committed workflow is exactly what ci/matrix.py generates."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import yaml

from portaserve.platforms import platform_classes

ROOT = Path(__file__).resolve().parents[2]


def _matrix_module():
    spec = importlib.util.spec_from_file_location("ci_matrix", ROOT / "ci" / "matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_matrix_lists_every_platform_with_suites():
    legs = yaml.safe_load((ROOT / "ci" / "matrix.yaml").read_text())["platforms"]
    assert {"cpu", "nvidia", "amd", "intel-xpu", "tpu", "tpu-on-cpu"} <= set(legs)
    devices = {leg["device"] for leg in legs.values()}
    assert set(platform_classes()) - {"cpu"} <= devices | {"cpu"}, "a built-in platform has no leg"
    assert {"cpu", "cuda", "rocm", "xpu", "tpu"} <= devices
    for name, leg in legs.items():
        assert leg["suites"] and all(s["name"] and s["run"] for s in leg["suites"]), name
        assert leg["setup"], name
        accel = leg["device"] != "cpu" and name != "tpu-on-cpu"
        assert ("self-hosted" in leg["runs-on"]) == accel, name
        if accel and leg["device"] != "tpu":
            assert leg["env"].get("PORTASERVE_DEVICE") == leg["device"]
    # the cpu leg is .ci/run's: the README's test command over the whole suite
    cpu = legs["cpu"]
    assert cpu["setup"] == ['python3 -m pip install -q -e ".[cpu,test]"']
    assert [s["run"] for s in cpu["suites"]] == ["python3 -m pytest -q -p no:cacheprovider"]
    assert "pip install -e \".[cpu,test]\" && python -m pytest -q" in (ROOT / "README.md").read_text()
    # ROCm and XPU torch come from the PyTorch index
    assert "download.pytorch.org/whl/rocm" in " ".join(legs["amd"]["setup"])
    assert "download.pytorch.org/whl/xpu" in " ".join(legs["intel-xpu"]["setup"])


def test_workflow_is_generated_from_the_matrix():
    committed = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    mod = _matrix_module()
    assert committed == mod.workflow(mod.load()), "regenerate: python3 ci/matrix.py workflow > .github/workflows/ci.yml"
    wf = yaml.safe_load(committed)
    legs = mod.load()
    assert set(wf["jobs"]) == set(legs)
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "push" in on and "pull_request" in on
    for name, job in wf["jobs"].items():
        runs_on = job["runs-on"] if isinstance(job["runs-on"], list) else [job["runs-on"]]
        assert runs_on == legs[name]["runs-on"]
        runs = [s.get("run", "") for s in job["steps"]]
        for suite in legs[name]["suites"]:
            assert suite["run"] in runs
        for k, v in legs[name]["env"].items():
            assert job["env"][k] == str(v)


def test_run_suite_lists_and_rejects_unknown():
    out = subprocess.run([str(ROOT / "ci" / "run-suite"), "--list"], capture_output=True, text=True, check=True)
    assert "nvidia" in out.stdout and "--device rocm" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "ci" / "matrix.py"), "run", "quantum"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown platform" in bad.stderr
