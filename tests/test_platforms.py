"""Platform detection on simulated hosts, plugin platforms, and op-table resolution.

Every detection test starts from a simulated bare CPU host (the ``bare_host`` fixture):
a torch build without CUDA, HIP or XPU support, no torch_xla, no TPU device files, no
plugins and no PORTASERVE_DEVICE.  Each test then adds exactly what it simulates.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

import portaserve.platforms as platforms
import portaserve.platforms.tpu as tpu_mod
from portaserve.core import ops
from portaserve.core.ops import registry
from portaserve.core.ops.registry import OPS, PROVIDERS, OpResolutionError, register_provider
from portaserve.platforms import (Platform, PlatformUnavailable, platform_classes, probe_all,
                                  resolve_op_table, resolve_platform)
from portaserve.platforms.cpu import CpuPlatform
from portaserve.platforms.cuda import CudaPlatform
from portaserve.platforms.rocm import RocmPlatform
from portaserve.platforms.tpu import TpuPlatform
from portaserve.platforms.xpu import XpuPlatform
from portaserve.server_args import ServerArgs

BUILTIN = {"tpu": TpuPlatform, "rocm": RocmPlatform, "cuda": CudaPlatform, "xpu": XpuPlatform,
           "cpu": CpuPlatform}


# ---- simulated hosts ---------------------------------------------------------------------
class Host:
    """Knobs of a simulated host; every change is undone by monkeypatch."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.mp = mp
        self.xla_installed = False
        real_find_spec = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            if name == "torch_xla" or name.startswith("torch_xla."):
                if self.xla_installed:
                    return importlib.machinery.ModuleSpec(name, None)
                return None
            return real_find_spec(name, *args, **kwargs)

        mp.setattr(importlib.util, "find_spec", find_spec)
        mp.setattr(tpu_mod, "_tpu_present", lambda: False)
        mp.setattr(torch.version, "hip", None, raising=False)
        mp.setattr(torch.version, "cuda", None, raising=False)
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.delattr(torch, "xpu", raising=False)
        mp.delenv("PORTASERVE_DEVICE", raising=False)
        mp.delenv("PJRT_DEVICE", raising=False)
        mp.setattr(platforms, "_plugins", lambda: {})
        mp.setattr(platforms, "_current", None)

    def cuda(self, devices=True):
        self.mp.setattr(torch.version, "cuda", "12.4")
        self.mp.setattr(torch.cuda, "is_available", lambda: devices)

    def rocm(self, devices=True):
        self.mp.setattr(torch.version, "hip", "6.2.41133")
        self.mp.setattr(torch.cuda, "is_available", lambda: devices)

    def xpu(self, devices=True):
        self.mp.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: devices),
                        raising=False)

    def tpu(self, installed=True, present=True):
        self.xla_installed = installed
        self.mp.setattr(tpu_mod, "_tpu_present", lambda: present)

    def plugins(self, **eps):
        self.mp.setattr(platforms, "_plugins", lambda: dict(eps))


@pytest.fixture
def host(monkeypatch):
    return Host(monkeypatch)


def test_bare_host_is_cpu(host):
    p = resolve_platform()
    assert isinstance(p, CpuPlatform) and p.name == "cpu"
    assert p.device() == torch.device("cpu")
    reasons = probe_all()
    assert list(reasons) == ["tpu", "rocm", "cuda", "xpu", "cpu"]  # the probe order
    assert reasons["cpu"] is None
    assert "torch_xla is not installed" in reasons["tpu"]
    assert "not a ROCm" in reasons["rocm"]
    assert "no CUDA support" in reasons["cuda"]
    assert "no torch.xpu" in reasons["xpu"]


def test_cuda_chosen_when_available(host):
    host.cuda()
    assert resolve_platform().name == "cuda"
    assert resolve_platform("cuda").name == "cuda"
    assert "ROCm (HIP) build" in RocmPlatform.unavailable_reason()


def test_cuda_build_without_gpu_resolves_to_cpu(host):
    host.cuda(devices=False)
    assert resolve_platform().name == "cpu"
    with pytest.raises(PlatformUnavailable, match="no CUDA device visible"):
        resolve_platform("cuda")


