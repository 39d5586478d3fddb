"""Cascade attention over prefixes shared through the radix cache (--cascade-attention).

The tile planner is checked against a brute-force common-prefix search; the cascade form
of decode attention (native, and the Triton kernel in tests/triton) against plain decode
attention; and the engine with cascade on against transformers, with cascade really
running (requests sharing a long system prompt decode together)."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from portaserve.core import shared_prefix as sp
from portaserve.core.ops import native
from tests.conftest import random_prompts
from tests.test_hf_equivalence import _check_against_hf


def _brute_common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _shared_slot_lists(rng, groups, own=(1, 40), header=0):
    """Slot lists like the radix cache makes them: each group's requests hold the same
    slots for the group's prefix (and some of them more: a longer cached path), then
    slots of their own; with header > 0 every request starts with the same header slots
    (a BOS token, a chat template's first tokens).  groups: [(prefix length, members)]."""
    next_slot = [1]

    def fresh(n):
        out = list(range(next_slot[0], next_slot[0] + n))
        next_slot[0] += n
        return out

    head = fresh(header)
    lists = []
    for plen, n in groups:
        pre = head + fresh(max(plen - header, 0))
        deeper = fresh(rng.randint(0, 30))  # a longer path some members share
        for _ in range(n):
            extra = deeper if rng.random() < 0.5 else []
            lists.append(pre + extra + fresh(rng.randint(*own)))
    order = list(range(len(lists)))
    rng.shuffle(order)  # batch order is not grouped
    return [lists[i] for i in order]


@pytest.mark.parametrize("seed", range(8))
def test_plan_tiles_against_brute_force(seed):
    rng = random.Random(seed)
    groups = [(rng.choice([0, 20, 127, 128, 200, 400]), rng.randint(1, 40)) for _ in range(rng.randint(1, 6))]
    lists = _shared_slot_lists(rng, groups, header=rng.choice([0, 1, 16, 100]))
    rows = list(range(100, 100 + len(lists)))
    plan = sp.plan_tiles(lists, rows)
    # brute force: i's group is every request sharing >= MIN_SHARED positions with it
    # (pairwise, by comparing the lists); its prefix the least such common length
    want = {}
    for i, a in enumerate(lists):
        common = [_brute_common(a, b) for b in lists]
        members = [j for j, n in enumerate(common) if n >= sp.MIN_SHARED]
        want[i] = min(_brute_common(lists[members[0]], lists[j]) for j in members) if len(members) > 1 else 0
    if plan is None:
        assert not any(want.values())
        return
    kv_start, tiles = plan
    assert kv_start == [want[i] for i in range(len(lists))]
    seen = []
    for row, n, members in tiles:
        assert 2 <= len(members) <= sp.TILE
        for m in members:
            assert kv_start[m] == n and lists[m][:n] == lists[rows.index(row)][:n]
        seen += members
    assert sorted(seen) == [i for i in range(len(lists)) if want[i]]  # each request in one tile
    assert len(tiles) <= len(lists) // 2  # what the graph runner's static buffers hold


def test_large_groups_split_evenly():
    lists = [[7] + list(range(1000, 1200)) + [5000 + i] for i in range(33)]
    kv_start, tiles = sp.plan_tiles(lists, list(range(33)))
    assert [len(m) for _, _, m in tiles] == [11, 11, 11]
    assert set(kv_start) == {201}
    _, tiles = sp.plan_tiles(lists[:17], list(range(17)))
    assert [len(m) for _, _, m in tiles] == [9, 8]


def test_a_common_header_does_not_merge_groups():
    """Two system prompts behind the same 16-token header, and one request sharing only the
    header: each prompt's requests form their own tiles with their full prefix."""
    head = list(range(1, 17))
    a, b = head + list(range(100, 1100)), head + list(range(2000, 2500))
    lists = [a + [5000 + i] for i in range(20)] + [b + [6000 + i] for i in range(3)] + [head + [7000, 7001]]
    kv_start, tiles = sp.plan_tiles(lists, list(range(len(lists))))
    assert kv_start == [len(a)] * 20 + [len(b)] * 3 + [0]
    assert sorted((n, len(m)) for _, n, m in tiles) == [(len(b), 3), (len(a), 10), (len(a), 10)]


def test_short_or_lone_prefixes_are_not_tiled():
    a = list(range(1, 101))
    lists = [a + [500], a + [501], list(range(600, 900))]  # common 100 < MIN_SHARED; a loner
    assert sp.plan_tiles(lists, [0, 1, 2]) is None
    assert sp.build(lists, [0, 1, 2]) is None


def test_pack_roundtrip():
    lists = [[3] + list(range(10, 300)) + [900 + i] for i in range(5)] + [[4, 5, 6]]
    packed = sp.build(lists, [9, 8, 7, 6, 5, 4])
    meta = sp.unpack(packed, 6)
    assert meta.kv_start.tolist() == [291] * 5 + [0]
    assert meta.tile_rows.tolist() == [9] and meta.tile_lens.tolist() == [291]
    assert meta.tile_members.tolist() == [[0, 1, 2, 3, 4] + [-1] * (sp.TILE - 5)]


@pytest.mark.parametrize("members", [[5, 4], [5, 4, 1], [3, 3, 3, 2]])
def test_packed_parts_start_aligned(members):
    """Every part of the packed plan starts 16-byte aligned (Triton compiles one kernel
    variant per pointer alignment), whatever the batch size and tile count, and unpacks
    to the same plan as plan_tiles."""
    lists, rows, base = [], [], 10
    for g, n in enumerate(members):  # groups of n requests sharing a 200-token prefix (>= MIN_SHARED)
        prefix = list(range(base, base + 200))
        base += 1000
        for i in range(n):
            lists.append(prefix + [base + i])
            rows.append(len(rows))
    plan = sp.plan_tiles(lists, rows)
    packed = sp.build(lists, rows)
    for host in (packed, torch.cat([packed, packed])[:packed.numel()].clone()):
        meta = sp.unpack(host, len(lists))
        parts = (meta.kv_start, meta.tile_rows, meta.tile_lens, meta.tile_members)
        assert all(t.data_ptr() % 16 == 0 for t in parts), [t.data_ptr() % 16 for t in parts]
        assert meta.kv_start.tolist() == plan[0]
        assert meta.tile_rows.tolist() == [t[0] for t in plan[1]]
        assert meta.tile_lens.tolist() == [t[1] for t in plan[1]]
        assert meta.tile_members.tolist() == [m + [-1] * (sp.TILE - len(m)) for _, _, m in plan[1]]


def paged_shared_batch(g, groups, H, Hk, D, dtype=torch.float32, pad_tiles=0):
    """A KV pool, req_to_token rows and the cascade metadata for requests sharing
    prefixes (as the scheduler builds them), plus queries.  pad_tiles: empty tiles
    appended, as in a captured graph."""
    rng = random.Random(int(torch.randint(0, 1 << 30, (1,), generator=g)))
    lists = _shared_slot_lists(rng, groups)
    slots_total = max(max(s) for s in lists) + 1
    k = torch.randn(slots_total, Hk, D, generator=g).to(dtype)
    v = torch.randn(slots_total, Hk, D, generator=g).to(dtype)
    B = len(lists)
    r2t = torch.zeros(B + 3, max(map(len, lists)) + 4, dtype=torch.int32)
    rows = (torch.randperm(B + 3, generator=g)[:B]).tolist()
    for r, s in zip(rows, lists):
        r2t[r, :len(s)] = torch.tensor(s, dtype=torch.int32)
    meta = sp.unpack(sp.build(lists, rows), B)
    if pad_tiles:
        meta = sp.SharedPrefix(meta.kv_start, torch.cat([meta.tile_rows, torch.zeros(pad_tiles, dtype=torch.int64)]),
                               torch.cat([meta.tile_lens, torch.zeros(pad_tiles, dtype=torch.int64)]),
                               torch.cat([meta.tile_members, torch.full((pad_tiles, sp.TILE), -1)]))
    q = torch.randn(B, H, D, generator=g).to(dtype)
    seq_lens = torch.tensor([len(s) for s in lists])
    return q, k, v, r2t, torch.tensor(rows), seq_lens, meta


@pytest.mark.parametrize("H,Hk", [(4, 2), (8, 8), (8, 1)])
def test_native_cascade_equals_plain_decode(H, Hk):
    g = torch.Generator().manual_seed(H * 10 + Hk)
    q, k, v, r2t, rows, seq_lens, m = paged_shared_batch(g, [(300, 3), (150, 20), (0, 2), (200, 1)], H, Hk, 16,
                                                         pad_tiles=2)
    assert (m.kv_start > 0).sum() == 23
    ref = native.attention_decode(q, k, v, r2t, rows, seq_lens, 0.25)
    out = native.attention_decode_shared(q, k, v, r2t, rows, seq_lens, 0.25, m.kv_start, m.tile_rows,
                                         m.tile_lens, m.tile_members)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the tiles matter: a tile pointing at the wrong row's prefix changes the result
    bad = m.tile_rows.clone()
    bad[0] = rows[(m.kv_start == 0).nonzero()[0, 0]]
    out = native.attention_decode_shared(q, k, v, r2t, rows, seq_lens, 0.25, m.kv_start, bad,
                                         m.tile_lens, m.tile_members)
    assert (out - ref).abs().max() > 1e-2


@pytest.mark.parametrize("page_size", [1, 4])
def test_engine_with_cascade_matches_transformers(tiny_models, page_size):
    from portaserve import Engine

    path = tiny_models("llama3")
    hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    # every prompt starts with the same few tokens (a BOS and a template header): shared
    # by all, but too short to tile; the two system prompts are tiled separately
    header = [1, 7, 7, 9, 11]
    system = [header + s for s in random_prompts(2, 512, 160, 200, seed=40 + page_size)]
    questions = random_prompts(10, 512, 3, 20, seed=50 + page_size)
    prompts = [system[i % 2] + q for i, q in enumerate(questions)] + [header + random_prompts(1, 512, 30, 30, seed=7)[0]]
    sampling = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=8000, page_size=page_size,
                cascade_attention="on") as eng:
        assert eng.get_server_info()["cascade_attention"] is True
        eng.generate(input_ids=[s + [5] for s in system], sampling_params={"max_new_tokens": 1})  # cache them
        outs = eng.generate(input_ids=prompts, sampling_params=sampling, return_logprob=True, top_logprobs_num=5)
        counters = eng.get_server_info()["counters"]
        stats = eng.rt.scheduler.kv_stats()
        assert stats["free"] + stats["evictable"] == stats["max_total_tokens"]  # no slot leaked
    assert counters["decode_shared"] >= 10, counters
    _check_against_hf(outs, hf, prompts, 12)


def test_cascade_auto_is_off_without_a_kernel(default_engine):
    """On the CPU platform attention_decode_shared has only its native (reference) form,
    so auto leaves cascade attention off."""
    info = default_engine.get_server_info()
    assert info["cascade_attention"] is False and info["counters"]["decode_shared"] == 0


def test_bench_one_batch_shared_prefix(tiny_models):
    """bench one-batch --shared-prefix-len: prompts share their first tokens, and decode
    steps then run cascade attention (where it is on)."""
    from portaserve.bench import one_batch
    from portaserve.runtime import build_runtime
    from portaserve.server_args import ServerArgs

    rt = build_runtime(ServerArgs(model_path=str(tiny_models("llama3")), skip_tokenizer_init=True,
                                  max_total_tokens=4000, cascade_attention="on"))
    try:
        r = one_batch.run(rt, 4, 200, 6, shared_len=160)
        shared_steps = rt.scheduler.counters.decode_shared
        one_batch.run(rt, 4, 200, 6)
        assert r["shared_len"] == 160 and shared_steps >= 4
        assert rt.scheduler.counters.decode_shared == shared_steps  # nothing shared: plain steps
    finally:
        one_batch._driver(rt).shutdown()
