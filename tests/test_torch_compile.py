"""--enable-torch-compile: decode forwards compiled by torch.compile (inductor; on the
CPU it needs a C++ compiler) give transformers' greedy tokens, compile into whole graphs
(attention and collectives are opaque custom ops, the elementwise ops are traced in
native form, so nothing breaks the graph), and are really the path decode batches take."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="inductor's CPU backend needs a C++ compiler")


def test_compiled_decode_matches_transformers(tiny_models):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from portaserve import Engine
    from portaserve.runtime import CompiledDecode

    path = tiny_models("llama3")
    hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    prompts = random_prompts(5, 512, 5, 120, seed=11)
    torch._dynamo.reset()
    counters.clear()
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=4000,
                enable_torch_compile=True, torch_compile_max_bs=4) as eng:
        sched = eng.rt.scheduler
        assert isinstance(sched.decode_graph, CompiledDecode)
        assert eng.get_server_info()["torch_compile_max_bs"] == 4
        calls = []
        replay = sched.decode_graph.replay
        sched.decode_graph.replay = lambda fb: calls.append(fb.batch_size) or replay(fb)
        # 5 requests: batch 5 runs eagerly (> max bs), batches 1-4 compiled as they finish
        outs = eng.generate(input_ids=prompts, sampling_params=[
            {"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in (6, 9, 12, 15, 18)])
    for ids, out, n in zip(prompts, outs, (6, 9, 12, 15, 18)):
        ref, _ = hf_greedy(hf, ids, n)
        assert out["output_ids"] == ref
    assert calls and max(calls) == 4 and min(calls) == 1  # the compiled path ran, bounded by max bs
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per shape


def test_torch_compile_max_bs_must_be_positive():
    from portaserve.server_args import ServerArgs

    with pytest.raises(ValueError, match="torch-compile-max-bs"):
        ServerArgs(torch_compile_max_bs=0).validate()


def test_elementwise_ops_trace_native_and_run_their_provider_eagerly(monkeypatch):
    """Under use_opaque_ops, a compiled forward traces the native rmsnorm (so the
    compiler can fuse it) while eager calls still reach the chosen provider."""
    from portaserve.core import ops
    from portaserve.core.ops import native

    ops.use_opaque_ops()
    calls = []

    def provider(x, w, eps):
        calls.append(1)
        return native.rmsnorm(x, w, eps)

    monkeypatch.setitem(ops._impl, "rmsnorm", provider)
    x, w = torch.randn(3, 8), torch.rand(8)
    ref = native.rmsnorm(x, w, 1e-6)
    torch.testing.assert_close(ops.rmsnorm(x, w, 1e-6), ref)
    assert calls == [1]
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ops.rmsnorm(a, b, 1e-6), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), ref)
    assert calls == [1]  # traced natively: the provider was not called
