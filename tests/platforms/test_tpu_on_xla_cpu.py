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


@pytest.fixture
def xla_sampler(monkeypatch):
    """core/sampler.py builds ``torch.Generator(device=xla)``, which torch_xla refuses
    ("XLA device type not an accelerator").  Until the sampler falls back to a CPU
    generator for such devices (reported to its owner), give it one here; greedy decoding
    (all this test uses) never draws from it."""
    import torch

    from portaserve.core import sampler as sampler_mod

    real = sampler_mod.Sampler.__init__

    def init(self, vocab_size, device, seed=0):
        if torch.device(device).type == "xla":
            self.vocab_size, self.device = vocab_size, torch.device(device)
            self.generator = torch.Generator().manual_seed(seed)
            return
        real(self, vocab_size, device, seed)

    monkeypatch.setattr(sampler_mod.Sampler, "__init__", init)
    # core/scheduler.py runs forwards under torch.inference_mode(), which torch_xla does
    # not support ("Cannot set version_counter for inference tensor"); torch_xla's advice
    # is no_grad.  Until the scheduler asks the platform for its inference context
    # (reported to its owner), swap it in for this process.
    from portaserve.core import scheduler as sched_mod

    monkeypatch.setattr(sched_mod.torch, "inference_mode", lambda *a, **k: torch.no_grad())


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_greedy_tokens_match_cpu_platform(tiny_models, kind, xla_sampler):
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