def test_rocm_before_cuda(host):
    host.rocm()  # a HIP build answers torch.cuda.is_available() too
    assert resolve_platform().name == "rocm"
    p = resolve_platform()
    assert p.device_type == "cuda" and p.dist_backend == "nccl"
    reason = CudaPlatform.unavailable_reason()
    assert reason is not None and "ROCm build" in reason
    with pytest.raises(PlatformUnavailable, match="ROCm build"):
        resolve_platform("cuda")


def test_rocm_build_without_gpu_resolves_to_cpu(host):
    host.rocm(devices=False)
    assert resolve_platform().name == "cpu"
    with pytest.raises(PlatformUnavailable, match="no ROCm device visible"):
        resolve_platform("rocm")


def test_xpu(host):
    host.xpu()
    p = resolve_platform()
    assert isinstance(p, XpuPlatform)
    assert p.device_type == "xpu" and p.dist_backend == "xccl"


def test_xpu_present_but_no_device(host):
    host.xpu(devices=False)
    assert resolve_platform().name == "cpu"
    with pytest.raises(PlatformUnavailable, match="no Intel XPU device visible"):
        resolve_platform("xpu")


def test_cuda_probed_before_xpu(host):
    host.cuda()
    host.xpu()
    assert resolve_platform().name == "cuda"
    assert resolve_platform("xpu").name == "xpu"  # an explicit choice still works


def test_tpu_needs_torch_xla_and_a_device(host):
    host.tpu(installed=True, present=False)  # torch_xla on a CPU host is not a TPU
    assert resolve_platform().name == "cpu"
    with pytest.raises(PlatformUnavailable, match="no TPU device is present"):
        resolve_platform("tpu")
    host.tpu(installed=False, present=True)  # a TPU VM without torch_xla
    assert resolve_platform().name == "cpu"
    with pytest.raises(PlatformUnavailable, match="torch_xla is not installed"):
        resolve_platform("tpu")
    host.tpu(installed=True, present=True)
    assert resolve_platform().name == "tpu"


def test_tpu_probed_first(host):
    host.cuda()
    host.xpu()
    host.tpu()
    assert resolve_platform().name == "tpu"


def test_tpu_presence_probe(monkeypatch):
    found: dict[str, list[str]] = {}
    monkeypatch.setattr(tpu_mod.glob, "glob", lambda pat: found.get(pat, []))
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    assert tpu_mod._tpu_present() is False
    found["/dev/accel*"] = ["/dev/accel0"]
    assert tpu_mod._tpu_present() is True
    found.clear()
    found["/dev/vfio/[0-9]*"] = ["/dev/vfio/0"]
    assert tpu_mod._tpu_present() is True
    found.clear()
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert tpu_mod._tpu_present() is True
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert tpu_mod._tpu_present() is False


def test_env_var_honoured(host, monkeypatch):
    host.cuda()
    monkeypatch.setenv("PORTASERVE_DEVICE", "cpu")
    assert resolve_platform().name == "cpu"
    monkeypatch.setenv("PORTASERVE_DEVICE", "XPU")  # case-insensitive, and fails loudly
    with pytest.raises(PlatformUnavailable, match="PORTASERVE_DEVICE=xpu cannot be used here: .*no torch.xpu"):
        resolve_platform()
    with pytest.raises(PlatformUnavailable, match="PORTASERVE_DEVICE=xpu"):
        resolve_platform("auto")  # every CLI's default defers to the variable
    with pytest.raises(PlatformUnavailable, match="--device xpu cannot be used here"):
        resolve_platform("xpu")
    monkeypatch.setenv("PORTASERVE_DEVICE", "cpu")
    assert resolve_platform("auto").name == "cpu"
    assert ServerArgs(model_path="m").device == "auto"  # so `serve` without --device honours it
    monkeypatch.setenv("PORTASERVE_DEVICE", "auto")
    assert resolve_platform().name == "cuda"
    monkeypatch.setenv("PORTASERVE_DEVICE", "xpu")
    assert resolve_platform("cuda").name == "cuda"  # an explicit argument wins over the env


def test_current_platform_resolved_once(host, monkeypatch):
    first = platforms.current_platform()
    assert first.name == "cpu"
    host.cuda()  # later changes do not re-resolve
    assert platforms.current_platform() is first
    monkeypatch.setattr(platforms, "_current", None)
    assert platforms.current_platform().name == "cuda"


def test_unknown_device(host):
    with pytest.raises(PlatformUnavailable, match=r"unknown device 'quantum'.*auto.*cuda.*cpu"):
        resolve_platform("quantum")


