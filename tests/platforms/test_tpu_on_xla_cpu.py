"""The TPU platform's whole engine path on XLA's CPU backend: lazy XLA tensors, decode and
extend batches padded to buckets, attention gathered from the paged pool (Pallas needs a
TPU) — producing the same greedy tokens as the CPU platform on a small random model, with
a number of compiled forward graphs bounded by the bucket ladders.

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


def test_extend_batches_padded_to_buckets_bound_the_compiled_graphs(tiny_models):
    """Many different prompt lengths, one at a time and in mixed batches: every extend
    forward runs padded to (power-of-two tokens, fixed request count), each bucket's graph
    compiles once, and the greedy tokens equal the unpadded CPU run's."""
    from portaserve import Engine
    from portaserve.platforms.tpu.runner import compile_count, token_bucket

    path = tiny_models("llama3")
    lengths = [3 + (i * 29) % 120 for i in range(14)]  # 14 distinct lengths, 3..119
    assert len(set(lengths)) == len(lengths)
    prompts = [[(j * 7 + i) % 500 + 3 for j in range(L)] for i, L in enumerate(lengths)]
    sp = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    common = dict(skip_tokenizer_init=True, dtype="float32", max_total_tokens=2048,
                  context_length=256, disable_overlap_schedule=True, max_running_requests=8)

    def run(eng):
        one = [eng.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in prompts]
        mixed = [o["output_ids"] for o in eng.generate(input_ids=prompts[:5], sampling_params=sp)]
        return one, mixed

    with Engine(str(path), device="cpu", **common) as eng:
        want = run(eng)
    with Engine(str(path), device="tpu", **common) as eng:
        runner = eng.rt.scheduler.decode_graph
        c0 = compile_count()
        got = run(eng)
        total = compile_count() - c0
        ext = runner.extend
    assert got == want
    n_reqs = ext.num_reqs
    # every extend forward ran at a bucket of the ladder ...
    ladder = {(token_bucket(n), n_reqs) for n in range(1, 2 * max(lengths))}
    assert ext.buckets_used and ext.buckets_used <= ladder
    # ... far fewer shapes than prompt lengths, each compiled once (+1: the engine's first
    # forward reads the freshly loaded embedding weight as a view; see runner.py)
    assert len(ext.buckets_used) <= 5 < len(set(lengths))
    assert 0 < ext.forward_compiles <= len(ext.buckets_used) + 1, ext.compiled
    assert runner.forward_compiles <= len(runner.buckets_used)
    print(f"\nextend buckets {sorted(ext.buckets_used)}: {ext.forward_compiles} forward graphs; "
          f"decode buckets {sorted(runner.buckets_used)}: {runner.forward_compiles}; "
          f"all graphs compiled (incl. the scheduler's small bookkeeping graphs): {total}")


def test_new_prompt_lengths_compile_almost_nothing_once_warm(tiny_models):
    """Every graph around the forwards (request-table writes, padding, sampled-row
    selection, sampling) sees bucket shapes only: after one set of prompt lengths, a new
    set within the same buckets compiles at most a few graphs, and the first set again
    (new tokens) none.  Before the host-side padding: 46, then 30 and 14."""
    from portaserve import Engine
    from portaserve.platforms.tpu.runner import compile_count

    path = tiny_models("llama3")
    sp = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    common = dict(skip_tokenizer_init=True, dtype="float32", max_total_tokens=2048, context_length=256,
                  disable_overlap_schedule=True, max_running_requests=8)

    def run(eng, lengths, off):
        prompts = [[(j * 7 + i + off) % 500 + 3 for j in range(L)] for i, L in enumerate(lengths)]
        for p in prompts:
            eng.generate(input_ids=p, sampling_params=sp)
        eng.generate(input_ids=prompts[:5], sampling_params=sp)

    first = [3 + (i * 29) % 120 for i in range(14)]
    second = [4 + (i * 31) % 118 for i in range(14)]
    with Engine(str(path), device="tpu", **common) as eng:
        counts = [compile_count()]
        for lengths, off in ((first, 0), (second, 1000), (first, 2000)):
            run(eng, lengths, off)
            counts.append(compile_count())
    new = [b - a for a, b in zip(counts, counts[1:])]
    print(f"\ngraphs compiled: first lengths {new[0]}, new lengths {new[1]}, first lengths again {new[2]}")
    assert new[1] <= 5 and new[2] == 0, new


