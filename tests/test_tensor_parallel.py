"""Tensor parallelism on the CPU: two ranks (processes) over gloo must produce the same
greedy tokens as one rank on the same checkpoint, each rank holding only its shard."""
from __future__ import annotations

import pytest
import torch

from portaserve import Engine
from tests.conftest import random_prompts

N_TOKENS = 24


def _greedy(path, tp, prompts, **kw):
    sp = {"max_new_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=4000, tp_size=tp, **kw) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=sp)
        info = eng.get_server_info()
    return [o["output_ids"] for o in outs], info


def _check(path, prompts):
    one, info1 = _greedy(path, 1, prompts)
    two, info2 = _greedy(path, 2, prompts)
    assert info2["tp_size"] == 2 and len(info2["weight_bytes_per_rank"]) == 2
    same = sum(a == b for a, b in zip(one, two))
    assert same == len(prompts), f"TP=2 differs from TP=1 on {len(prompts) - same} of {len(prompts)} prompts"
    return info1, info2


@pytest.mark.parametrize("kind", ["llama3", "qwen3", "qwen2"])
def test_dense_tp2_matches_tp1(tiny_models, kind):
    # llama3: KV heads split (2 over 2 ranks); qwen3: one KV head replicated on both ranks,
    # tied embeddings; qwen2: q/k/v biases split with their rows
    path = tiny_models(kind)
    prompts = random_prompts(6, 512, 5, 40, seed=3)
    info1, info2 = _check(path, prompts)
    full = info1["weight_bytes_per_rank"][0]
    per_rank = info2["weight_bytes_per_rank"]
    if kind == "llama3":
        # everything but the norms is split: each rank holds about half
        assert max(per_rank) < 0.55 * full, (per_rank, full)
    assert sum(per_rank) >= full


def test_cascade_attention_tp2_matches_tp1(tiny_models):
    """Cascade attention under TP: each rank plans the same tiles (from its replica of the
    scheduler) over its own KV heads; tokens equal TP=1 without cascade."""
    path = tiny_models("llama3")
    system = random_prompts(1, 512, 150, 150, seed=8)[0]
    prompts = [system + q for q in random_prompts(4, 512, 3, 12, seed=9)]
    one, _ = _greedy(path, 1, prompts, cascade_attention="off")
    two, info = _greedy(path, 2, [system + [5]] + prompts, cascade_attention="on")
    assert info["cascade_attention"] is True and info["counters"]["decode_shared"] > 0, info["counters"]
    assert two[1:] == one


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe"])
def test_moe_tp2_matches_tp1(tiny_moe_models, kind):
    # experts split along their intermediate dim; qwen2_moe adds a split shared expert
    path = tiny_moe_models(kind)
    prompts = random_prompts(6, 512, 5, 40, seed=4)
    info1, info2 = _check(path, prompts)
    full = info1["weight_bytes_per_rank"][0]
    # the routers and norms are replicated, everything else is split
    assert max(info2["weight_bytes_per_rank"]) < 0.56 * full


def test_tp_dummy_weights_do_not_depend_on_split(tiny_models, tmp_path):
    """Random weights (--load-format dummy) are generated per checkpoint tensor, so a
    benchmark model split over two ranks is the same model as on one."""
    path = tiny_models("llama3")
    prompts = random_prompts(3, 512, 5, 20, seed=5)
    one, _ = _greedy(path, 1, prompts, load_format="dummy")
    two, _ = _greedy(path, 2, prompts, load_format="dummy")
    assert one == two


def test_lazy_weight_reads_slices(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from portaserve.models.linear import LazyWeight

    t = torch.randn(10, 6)
    save_file({"w": t, "s": torch.tensor(2.5)}, str(tmp_path / "x.safetensors"))
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        sl = f.get_slice("w")
        lw = LazyWeight(sl, sl.get_shape(), full=lambda: f.get_tensor("w"))
        assert torch.equal(lw.narrow(0, 4, 3).narrow(1, 2, 4).load(), t[4:7, 2:6])
        assert torch.equal(lw.load(), t)
        s = f.get_slice("s")
        assert float(LazyWeight(s, s.get_shape(), full=lambda: f.get_tensor("s")).load()) == 2.5
        with pytest.raises(ValueError, match="out of range"):
            lw.narrow(0, 8, 3)


def test_tp_size_errors(tiny_models):
    from portaserve.server_args import ServerArgs

    with pytest.raises(ValueError, match="num_attention_heads"):
        Engine(str(tiny_models("llama3")), skip_tokenizer_init=True, max_total_tokens=2000, tp_size=3)
    with pytest.raises(ValueError, match="dist-init-addr"):
        ServerArgs(tp_size=2, nnodes=2).validate()
    with pytest.raises(ValueError, match="divisible"):
        ServerArgs(tp_size=3, nnodes=2, dist_init_addr="127.0.0.1:1234").validate()


def test_tp_engine_refused_while_a_process_group_lives(tiny_models, tmp_path):
    """An NCCL group outlives its engine (its teardown hangs), so a second TP engine in
    the same process is refused up front with a message, before any rank starts."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="already initialized in this process"):
            Engine(str(tiny_models("llama3")), skip_tokenizer_init=True, max_total_tokens=2000, tp_size=2)
    finally:
        dist.destroy_process_group()


def _collective_worker(rank, addr, q):
    import torch.distributed as dist

    from portaserve.core import ops
    from portaserve.core.parallel import set_tp

    dist.init_process_group("gloo", init_method=f"tcp://{addr}", rank=rank, world_size=2)
    set_tp(rank, 2)
    x = torch.arange(6.0).reshape(2, 3) * (rank + 1)
    red = ops.all_reduce(x.clone())
    gat = ops.all_gather(x, -1)
    # plain lists: a tensor crosses the queue as a shared-memory handle that the parent
    # fetches from this process, which may have exited by then (connection reset in CI)
    q.put((rank, red.tolist(), gat.tolist()))
    dist.destroy_process_group()


def test_collective_ops_on_two_ranks():
    import multiprocessing as mp

    from portaserve.tp import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_collective_worker, args=(r, addr, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (a, b)) for r, a, b in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(30)
    x0 = torch.arange(6.0).reshape(2, 3)
    for r in range(2):
        red, gat = (torch.tensor(v) for v in got[r])
        assert torch.equal(red, x0 * 3)  # 1x + 2x
        assert torch.equal(gat, torch.cat([x0, x0 * 2], dim=-1))


@pytest.mark.parametrize("scheme,group", [("awq", 32), ("gptq_act", 32), ("fp8_static", 32),
                                          ("awq", -1), ("gptq_act", -1)])
def test_quantized_checkpoint_tp2_matches_tp1(tmp_path, scheme, group):
    """Packed INT4 weights, their group scales/zeros (and GPTQ's act-order g_idx) and FP8
    scales split over two ranks give the same tokens as one rank.  (FP8 with static
    activation scales: with dynamic per-token scales a row-parallel rank scales its half
    of the row by that half's maximum, as vLLM and SGLang do, which is a different —
    equally valid — quantization than one rank's, so tokens may legitimately differ.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_quantization import quantize_checkpoint

    # intermediate 128: each rank's half of down_proj's input holds whole groups of 32
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(7)
    src = tmp_path / "base"
    LlamaForCausalLM(cfg).eval().save_pretrained(str(src), safe_serialization=True)
    qdir, _ = quantize_checkpoint(src, tmp_path, scheme, group)
    prompts = random_prompts(4, 512, 5, 30, seed=8)
    one, _ = _greedy(qdir, 1, prompts)
    two, info = _greedy(qdir, 2, prompts)
    assert one == two
    assert max(info["weight_bytes_per_rank"]) < sum(info["weight_bytes_per_rank"])


def test_constrained_requests_tp3_match_tp1(default_engine):
    """Grammar requests under tensor parallelism: rank 0 announces which grammars have
    compiled, so every replica admits them at the same step, and the tokens (free and
    constrained, greedy and seeded random) equal the single-rank engine's.  The default
    model's 9 heads / 3 KV heads split over 3 ranks."""
    import json

    schema = json.dumps({"type": "object", "properties": {"name": {"type": "string"},
                                                          "age": {"type": "integer"}},
                         "required": ["name", "age"]})
    prompts = ["A user as JSON:", "An IP address:", "Tell me a joke.", "Another user, JSON:"]
    sps = [{"max_new_tokens": 40, "temperature": 0, "json_schema": schema},
           {"max_new_tokens": 20, "temperature": 1.0, "sampling_seed": 3,
            "regex": r"(\d{1,3}\.){3}\d{1,3}"},
           {"max_new_tokens": 12, "temperature": 0},
           {"max_new_tokens": 40, "temperature": 1.0, "sampling_seed": 5, "json_schema": schema}]
    want = [o["output_ids"] for o in default_engine.generate(prompts, sps)]
    with Engine(max_total_tokens=4000, tp_size=3) as eng:
        got = [o["output_ids"] for o in eng.generate(prompts, sps)]
    assert got == want


def _die():
    raise SystemExit(3)


def test_rank_dying_at_startup_fails_fast(tiny_models, monkeypatch):
    """A rank process that dies before the rendezvous makes startup fail with its exit
    code within seconds, instead of rank 0 waiting out --dist-timeout."""
    import multiprocessing as mp
    import time

    from portaserve import tp as tpmod

    def spawn_dying(args, ranks):
        procs = [mp.get_context("spawn").Process(target=_die) for _ in ranks]
        for p in procs:
            p.start()
        return procs

    monkeypatch.setattr(tpmod, "spawn_ranks", spawn_dying)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3 during startup"):
        Engine(str(tiny_models("llama3")), skip_tokenizer_init=True, max_total_tokens=2000,
               tp_size=2, dist_timeout=300)
    assert time.monotonic() - t0 < 60


def test_profile_every_rank(tiny_models, tmp_path):
    """start_profile/stop_profile reach every rank (with the synced commands): each writes
    its trace, with the same steps as rank 0's."""
    import gzip
    import json
    import time

    from portaserve.profiler import STEP_LABEL

    sp = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    with Engine(str(tiny_models("llama3")), skip_tokenizer_init=True, max_total_tokens=2000, tp_size=2) as eng:
        eng.start_profile(output_dir=str(tmp_path))
        eng.generate(input_ids=random_prompts(2, 512, 5, 20, seed=3), sampling_params=sp)
        res = eng.stop_profile()
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*-rank1.summary.txt"))) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
    traces = sorted(tmp_path.glob("*.trace.json.gz"))
    assert [p.name.rsplit("-", 1)[1] for p in traces] in (["rank0.trace.json.gz", "rank1.trace.json.gz"],
                                                         ["rank1.trace.json.gz", "rank0.trace.json.gz"])

    def steps(path):
        with gzip.open(path, "rt") as f:
            return sum(1 for e in json.load(f)["traceEvents"]
                       if e.get("cat") == "user_annotation" and e.get("name", "").startswith(STEP_LABEL + "#"))

    assert res["steps"] >= 5
    assert {steps(p) for p in traces} == {res["steps"]}