def test_explicit_cuda_on_this_host():
    """Not simulated: on a host without a usable CUDA GPU, --device cuda says why."""
    reason = CudaPlatform.unavailable_reason()
    if reason is None:
        pytest.skip("this host has a usable CUDA GPU")
    with pytest.raises(PlatformUnavailable) as ei:
        resolve_platform("cuda")
    assert reason in str(ei.value)
    assert "--device cuda" in str(ei.value)


# ---- plugins -----------------------------------------------------------------------------
class FakeEntryPoint:
    """What importlib.metadata.EntryPoint offers the plugin loader: name and load()."""

    def __init__(self, name, obj=None, error=None):
        self.name = name
        self._obj = obj
        self._error = error
        self.loads = 0

    def load(self):
        self.loads += 1
        if self._error is not None:
            raise self._error
        return self._obj


def _plugin_platform(name, reason=None, probe_error=None):
    class PluginPlatform(Platform):
        device_type = "cpu"
        dist_backend = "gloo"

        @classmethod
        def unavailable_reason(cls):
            if probe_error is not None:
                raise probe_error
            return reason

        def provider_priority(self, op_family):
            return ["native"]

    PluginPlatform.name = name
    return PluginPlatform


def test_plugin_probed_first(host):
    host.cuda()
    cls = _plugin_platform("myaccel")
    host.plugins(myaccel=FakeEntryPoint("myaccel", cls))
    assert list(platform_classes()) == ["myaccel", "tpu", "rocm", "cuda", "xpu", "cpu"]
    p = resolve_platform()
    assert type(p) is cls and p.name == "myaccel"
    assert type(resolve_platform("myaccel")) is cls
    assert resolve_platform("cuda").name == "cuda"
    # the op table resolves for a plugin platform as for any other
    table = resolve_op_table(p)
    assert table.platform == "myaccel" and set(table.choices) == set(OPS)


def test_unavailable_plugin_is_skipped_and_explains(host):
    host.plugins(myaccel=FakeEntryPoint("myaccel", _plugin_platform("myaccel", "no MyAccel card")))
    assert resolve_platform().name == "cpu"
    assert probe_all()["myaccel"] == "no MyAccel card"
    with pytest.raises(PlatformUnavailable, match="no MyAccel card"):
        resolve_platform("myaccel")


def test_broken_plugins_do_not_break_startup(host, caplog):
    host.plugins(
        broken=FakeEntryPoint("broken", error=ImportError("no module named myaccel_rt")),
        crashy=FakeEntryPoint("crashy", _plugin_platform("crashy", probe_error=RuntimeError("driver"))),
    )
    with caplog.at_level("WARNING"):
        assert resolve_platform().name == "cpu"
    assert "broken" in caplog.text and "no module named myaccel_rt" in caplog.text
    assert "broken" not in platform_classes()
    assert probe_all()["crashy"] == "probe raised RuntimeError: driver"
    with pytest.raises(PlatformUnavailable, match="unknown device 'broken'"):
        resolve_platform("broken")


def test_real_entry_point_group_is_read(monkeypatch):
    """_plugins() reads the portaserve.platforms entry-point group."""
    seen = {}

    def fake_entry_points(group=None, **kw):
        seen["group"] = group
        return [FakeEntryPoint("zed", _plugin_platform("zed"))]

    monkeypatch.setattr(platforms, "entry_points", fake_entry_points)
    eps = platforms._plugins()
    assert seen["group"] == "portaserve.platforms"
    assert list(eps) == ["zed"]


