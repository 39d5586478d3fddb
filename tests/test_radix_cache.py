"""Property tests of the radix prefix cache together with the slot allocator.

A simulated scheduler drives ``RadixCache``, ``SlotAllocator`` and ``ReqToTokenPool``
through the same protocol as ``portaserve.core.scheduler.Scheduler`` (``_match``,
admission in ``_schedule_prefill``, ``_alloc``, ``_cache_unfinished``, ``_release``,
flush), with random arrivals, chunked prefills, decode steps, finishes/aborts/retractions,
evictions, prefix lookups and resets.

The reference model is a brute-force dict ``{tuple(tokens[:i+1]): slot}`` of every cached
token position, plus a fake "KV content" table recording which token prefix each slot's
KV was computed for.  After every step the tree is flattened and compared with the
reference, and the memory invariants are checked.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from portaserve.core import radix_cache as radix_mod
from portaserve.core.memory import OutOfSlots, ReqToTokenPool, SlotAllocator
from portaserve.core.radix_cache import RadixCache

PAGE_SIZES = [1, 4]
VOCAB = 3
CTX = 64


class SimReq:
    """The fields of portaserve.core.request.Req the KV protocol touches."""

    def __init__(self, input_ids):
        self.input_ids = list(input_ids)
        self.output_ids: list[int] = []
        self.req_pool_idx = None
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.last_node = None
        self.last_slot = None
        self.kv_len = 0

    @property
    def fill_ids(self):
        return self.input_ids + self.output_ids

    def locked_key(self):
        """The token sequence this request holds locked in the tree."""
        return tuple(self.fill_ids[: len(self.prefix_indices)])


class Sim:
    def __init__(self, ps: int, pages: int, max_reqs: int = 5):
        self.ps = ps
        self.allocator = SlotAllocator(pages * ps, ps)
        self.req_pool = ReqToTokenPool(max_reqs, CTX, "cpu")
        self.tree = RadixCache(self.allocator, ps)
        self.live: list[SimReq] = []
        self.ref: dict[tuple, int] = {}  # cached token prefix -> slot of its last token
        self.kv: dict[int, tuple] = {}  # slot -> token prefix whose KV was written there

    # ---- reference ------------------------------------------------------------------
    # Cache units are pages: ref maps every cached page-aligned token prefix
    # tokens[:e] (e a multiple of the page size) to the slots of its last page.
    def ref_match(self, tokens) -> tuple[int, list[int]]:
        tokens, ps = tuple(tokens), self.ps
        e, slots = 0, []
        while e + ps <= len(tokens) and tokens[: e + ps] in self.ref:
            e += ps
            slots.extend(self.ref[tokens[:e]])
        return e, slots

    def ref_insert(self, key, slots) -> int:
        key, ps = tuple(key), self.ps
        cut = len(key) - len(key) % ps
        already, _ = self.ref_match(key[:cut])
        for e in range(already + ps, cut + 1, ps):
            self.ref[key[:e]] = tuple(int(x) for x in slots[e - ps: e])
        return already

    def flatten_tree(self) -> dict[tuple, tuple]:
        """Walk the tree, checking its structure; return {page-aligned prefix: page slots}."""
        ps = self.ps
        out: dict[tuple, tuple] = {}
        stack = [(self.tree.root, ())]
        assert self.tree.root.lock_ref >= 1
        while stack:
            node, path = stack.pop()
            for ck, child in node.children.items():
                assert child.parent is node
                assert len(child.key) > 0, "empty non-root node"
                assert len(child.key) == len(child.value), "key/value length mismatch"
                assert len(child.key) % ps == 0, "node does not own whole pages"
                assert ck == (child.key[0] if ps == 1 else tuple(child.key[:ps]))
                vals = child.value.tolist()
                p = path
                for j in range(0, len(vals), ps):  # one page per ps values
                    assert vals[j] % ps == 0
                    assert vals[j: j + ps] == list(range(vals[j], vals[j] + ps))
                    p = p + tuple(child.key[j: j + ps])
                    assert p not in out
                    out[p] = tuple(vals[j: j + ps])
                stack.append((child, p))
        return out

    @staticmethod
    def slots_of(flat: dict) -> list[int]:
        return [s for page in flat.values() for s in page]

    def node_path(self, node) -> tuple:
        keys = []
        while node is not self.tree.root:
            keys.append(tuple(node.key))
            node = node.parent
        return tuple(t for k in reversed(keys) for t in k)

    # ---- the scheduler's protocol (mirrors portaserve/core/scheduler.py) -------------
    def _match(self, req: SimReq) -> None:
        fill = req.fill_ids
        limit = len(fill) - 1
        if limit <= 0:
            req.prefix_indices = torch.empty(0, dtype=torch.int64)
            req.last_node = None
            return
        expect_len, expect_slots = self.ref_match(fill[:limit])
        req.prefix_indices, req.last_node = self.tree.match_prefix(fill[:limit])
        assert req.prefix_indices.tolist() == expect_slots
        assert len(self.node_path(req.last_node)) == expect_len

    def _alloc(self, req: SimReq, start: int, n: int) -> list[int]:
        row = self.req_pool.req_to_token[req.req_pool_idx]
        if start % self.ps:
            # the scheduler continues a partly filled page from req.last_slot, its own
            # last allocation: that must be the slot of position start - 1
            assert req.last_slot == int(row[start - 1])
        short = self.allocator.pages_needed(n, start) * self.ps - self.allocator.available_size()
        if short > 0:
            self.evict(short)
        slots = self.allocator.alloc_tokens(n, req.last_slot, start)
        req.last_slot = slots[-1]
        row[start:start + n] = torch.tensor(slots, dtype=torch.int32)
        return slots

    def _compute(self, req: SimReq, start: int, n: int) -> None:
        """The forward pass: write each position's KV into its slot."""
        row = self.req_pool.req_to_token[req.req_pool_idx]
        fill = req.fill_ids
        for p in range(start, start + n):
            self.kv[int(row[p])] = tuple(fill[: p + 1])

    def _release(self, req: SimReq) -> None:
        if req.req_pool_idx is None:
            return
        row = self.req_pool.req_to_token[req.req_pool_idx]
        kv_len = req.kv_len
        slots = row[:kv_len].to(torch.int64).cpu()
        own_from = len(req.prefix_indices)
        aligned = kv_len - kv_len % self.ps
        expect_already = self.ref_insert(req.fill_ids[:aligned], slots[:aligned].tolist())
        already = self.tree.insert(req.fill_ids[:aligned], slots[:aligned])
        assert already == expect_already
        if already > own_from:
            self.allocator.free(slots[own_from:already])
        if kv_len > aligned:
            self.allocator.free(slots[aligned:kv_len])
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.last_node = None
        req.last_slot = None
        req.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx = None
        req.kv_len = 0

    def _cache_unfinished(self, req: SimReq) -> None:
        kv_len = req.kv_len
        aligned = kv_len - kv_len % self.ps
        row = self.req_pool.req_to_token[req.req_pool_idx]
        slots = row[:aligned].to(torch.int64).cpu()
        own_from = len(req.prefix_indices)
        expect_already = self.ref_insert(req.fill_ids[:aligned], slots.tolist())
        already = self.tree.insert(req.fill_ids[:aligned], slots)
        assert already == expect_already
        if already > own_from:
            self.allocator.free(slots[own_from:already])
        new_prefix, new_node = self.tree.match_prefix(req.fill_ids[:aligned])
        assert len(new_prefix) == aligned
        assert new_prefix.tolist() == self.ref_match(req.fill_ids[:aligned])[1]
        row[:aligned] = new_prefix.to(row.dtype)
        self.tree.inc_lock_ref(new_node)
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.last_node = new_node
        req.prefix_indices = new_prefix

    # ---- simulated scheduler events -----------------------------------------------------
    def arrive(self, tokens, chunk: int) -> None:
        if self.req_pool.available() == 0:
            return
        req = SimReq(tokens)
        self._match(req)
        if req.last_node is not None:
            self.tree.inc_lock_ref(req.last_node)
        prefix = len(req.prefix_indices)
        extend = len(req.fill_ids) - prefix
        n = min(extend, chunk)
        if n < extend:
            n -= n % self.ps
            if n <= 0:
                if req.last_node is not None:
                    self.tree.dec_lock_ref(req.last_node)
                return
        req.req_pool_idx = self.req_pool.alloc()
        row = self.req_pool.req_to_token[req.req_pool_idx]
        row[:prefix] = req.prefix_indices.to(torch.int32)
        req.kv_len = prefix
        try:
            self._alloc(req, prefix, n)
        except OutOfSlots:
            self._release(req)  # the scheduler puts it back in the queue
            return
        self.live.append(req)
        self._extended(req, n)

    def _extended(self, req: SimReq, n: int) -> None:
        self._compute(req, req.kv_len, n)
        req.kv_len += n
        if req.kv_len < len(req.fill_ids):
            self._cache_unfinished(req)  # a chunk of a longer prefill
        else:
            req.output_ids.append(len(req.fill_ids) % VOCAB)  # sampled first token

    def step(self, req: SimReq, chunk: int, tok: int) -> None:
        if req.kv_len < len(req.input_ids):  # next chunk of a chunked prefill
            extend = len(req.fill_ids) - req.kv_len
            n = min(extend, chunk)
            if n < extend:
                n -= n % self.ps
            if n <= 0:
                return
            try:
                self._alloc(req, req.kv_len, n)
            except OutOfSlots:
                return  # waits for room; nothing was taken
            self._extended(req, n)
            return
        if len(req.fill_ids) >= CTX - 1:
            return
        try:  # one decode step
            self._alloc(req, req.kv_len, 1)
        except OutOfSlots:
            self.finish(req)  # retracted: KV handed to the tree, request requeued
            return
        self._compute(req, req.kv_len, 1)
        req.kv_len += 1
        req.output_ids.append(tok)

    def finish(self, req: SimReq) -> None:
        self.live.remove(req)
        self._release(req)

    def evict(self, num: int) -> int:
        before = self.flatten_tree()
        assert before == self.ref
        evictable = self.tree.evictable_size()
        free_before = self.allocator.free_slot_set()
        held = {int(s) for r in self.live
                for s in self.req_pool.req_to_token[r.req_pool_idx, : r.kv_len].tolist()}
        freed = self.tree.evict(num)
        assert not (self.allocator.free_slot_set() - free_before) & held, \
            "eviction freed a slot a live request holds"
        after = self.flatten_tree()
        removed = {k: v for k, v in before.items() if k not in after}
        assert all(before[k] == v for k, v in after.items()), "eviction changed a slot"
        assert freed == len(removed) * self.ps
        assert freed <= evictable
        assert freed >= min(num, evictable), "evicted less than asked although it could"
        assert self.tree.evictable_size() == evictable - freed
        # nothing a live request holds locked was evicted
        for r in self.live:
            lk = r.locked_key()
            for e in range(self.ps, len(lk) + 1, self.ps):
                assert lk[:e] in after, "evicted a locked node"
        # exactly the removed slots went back to the allocator
        assert self.allocator.free_slot_set() - free_before == set(self.slots_of(removed))
        self.ref = after
        return freed

    def reset(self) -> None:  # Scheduler.flush_cache: only with no request in flight
        while self.live:
            self.finish(self.live[0])
        self.tree.reset()
        self.allocator.clear()
        self.ref = {}

    def query(self, tokens) -> None:
        n, slots = self.ref_match(tokens)
        got, node = self.tree.match_prefix(list(tokens))
        assert got.tolist() == slots
        assert self.node_path(node) == tuple(tokens[:n])

    # ---- invariants ---------------------------------------------------------------------
    def check(self) -> None:
        ps = self.ps
        tree = self.tree
        flat = self.flatten_tree()
        assert flat == self.ref, "tree contents differ from the reference"
        # every cached slot holds the KV of exactly the prefix it is cached under
        for key, page in flat.items():
            for i, slot in enumerate(page):
                assert self.kv.get(slot) == key[: len(key) - ps + i + 1], \
                    "a cached slot was overwritten"
        tree_slots = self.slots_of(flat)
        assert len(tree_slots) == len(set(tree_slots)), "two tree nodes share a slot"
        assert tree.total_size() == len(tree_slots)
        assert tree.evictable_size() + tree.protected_size() == tree.total_size()

        # lock counts: a node is locked once per live request whose locked prefix runs
        # through it; protected == tokens in locked nodes
        locked_keys = [r.locked_key() for r in self.live if r.last_node is not None]
        protected = 0
        for node in tree.nodes():
            path = self.node_path(node)
            expect = sum(1 for k in locked_keys if k[: len(path)] == path)
            assert node.lock_ref == expect, "wrong lock_ref"
            if expect:
                protected += len(node.value)
        assert tree.protected_size() == protected
        assert tree.root.lock_ref == 1

        free_slots = self.allocator.free_slot_set()
        free_pages = {s // ps for s in free_slots}
        tree_pages = {s // ps for s in tree_slots}
        assert not (set(tree_slots) & free_slots), "slot both free and cached in the tree"
        own_pages_all: set[int] = set()
        rows = set()
        for r in self.live:
            assert r.req_pool_idx is not None and r.req_pool_idx not in rows
            rows.add(r.req_pool_idx)
            row = self.req_pool.req_to_token[r.req_pool_idx, : r.kv_len].tolist()
            fill = r.fill_ids
            assert r.kv_len < len(fill)
            pre = len(r.prefix_indices)
            assert pre % ps == 0 and pre <= r.kv_len
            # the locked prefix is the tree's own slots
            assert row[:pre] == r.prefix_indices.tolist() == self.ref_match(fill[:pre])[1]
            for p, s in enumerate(row):
                assert s not in free_slots, "slot both free and held by a live request"
                assert self.kv.get(s) == tuple(fill[: p + 1]), "a live request's KV was overwritten"
            own_pages = {s // ps for s in row[pre:]}
            assert own_pages.isdisjoint(tree_pages), "request owns a page the tree owns"
            assert own_pages.isdisjoint(own_pages_all), "two requests own one page"
            own_pages_all |= own_pages
        assert self.req_pool.available() == self.req_pool.size - len(self.live)
        # conservation: every page is free, cached, or owned by one live request
        assert free_pages.isdisjoint(tree_pages) and free_pages.isdisjoint(own_pages_all)
        assert free_pages | tree_pages | own_pages_all == set(range(1, self.allocator.num_pages + 1))

    def drain_and_check_empty(self) -> None:
        while self.live:
            self.finish(self.live[0])
        self.check()
        self.evict(math.inf)
        self.check()
        assert self.allocator.available_size() == self.allocator.size
        assert self.tree.total_size() == 0
        assert self.tree.evictable_size() == 0 and self.tree.protected_size() == 0
        assert self.req_pool.available() == self.req_pool.size


tokens_st = st.lists(st.integers(0, VOCAB - 1), max_size=6)
event_st = st.one_of(
    # arrival: base prompt index, how much of it, a random tail, prefill chunk size
    st.tuples(st.just("arrive"), st.integers(0, 2), st.integers(0, 14), tokens_st, st.integers(1, 20)),
    st.tuples(st.just("arrive"), st.integers(0, 2), st.integers(0, 14), tokens_st, st.integers(1, 6)),
    st.tuples(st.just("step"), st.integers(0, 9), st.integers(1, 12), st.integers(0, VOCAB - 1)),
    st.tuples(st.just("step"), st.integers(0, 9), st.integers(1, 12), st.integers(0, VOCAB - 1)),
    st.tuples(st.just("finish"), st.integers(0, 9)),
    st.tuples(st.just("evict"), st.integers(0, 24)),
    st.tuples(st.just("query"), st.integers(0, 2), st.integers(0, 16), tokens_st),
    st.tuples(st.just("reset"), st.integers(0, 3)),  # fires one time in four
)


@pytest.mark.parametrize("ps", PAGE_SIZES)
@settings(max_examples=500, deadline=None)
@given(
    pages=st.integers(2, 10),
    bases=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14), min_size=3, max_size=3),
    events=st.lists(event_st, min_size=10, max_size=50),
)
def test_radix_cache_protocol(ps, pages, bases, events):
    sim = Sim(ps, pages * 4 // ps)  # the same number of tokens for every page size
    sim.check()
    for ev in events:
        kind = ev[0]
        if kind == "arrive":
            _, b, cut, tail, chunk = ev
            tokens = bases[b][:cut] + tail
            if len(tokens) >= 1:
                sim.arrive(tokens, chunk)
        elif kind == "step" and sim.live:
            sim.step(sim.live[ev[1] % len(sim.live)], ev[2], ev[3])
        elif kind == "finish" and sim.live:
            sim.finish(sim.live[ev[1] % len(sim.live)])
        elif kind == "evict":
            sim.evict(ev[1])
        elif kind == "query":
            _, b, cut, tail = ev
            sim.query(bases[b][:cut] + tail)
        elif kind == "reset" and ev[1] == 0:
            sim.reset()
        sim.check()
    sim.drain_and_check_empty()


@pytest.mark.parametrize("ps", PAGE_SIZES)
@settings(max_examples=120, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=20), max_size=10),
    queries=st.lists(st.lists(st.integers(0, 1), max_size=22), max_size=10),
)
def test_match_prefix_is_longest_cached_prefix(ps, seqs, queries):
    """Pure insert/match against the brute-force dict (no requests, no eviction)."""
    sim = Sim(ps, 256 // ps)
    for s in seqs:
        cut = len(s) - len(s) % ps
        slots = sim.allocator.alloc_tokens(cut)
        expect = sim.ref_insert(s, slots)
        for p, slot in enumerate(slots):
            sim.kv[slot] = tuple(s[: p + 1])
        already = sim.tree.insert(list(s), torch.tensor(slots + [0] * (len(s) - cut)))
        assert already == expect
        sim.allocator.free(slots[:already])  # duplicates the caller owned
        sim.check()
        for q in queries:
            sim.query(q)
        sim.check()
    sim.drain_and_check_empty()


# ---- targeted cases ------------------------------------------------------------------------
def _tree(ps=1, size=64):
    a = SlotAllocator(size, ps)
    return a, RadixCache(a, ps)


def test_split_keeps_locks_and_accounting():
    a, t = _tree()
    slots = torch.tensor(a.alloc_tokens(6))
    assert t.insert([1, 2, 3, 4, 5, 6], slots) == 0
    s, node = t.match_prefix([1, 2, 3, 4, 5, 6])
    t.inc_lock_ref(node)
    assert t.protected_size() == 6 and t.evictable_size() == 0
    s2, upper = t.match_prefix([1, 2, 9])  # splits the locked node at 2
    assert s2.tolist() == slots[:2].tolist()
    assert upper.lock_ref == 1 and node.lock_ref == 1 and node.parent is upper
    assert t.protected_size() == 6 and t.evictable_size() == 0
    assert t.evict(100) == 0  # everything is locked
    t.dec_lock_ref(node)
    assert upper.lock_ref == 0 and node.lock_ref == 0
    assert t.evictable_size() == 6 and t.protected_size() == 0
    with pytest.raises(AssertionError):
        t.dec_lock_ref(node)
    assert t.evict(1) == 4  # the leaf [3..6] goes first, whole
    assert t.evict(1) == 2
    assert a.available_size() == a.size


def test_insert_returns_already_cached_length():
    for ps in PAGE_SIZES:
        a, t = _tree(ps)
        first = a.alloc_tokens(2 * ps)
        assert t.insert(list(range(2 * ps)), torch.tensor(first)) == 0
        dup = a.alloc_tokens(3 * ps)
        key = list(range(2 * ps)) + [99] * ps
        assert t.insert(key, torch.tensor(dup)) == 2 * ps  # caller frees dup[:2*ps]
        a.free(dup[: 2 * ps])
        s, _ = t.match_prefix(key + [5])  # an unaligned tail is ignored when paged
        assert s.tolist() == first + dup[2 * ps:]
        assert t.evict(math.inf) == 3 * ps
        assert a.available_size() == a.size


def test_page_size_matching_is_page_aligned():
    a, t = _tree(4)
    slots = a.alloc_tokens(8)
    t.insert([1, 2, 3, 4, 5, 6, 7, 8], torch.tensor(slots))
    s, node = t.match_prefix([1, 2, 3, 4, 5, 6, 0, 0])  # diverges inside page 2
    assert s.tolist() == slots[:4]
    s, _ = t.match_prefix([1, 2, 3])  # shorter than a page
    assert s.tolist() == []
    s, _ = t.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    assert s.tolist() == slots


def test_eviction_is_lru(monkeypatch):
    clock = iter(range(1, 10_000))
    monkeypatch.setattr(radix_mod, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    a, t = _tree()
    for key in ([1, 1], [2, 2], [3, 3]):
        t.insert(key, torch.tensor(a.alloc_tokens(2)))
    t.match_prefix([1, 1])  # touch [1,1]: now [2,2] is the oldest
    assert t.evict(1) == 2
    assert t.match_prefix([2, 2])[0].numel() == 0
    assert t.match_prefix([1, 1])[0].numel() == 2
    assert t.match_prefix([3, 3])[0].numel() == 2
    # the lookups above touched [1,1] before [3,3]: [1,1] is now the oldest
    assert t.evict(1) == 2
    assert t.match_prefix([1, 1])[0].numel() == 0
    assert t.match_prefix([3, 3])[0].numel() == 2


def test_evict_frees_parent_after_children():
    a, t = _tree()
    t.insert([1, 2, 3], torch.tensor(a.alloc_tokens(3)))
    s = a.alloc_tokens(4)
    assert t.insert([1, 2, 4, 5], torch.tensor(s)) == 2
    a.free(s[:2])
    _, node = t.match_prefix([1, 2, 4, 5])
    t.inc_lock_ref(node)
    assert t.evict(math.inf) == 1  # only the unlocked leaf [3]
    _, n12 = t.match_prefix([1, 2])
    assert n12.lock_ref == 1
    t.dec_lock_ref(node)
    assert t.evict(math.inf) == 4
    assert t.total_size() == 0 and a.available_size() == a.size
