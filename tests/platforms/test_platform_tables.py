"""Which providers each platform chooses on simulated hosts with the vendor libraries
present (fakes) or absent, the CPU platform's own choices and settings, and what
``portaserve env`` prints about them."""
from __future__ import annotations

import importlib.machinery
import sys

import pytest
import torch

from portaserve.platforms import resolve_op_table, resolve_platform
from portaserve.platforms import cpu as cpu_mod
from portaserve.platforms.cpu import CpuPlatform
from portaserve.platforms.rocm import RocmPlatform
from portaserve.platforms.tpu import TpuPlatform
from portaserve.platforms.xpu import XpuPlatform
from tests.platforms import fakes
from tests.test_platforms import Host

VENDOR_OPS = {"rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "attention_decode", "attention_extend"}


@pytest.fixture
def host(monkeypatch):
    return Host(monkeypatch)


def _install(monkeypatch, name, mod):
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, mod)


def _providers(table):
    return {op: c.provider for op, c in table.choices.items()}


def test_rocm_with_aiter_chooses_aiter(host, monkeypatch):
    host.rocm()
    p = resolve_platform()
    assert isinstance(p, RocmPlatform)
    without = resolve_op_table(p)
    for op in VENDOR_OPS:
        assert without.choices[op].provider == "triton"
        assert dict(without.choices[op].rejected)["aiter"].startswith("aiter not installed (install AMD's aiter")
    _install(monkeypatch, "aiter", fakes.make_aiter())
    chosen = _providers(resolve_op_table(p))
    assert {op for op, prov in chosen.items() if prov == "aiter"} == VENDOR_OPS
    assert chosen["rotary_embedding"] == "triton"  # no aiter adapter: the shared kernel


def test_xpu_with_ipex_chooses_ipex(host, monkeypatch):
    host.xpu()
    p = resolve_platform()
    assert isinstance(p, XpuPlatform)
    assert {resolve_op_table(p).choices[op].provider for op in VENDOR_OPS} == {"triton"}
    _install(monkeypatch, "intel_extension_for_pytorch", fakes.make_ipex())
    chosen = _providers(resolve_op_table(p))
    assert {op for op, prov in chosen.items() if prov == "ipex"} == VENDOR_OPS


def test_tpu_chooses_ragged_paged_attention(host):
    host.tpu()
    p = resolve_platform()
    assert isinstance(p, TpuPlatform) and p.dist_backend == "xla"
    chosen = _providers(resolve_op_table(p))
    assert chosen["attention_decode"] == chosen["attention_extend"] == "pallas"
    assert chosen["rmsnorm"] == "native"


def test_xla_on_cpu_needs_both_variables(host, monkeypatch):
    host.xla_installed = True
    monkeypatch.setattr("portaserve.platforms.tpu._tpu_present", lambda: False)
    monkeypatch.setenv("PORTASERVE_XLA_ON_CPU", "1")
    assert "no TPU device is present" in TpuPlatform.unavailable_reason()
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert TpuPlatform.unavailable_reason() is None


def test_cpu_chooses_sdpa_attention():
    chosen = _providers(resolve_op_table(CpuPlatform(configure_threads=False)))
    assert chosen["attention_decode"] == chosen["attention_extend"] == "sdpa"
    assert chosen["rmsnorm"] == "native"
    forced = resolve_op_table(CpuPlatform(configure_threads=False), ["all=native"])
    assert set(_providers(forced).values()) == {"native"}


def test_thread_count_respects_env(monkeypatch):
    assert cpu_mod.thread_count({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert cpu_mod.thread_count({"OMP_NUM_THREADS": "3", "PORTASERVE_CPU_THREADS": "5"}) == (5, "PORTASERVE_CPU_THREADS")
    n, src = cpu_mod.thread_count({"OMP_NUM_THREADS": "lots"})
    assert n == cpu_mod.usable_cpus() and "usable CPUs" in src
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("PORTASERVE_CPU_THREADS", "1")
        p = CpuPlatform()
        assert torch.get_num_threads() == 1 and p.describe()["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_bf16_detection_from_flags():
    assert cpu_mod.bf16_support({"avx2", "avx512f", "avx512_bf16"}) == (True, "AVX512-BF16")
    assert cpu_mod.bf16_support({"amx_bf16", "avx512_bf16"})[1] == "AMX-BF16 tiles"
    ok, why = cpu_mod.bf16_support({"avx2", "fma"})
    assert not ok and "converted through fp32" in why
    d = CpuPlatform(configure_threads=False).describe()
    assert d["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(d["bf16_native"], bool) and d["threads_from"]


def test_env_all_shows_choices_and_reasons(capsys):
    from portaserve.cli import main

    assert main(["env", "--all"]) == 0
    out = capsys.readouterr().out
    rocm = out.split("op table for rocm")[1].split("op table for")[0]
    assert "unavailable here" in rocm.splitlines()[0] or "(selected)" in rocm.splitlines()[0]
    assert "rejected: aiter [1]" in rocm and "[1] aiter not installed" in rocm
    assert rocm.count("aiter not installed") == 1  # each reason written once
    cpu = out.split("op table for cpu")[1]
    assert "sdpa" in cpu and "cpu_capability" in out and "bf16_native" in out