# ---- op tables ----------------------------------------------------------------------------
@pytest.fixture
def fake_kernels(monkeypatch):
    """Register test-only providers whose targets live in a throwaway module; removed
    from the registry afterwards."""
    mod = types.ModuleType("_portaserve_test_kernels")
    mod.calls = []

    def rmsnorm(x, weight, eps):
        mod.calls.append("rmsnorm")
        return ops.native.rmsnorm(x, weight, eps)

    def silu_and_mul(x):
        mod.calls.append("silu_and_mul")
        return ops.native.silu_and_mul(x)

    mod.rmsnorm = rmsnorm
    mod.silu_and_mul = silu_and_mul
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    added = []

    def add(op, name, platforms_, requires=None, target=None, supports=None):
        register_provider(op, name, platforms_, target or f"{mod.__name__}:{op}", requires, supports)
        added.append((op, name))

    add.module = mod
    yield add
    for key in added:
        PROVIDERS.pop(key, None)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_every_op_resolves_on_every_platform(name):
    p = BUILTIN[name]()
    table = resolve_op_table(p)
    assert table.platform == name
    assert set(table.choices) == set(OPS)
    for op, choice in table.choices.items():
        prov = PROVIDERS[(op, choice.provider)]
        assert prov.check(name) is None, "chose a provider that cannot run here"
        assert callable(choice.fn) and not choice.forced
        others = [pv for (o, n), pv in PROVIDERS.items()
                  if o == op and n != "native" and pv.check(name) is None]
        if not others:
            assert choice.provider == "native" and choice.fn is OPS[op].native
        for rej, reason in choice.rejected:
            assert reason, "a rejected provider must say why"
    d = table.as_dict()
    assert set(d) == set(OPS) and all("provider" in v and "rejected" in v for v in d.values())


def test_cpu_table_is_native_today():
    table = resolve_op_table(CpuPlatform())
    cpu_providers = [k for k, pv in PROVIDERS.items() if k[1] != "native" and pv.check("cpu") is None]
    if cpu_providers:
        pytest.skip(f"CPU providers registered: {cpu_providers}")
    assert {c.provider for c in table.choices.values()} == {"native"}
    assert all(c.fn is OPS[op].native for op, c in table.choices.items())


def test_failing_requirement_is_listed_with_its_reason(fake_kernels):
    fake_kernels("rmsnorm", "fakehw", ("cpu",), requires=lambda: "needs FakeHW 9000")
    table = resolve_op_table(CpuPlatform())
    c = table.choices["rmsnorm"]
    assert c.provider == "native" and c.fn is OPS["rmsnorm"].native
    assert ("fakehw", "needs FakeHW 9000") in c.rejected
    assert {"provider": "fakehw", "reason": "needs FakeHW 9000"} in table.as_dict()["rmsnorm"]["rejected"]
    assert "needs FakeHW 9000" in table.format()
    assert table.choices["silu_and_mul"].rejected == []  # only rmsnorm got the provider


def test_provider_priority_and_rejections_on_an_accelerator(fake_kernels):
    # a kernel for CUDA/ROCm/XPU whose library is missing on this host, listed first in
    # each platform's priority: it is tried, rejected with its reason, and resolution
    # moves on to the next candidate
    fake_kernels("rmsnorm", "fakelib", ("cuda", "rocm", "xpu"),
                 requires=registry.needs_module("_no_such_fakelib_for_tests", "pip install fakelib"))
    for base in (CudaPlatform, RocmPlatform, XpuPlatform):
        cls = type("Prio" + base.__name__, (base,),
                   {"provider_priority": lambda self, fam: ["fakelib", *base.provider_priority(self, fam)]})
        c = resolve_op_table(cls()).choices["rmsnorm"]
        assert c.provider != "fakelib"
        assert c.rejected[0] == ("fakelib", "_no_such_fakelib_for_tests not installed (pip install fakelib)")
        assert PROVIDERS[("rmsnorm", c.provider)].check(base.name) is None
    # a provider for other platforms is not a rejected candidate on the CPU
    assert "fakelib" not in dict(resolve_op_table(CpuPlatform()).choices["rmsnorm"].rejected)


def test_working_provider_is_chosen_over_native(fake_kernels):
    fake_kernels("rmsnorm", "fast", ("cpu",))
    table = resolve_op_table(CpuPlatform())
    c = table.choices["rmsnorm"]
    assert c.provider == "fast" and c.fn is fake_kernels.module.rmsnorm
    x, w = torch.randn(2, 8), torch.randn(8)
    torch.testing.assert_close(c.fn(x, w, 1e-6), OPS["rmsnorm"].native(x, w, 1e-6))
    # --kernel all=native bisects back to the oracle
    table = resolve_op_table(CpuPlatform(), ["all=native"])
    assert table.choices["rmsnorm"].provider == "native" and table.choices["rmsnorm"].forced


