"""The vendor adapters (aiter on ROCm, IPEX on XPU, torch_xla's ragged paged attention on
TPU) against the native ops, with the vendor library replaced by a loop implementation of
its documented contract (tests/platforms/fakes.py).  This checks our side of each
boundary — argument order, paged views, block tables, cu_seqlens, GQA mapping, causal
alignment — on the CPU.  The vendor kernels themselves run only on their hardware
(ci/matrix.yaml: the amd, intel-xpu and tpu legs)."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from portaserve.core.ops.registry import OPS, PROVIDERS
from tests.platforms import fakes
from tests.test_ops import SPECS, TOL

CASES = {
    "aiter": ("portaserve.platforms.rocm.aiter_ops", ["rmsnorm", "fused_add_rmsnorm", "silu_and_mul",
                                                      "attention_decode", "attention_extend"]),
    "ipex": ("portaserve.platforms.xpu.ipex_ops", ["rmsnorm", "fused_add_rmsnorm", "silu_and_mul",
                                                   "attention_decode", "attention_extend"]),
    "pallas": ("portaserve.platforms.tpu.xla_ops", ["attention_decode", "attention_extend"]),
}


@pytest.fixture
def vendor(monkeypatch):
    def install(provider):
        if provider == "aiter":
            mod = fakes.make_aiter()
            monkeypatch.setitem(sys.modules, "aiter", mod)
        elif provider == "ipex":
            mod = fakes.make_ipex()
            monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", mod)
        else:
            mod = fakes.make_custom_kernel()
            monkeypatch.setitem(sys.modules, "torch_xla", types.ModuleType("torch_xla"))
            monkeypatch.setitem(sys.modules, "torch_xla.experimental", types.ModuleType("torch_xla.experimental"))
            monkeypatch.setitem(sys.modules, "torch_xla.experimental.custom_kernel", mod)
        return mod

    return install


def test_registrations_point_at_the_adapters():
    for provider, (module, ops) in CASES.items():
        for op in ops:
            p = PROVIDERS[(op, provider)]
            assert p.target == f"{module}:{op}"
            assert callable(getattr(importlib.import_module(module), op))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider,op", [(p, o) for p, (_, ops) in CASES.items() for o in ops])
def test_adapter_matches_native(vendor, provider, op, dtype, monkeypatch):
    fake = vendor(provider)
    if provider == "pallas":  # the kernel path (TPU only); off a TPU the adapter gathers itself
        monkeypatch.setattr("portaserve.platforms.tpu.xla_ops._use_kernel", lambda device: True)
    fn = getattr(importlib.import_module(CASES[provider][0]), op)
    spec = SPECS[op]
    for seed in range(4):
        g = torch.Generator().manual_seed(7000 + 31 * seed + len(op))
        args = spec.make(g, "cpu", dtype)
        ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        got_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        ref = spec.outputs(ref_args, OPS[op].native(*ref_args))
        got = spec.outputs(got_args, fn(*got_args))
        for r, o in zip(ref, got):
            assert o.shape == r.shape and o.dtype == r.dtype
            torch.testing.assert_close(o.float(), r.float(), **TOL[dtype])
        # inputs the op does not own are left alone
        for a, b in zip(args, got_args):
            if isinstance(a, torch.Tensor) and op not in ("kv_store",):
                assert torch.equal(a, b)
    if (provider, op) != ("ipex", "attention_extend"):  # prefixed batches bypass IPEX (below)
        assert fake.calls, "the vendor function was never called"


def test_ipex_extend_sends_only_prefix_free_batches_to_varlen(vendor):
    fake = vendor("ipex")
    from portaserve.platforms.xpu import ipex_ops
    from tests.test_ops import make_paged

    g = torch.Generator().manual_seed(3)
    for prefix, expect in (([0, 0], True), ([0, 5], False)):
        fake.calls.clear()
        pb = make_paged(g, torch.float32, prefix, [3, 2], 4, 2, 16)
        q = torch.randn(5, 4, 16, generator=g)
        args = (q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.rows, torch.tensor(prefix),
                torch.tensor([3, 2]), pb.scale)
        torch.testing.assert_close(ipex_ops.attention_extend(*args), OPS["attention_extend"].native(*args),
                                   atol=1e-4, rtol=1e-4)
        assert ("varlen_attention" in fake.calls) is expect


def test_tpu_adapter_gathers_from_the_pool_off_tpu(vendor):
    """Off a TPU the adapter does not call torch_xla's reference ragged attention (its
    per-sequence .item() syncs defeat fixed-shape graphs): it gathers from the pool."""
    fake = vendor("pallas")
    from portaserve.platforms.tpu import xla_ops
    from tests.test_ops import make_attention_decode

    args = make_attention_decode(torch.Generator().manual_seed(1), "cpu", torch.float32)
    torch.testing.assert_close(xla_ops.attention_decode(*args), OPS["attention_decode"].native(*args),
                               atol=1e-5, rtol=1e-5)
    assert fake.calls == []
