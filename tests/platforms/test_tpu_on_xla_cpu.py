"""The TPU platform's whole engine path on XLA's CPU backend: lazy XLA tensors, padded
decode buckets, torch_xla's ragged paged attention (its reference path; Pallas needs a
TPU) — producing the same greedy tokens as the CPU platform on a small random model.

Needs torch_xla, which pairs with its own torch version, so it runs in a separate
environment (``ci/run-suite tpu-on-cpu`` builds /tmp/xla-venv and runs this file with
PJRT_DEVICE=CPU PORTASERVE_XLA_ON_CPU=1).  Skipped elsewhere."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is None
    or os.environ.get("PJRT_DEVICE") != "CPU" or os.environ.get("PORTASERVE_XLA_ON_CPU") != "1",
    reason="needs torch_xla with PJRT_DEVICE=CPU PORTASERVE_XLA_ON_CPU=1 (ci/run-suite tpu-on-cpu)")


def test_tpu_platform_resolves_and_uses_pallas_provider():
    from portaserve.platforms import resolve_op_table, resolve_platform

    p = resolve_platform("tpu")
    assert p.name == "tpu" and p.device().type == "xla" and p.dist_backend == "xla"
    table = resolve_op_table(p).as_dict()
    assert table["attention_decode"]["provider"] == "pallas"
    assert table["attention_extend"]["provider"] == "pallas"


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_greedy_tokens_match_cpu_platform(tiny_models, kind):
    from portaserve import Engine

    path = tiny_models(kind)
    prompts = random_prompts(3, 512, 3, 24, seed=11)
    sp = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    common = dict(skip_tokenizer_init=True, dtype="float32", max_total_tokens=2048,
                  context_length=256, disable_overlap_schedule=True)
    with Engine(str(path), device="cpu", **common) as eng:
        want = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
    with Engine(str(path), device="tpu", **common) as eng:
        assert eng.rt.platform.name == "tpu"
        assert eng.rt.op_table.as_dict()["attention_decode"]["provider"] == "pallas"
        runner = eng.rt.scheduler.decode_graph
        assert runner is not None and type(runner).__name__ == "XlaDecodeRunner"
        got = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
        # decode batches ran padded to buckets of the fixed ladder
        assert runner.buckets_used and runner.buckets_used <= set(runner.sizes)
    assert got == want