def test_provider_for_some_models_only(fake_kernels):
    # a provider with kernels for some model shapes (FlashInfer: fp16/bf16, head sizes
    # 64/128/256) is chosen for a model it fits and rejected, with its reason, otherwise;
    # without a model (portaserve env) it is listed as the choice
    ran = []

    def fits(model):
        ran.append(model)
        return None if model["dtype"] == torch.bfloat16 else f"no kernel for {model['dtype']}"

    fake_kernels("rmsnorm", "picky", ("cpu",), supports=fits)
    assert resolve_op_table(CpuPlatform()).choices["rmsnorm"].provider == "picky"
    bf16 = {"dtype": torch.bfloat16, "kv_dtype": torch.bfloat16, "head_dim": 64}
    assert resolve_op_table(CpuPlatform(), model=bf16).choices["rmsnorm"].provider == "picky"
    c = resolve_op_table(CpuPlatform(), model=dict(bf16, dtype=torch.float32)).choices["rmsnorm"]
    assert c.provider == "native" and ("picky", "no kernel for torch.float32") in c.rejected
    assert len(ran) == 2
    with pytest.raises(ops.OpResolutionError, match="picky cannot run here: no kernel for torch.float32"):
        resolve_op_table(CpuPlatform(), ["rmsnorm=picky"], model=dict(bf16, dtype=torch.float32))


def test_import_failure_and_raising_requirement_are_rejections(fake_kernels):
    fake_kernels("rmsnorm", "ghost", ("*",), target="_portaserve_no_such_module:rmsnorm")
    fake_kernels("rmsnorm", "grumpy", ("cpu",), requires=lambda: 1 / 0)
    c = resolve_op_table(CpuPlatform()).choices["rmsnorm"]
    assert c.provider == "native"
    reasons = dict(c.rejected)
    assert reasons["ghost"].startswith("import failed: ModuleNotFoundError")
    assert reasons["grumpy"].startswith("requirement check raised ZeroDivisionError")


def test_kernel_forcing(fake_kernels):
    fake_kernels("rmsnorm", "fakehw", ("cpu",), requires=lambda: "needs FakeHW 9000")
    fake_kernels("rmsnorm", "cudaonly", ("cuda",))
    fake_kernels("silu_and_mul", "fast", ("cpu",))
    cpu = CpuPlatform()
    t = resolve_op_table(cpu, ["rmsnorm=native"])
    assert t.choices["rmsnorm"].provider == "native" and t.choices["rmsnorm"].forced
    assert t.choices["silu_and_mul"].provider == "fast" and not t.choices["silu_and_mul"].forced
    t = resolve_op_table(cpu, ["all=native", "silu_and_mul=native"])
    assert all(c.provider == "native" and c.forced for c in t.choices.values())
    with pytest.raises(ValueError, match="unknown op 'nosuchop'"):
        resolve_op_table(cpu, ["nosuchop=native"])
    with pytest.raises(ValueError, match="OP=PROVIDER"):
        resolve_op_table(cpu, ["rmsnorm"])
    with pytest.raises(OpResolutionError, match="rmsnorm=nosuch: no such provider; known: .*native"):
        resolve_op_table(cpu, ["rmsnorm=nosuch"])
    with pytest.raises(OpResolutionError, match="rmsnorm=fakehw cannot run here: needs FakeHW 9000"):
        resolve_op_table(cpu, ["rmsnorm=fakehw"])
    with pytest.raises(OpResolutionError, match="cannot run here: not for platform cpu"):
        resolve_op_table(cpu, ["rmsnorm=cudaonly"])
    # a dict of overrides is accepted as well
    assert resolve_op_table(cpu, {"rmsnorm": "native"}).choices["rmsnorm"].forced


def test_registering_twice_is_an_error(fake_kernels):
    fake_kernels("rmsnorm", "dup", ("cpu",))
    with pytest.raises(ValueError, match="registered twice"):
        fake_kernels("rmsnorm", "dup", ("cuda",))
    with pytest.raises(ValueError, match="registered twice"):
        register_provider("rmsnorm", "native", ("*",), "portaserve.core.ops.native:rmsnorm")
    with pytest.raises(ValueError, match="undeclared op"):
        register_provider("no_such_op", "x", ("cpu",), "m:f")
    with pytest.raises(ValueError, match="declared twice"):
        registry.declare_op("rmsnorm", "norm", OPS["rmsnorm"].native)
    assert PROVIDERS[("rmsnorm", "native")].target == "portaserve.core.ops.native:rmsnorm"


def test_fake_providers_are_cleaned_up():
    assert not any(name in ("fakehw", "dup", "fast", "ghost", "grumpy", "cudaonly")
                   for _, name in PROVIDERS)
    assert "_portaserve_test_kernels" not in sys.modules