def test_runner_pads_batches_the_scheduler_did_not(tiny_models):
    """The runner's own padding (its forward hook, for batches built without
    Scheduler.padding) gives the CPU platform's tokens too, including padding beyond one
    request-table row (prompts of 20+20+20+5+3 tokens padded to 128, rows of 48)."""
    from portaserve import Engine

    path = tiny_models("llama3")
    prompts = [[(j * 5 + n) % 500 + 3 for j in range(n)] for n in (20, 20, 20, 5, 3)]
    sp = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    common = dict(skip_tokenizer_init=True, dtype="float32", max_total_tokens=2000, context_length=40,
                  disable_overlap_schedule=True, max_running_requests=6)
    with Engine(str(path), device="cpu", **common) as eng:
        want = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
    with Engine(str(path), device="tpu", **common) as eng:
        eng.rt.scheduler.padding = None
        got = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
        assert (128, eng.rt.scheduler.req_pool.size + 1) in eng.rt.scheduler.decode_graph.extend_buckets_used
    assert got == want


def test_overlap_schedule_on_xla_same_tokens_bounded_graphs(tiny_models):
    """The overlap scheduler on XLA (the platform's default): step N+1 is built and its
    graphs launched with N's sampled ids still lazy on the device (padded to N's bucket,
    gathered into N+1's when requests finish in between), then N's ids are read.  Greedy
    tokens equal the CPU platform's, overlapped steps run, and once warm a round with the
    same shapes compiles no graph (measured in one process: 15, 2, 0, 0 graphs per round
    without overlap, then 9, 0, 0, 0 more with it: its own gathers and fused graphs)."""
    from portaserve import Engine
    from portaserve.platforms.tpu.runner import compile_count

    path = tiny_models("llama3")
    prompts = random_prompts(6, 512, 3, 40, seed=13)
    sps = [{"max_new_tokens": 2 + 3 * i, "temperature": 0, "ignore_eos": True} for i in range(6)]
    # a seeded top-p request too: another sampling graph, cut apart from the bookkeeping
    sps[4] = {"max_new_tokens": 14, "temperature": 0.8, "top_p": 0.9, "sampling_seed": 7, "ignore_eos": True}
    greedy = [i for i in range(6) if i != 4]
    common = dict(skip_tokenizer_init=True, dtype="float32", max_total_tokens=2048, context_length=256,
                  max_running_requests=8)
    with Engine(str(path), device="cpu", disable_overlap_schedule=True, **common) as eng:
        want = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sps)]
    with Engine(str(path), device="tpu", **common) as eng:
        sched = eng.rt.scheduler
        assert sched.overlap and sched.lazy_device and sched.padding is not None
        launched = []
        forward = sched._decode_forward

        def spy(batch, input_ids=None):
            if input_ids is not None:
                launched.append((len(batch), int(input_ids.shape[0])))
            return forward(batch, input_ids)

        sched._decode_forward = spy
        got = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sps)]
        # the same shapes again (not prefix-cache hits); the second round may still compile a
        # graph or two as without overlap (the first forward's own), the third none
        for _ in range(2):
            assert eng.flush_cache()
            c = compile_count()
            again = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sps)]
            recompiled = compile_count() - c
    assert [got[i] for i in greedy] == [want[i] for i in greedy] and again == got
    assert len(got[4]) == 14
    assert launched and len({b for b, _ in launched}) > 2, launched  # overlapped, across finishing
    assert all(n in sched.padding.decode_sizes for _, n in launched)
    assert recompiled == 0, recompiled


def test_no_overlap_without_the_runner_that_cuts_graphs(tiny_models):
    """--disable-cuda-graph on XLA: no runner cuts the graphs between steps, so each
    step's graph would include the last; the overlap scheduler stays off there."""
    from portaserve import Engine

    with Engine(str(tiny_models("llama3")), device="tpu", skip_tokenizer_init=True, dtype="float32",
                max_total_tokens=1024, context_length=128, disable_cuda_graph=True) as eng:
        sched = eng.rt.scheduler
        assert sched.lazy_device and sched.cut_graph is None and not sched.overlap
