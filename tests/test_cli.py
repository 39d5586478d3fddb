"""The portaserve command line."""
from __future__ import annotations

import subprocess
import sys


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "portaserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_env_prints_platforms_and_op_table():
    r = run("env")
    assert r.returncode == 0, r.stderr
    assert "* cpu" in r.stdout and "available" in r.stdout
    for name in ("cuda", "rocm", "xpu", "tpu"):
        assert f"  {name}" in r.stdout and "unavailable:" in r.stdout
    for op in ("attention_decode", "attention_extend", "rmsnorm", "rotary_embedding", "top_k_top_p_min_p_sample"):
        assert op in r.stdout


def test_env_explicit_unusable_device_fails_loudly():
    r = run("env", "--device", "cuda")
    assert r.returncode != 0 and "cuda cannot be used here" in r.stderr


def test_env_bad_kernel_override():
    r = run("env", "--kernel", "attention_decode=nonexistent")
    assert r.returncode == 2 and "no such provider" in r.stderr and "Traceback" not in r.stderr


def test_generate_command():
    r = run("generate", "What is the capital of France?", "--max-new-tokens", "16",
            "--max-total-tokens", "2048")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert "KV pool: 2048 tokens" in r.stderr and "attention_decode" in r.stderr
