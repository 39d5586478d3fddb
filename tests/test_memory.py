"""Property tests of the KV slot allocator and the request -> token table.

The reference model is plain Python: a set of free page numbers and, per simulated
request, the list of slots of its positions.  Every operation is checked against it.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from portaserve.core.memory import KVPool, OutOfSlots, ReqToTokenPool, SlotAllocator

PAGE_SIZES = [1, 4]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class AllocModel:
    """Reference: free pages and per-request slot lists, next to the real allocator."""

    def __init__(self, size: int, ps: int):
        self.ps = ps
        self.alloc = SlotAllocator(size, ps)
        self.num_pages = size // ps
        self.free_pages = set(range(1, self.num_pages + 1))
        self.reqs: list[list[int]] = []

    # what a request of current length seq_len needs for n more tokens
    def ref_pages_needed(self, n: int, seq_len: int) -> int:
        room = (self.ps - seq_len % self.ps) % self.ps if seq_len else 0
        return ceil_div(max(0, n - room), self.ps)

    def grow(self, i: int | None, n: int) -> None:
        slots = self.reqs[i] if i is not None else []
        seq_len = len(slots)
        last = slots[-1] if slots else None
        need = self.ref_pages_needed(n, seq_len)
        assert self.alloc.pages_needed(n, seq_len) == need
        before_free = self.alloc.free_slot_set()
        before_avail = self.alloc.available_size()
        if need > len(self.free_pages):
            with pytest.raises(OutOfSlots):
                self.alloc.alloc_tokens(n, last, seq_len)
            # taking nothing when short
            assert self.alloc.free_slot_set() == before_free
            assert self.alloc.available_size() == before_avail
            return
        got = self.alloc.alloc_tokens(n, last, seq_len)
        assert len(got) == n
        assert len(set(got)) == n
        # the partly filled last page is continued before any new page is taken
        room = min(n, (self.ps - seq_len % self.ps) % self.ps if seq_len else 0)
        if room:
            assert got[:room] == list(range(last + 1, last + 1 + room))
        new_pages = {s // self.ps for s in got[room:]}
        assert len(new_pages) == need
        assert new_pages <= self.free_pages, "handed out a page that was not free"
        self.free_pages -= new_pages
        assert self.alloc.available_size() == before_avail - need * self.ps
        if i is None:
            self.reqs.append(list(got))
        else:
            slots.extend(got)

    def free_req(self, i: int) -> None:
        slots = self.reqs.pop(i)
        self.alloc.free(torch.tensor(slots, dtype=torch.int64) if len(slots) % 2 else slots)
        self.free_pages |= {s // self.ps for s in slots}

    def truncate_req(self, i: int, keep_pages: int) -> None:
        """Free the tail of a request from a page boundary (what a partial release does)."""
        slots = self.reqs[i]
        cut = min(keep_pages * self.ps, len(slots))
        tail = slots[cut:]
        self.alloc.free(tail)
        self.free_pages |= {s // self.ps for s in tail}
        del slots[cut:]

    def check(self) -> None:
        ps = self.ps
        a = self.alloc
        assert a.size == self.num_pages * ps
        assert a.total_slots == (self.num_pages + 1) * ps
        assert a.available_size() == len(self.free_pages) * ps
        free_slots = a.free_slot_set()
        assert free_slots == {p * ps + j for p in self.free_pages for j in range(ps)}
        owned = [s for r in self.reqs for s in r]
        assert len(owned) == len(set(owned)), "a slot is owned by two requests"
        for r in self.reqs:
            for pos, s in enumerate(r):
                assert ps <= s < a.total_slots, "slot outside the pool or in padding page 0"
                assert s not in free_slots, "slot both owned and free"
                # positions map to slots page by page, offset within the page preserved
                assert s % ps == pos % ps
                assert s // ps == r[pos - pos % ps] // ps
        owned_pages = {s // ps for s in owned}
        assert owned_pages.isdisjoint(self.free_pages)
        # nothing leaks: every page is free or owned by exactly one request
        assert owned_pages | self.free_pages == set(range(1, self.num_pages + 1))


op_st = st.one_of(
    st.tuples(st.just("new"), st.integers(0, 13)),
    st.tuples(st.just("grow"), st.integers(0, 7), st.integers(0, 9)),
    st.tuples(st.just("free"), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 7), st.integers(0, 3)),
    st.tuples(st.just("double_free"), st.integers(0, 1000)),
    st.tuples(st.just("clear")),
)


@pytest.mark.parametrize("ps", PAGE_SIZES)
@settings(max_examples=300, deadline=None)
@given(pages=st.integers(0, 10), extra=st.integers(0, 3), ops=st.lists(op_st, max_size=40))
def test_allocator_matches_reference(ps, pages, extra, ops):
    # size need not be a multiple of the page size: it is rounded down
    m = AllocModel(pages * ps + (extra % ps), ps)
    m.check()
    for op in ops:
        kind = op[0]
        if kind == "new":
            m.grow(None, op[1])
        elif kind == "grow" and m.reqs:
            m.grow(op[1] % len(m.reqs), op[2])
        elif kind == "free" and m.reqs:
            m.free_req(op[1] % len(m.reqs))
        elif kind == "truncate" and m.reqs:
            m.truncate_req(op[1] % len(m.reqs), op[2])
        elif kind == "double_free" and m.free_pages:
            page = sorted(m.free_pages)[op[1] % len(m.free_pages)]
            before = m.alloc.free_slot_set()
            with pytest.raises(ValueError, match="double free"):
                m.alloc.free([page * ps + op[1] % ps])
            assert m.alloc.free_slot_set() == before
        elif kind == "clear":
            m.alloc.clear()
            m.free_pages = set(range(1, m.num_pages + 1))
            m.reqs = []
        m.check()
    while m.reqs:
        m.free_req(0)
    m.check()
    assert m.alloc.available_size() == m.alloc.size


# ---- targeted allocator cases --------------------------------------------------------
def test_partial_last_page_is_continued():
    a = SlotAllocator(16, page_size=4)
    first = a.alloc_tokens(6)  # page 1 whole, page 2 half
    assert first == [4, 5, 6, 7, 8, 9]
    assert a.available_size() == 8
    more = a.alloc_tokens(3, last_slot=first[-1], seq_len=6)
    assert more == [10, 11, 12]  # rest of page 2, then a fresh page 3
    assert a.available_size() == 4
    # fits inside the current page: no page taken
    again = a.alloc_tokens(2, last_slot=more[-1], seq_len=9)
    assert again == [13, 14]
    assert a.available_size() == 4


def test_out_of_slots_takes_nothing():
    a = SlotAllocator(8, page_size=4)  # two pages
    s = a.alloc_tokens(6)
    assert a.available_size() == 0
    assert a.pages_needed(2, 6) == 0
    assert a.alloc_tokens(2, s[-1], 6) == [10, 11]
    with pytest.raises(OutOfSlots):
        a.alloc_tokens(3, s[-1], 6)  # two fit in page 2, the third needs a page
    assert a.available_size() == 0
    a.free(s[:4])
    with pytest.raises(OutOfSlots):
        a.alloc_tokens(5)
    assert a.free_slot_set() == {4, 5, 6, 7}
    assert a.alloc_tokens(4) == [4, 5, 6, 7]


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_double_free_and_bad_free_raise(ps):
    a = SlotAllocator(4 * ps, page_size=ps)
    s = a.alloc_tokens(2 * ps)
    a.free(s)
    with pytest.raises(ValueError, match="double free"):
        a.free(s)
    with pytest.raises(ValueError, match="double free"):
        a.free([a.total_slots - 1])  # never allocated
    with pytest.raises(ValueError):
        a.free([0])  # the padding page
    with pytest.raises(ValueError):
        a.free([a.total_slots])  # past the pool
    assert a.available_size() == a.size
    a.free([])  # freeing nothing is fine
    # a bad free takes nothing back, not even its good pages
    s = a.alloc_tokens(2 * ps)
    before = a.free_slot_set()
    for bad in ([*s, 0], [*s, a.total_slots], [*s, a.total_slots - 1]):  # the last: never allocated
        with pytest.raises(ValueError):
            a.free(bad)
        assert a.free_slot_set() == before
    a.free(s)
    assert a.available_size() == a.size


def test_slot_zero_page_is_never_handed_out():
    for ps in PAGE_SIZES:
        a = SlotAllocator(10 * ps, page_size=ps)
        got = a.alloc_tokens(a.size)
        assert min(got) >= ps
        assert sorted(got) == list(range(ps, a.total_slots))
        with pytest.raises(OutOfSlots):
            a.alloc_tokens(1)


def test_invalid_page_size():
    with pytest.raises(ValueError):
        SlotAllocator(8, page_size=0)


# ---- request -> token table ------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 8), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=40))
def test_req_to_token_pool_rows(size, ops):
    pool = ReqToTokenPool(size, 16, "cpu")
    # rows 0..size-1 are handed out; an extra padding row may follow them
    assert pool.req_to_token.shape[0] >= size and pool.req_to_token.shape[1] == 16
    assert pool.req_to_token.dtype == torch.int32
    pad_row = getattr(pool, "pad_row", None)
    assert pad_row is None or pad_row >= size
    used: set[int] = set()
    for is_alloc, k in ops:
        if is_alloc:
            row = pool.alloc()
            if len(used) == size:
                assert row is None
            else:
                assert row is not None and 0 <= row < size and row not in used
                used.add(row)
        elif used:
            row = sorted(used)[k % len(used)]
            pool.free(row)
            used.discard(row)
            with pytest.raises(AssertionError):
                pool.free(row)  # double free
        else:
            with pytest.raises(AssertionError):
                pool.free(k % size)  # freeing a row that is not in use
        assert pool.available() == size - len(used)
    with pytest.raises(AssertionError):
        pool.free(size)  # out of range
    for row in list(used):
        pool.free(row)
    assert pool.available() == size


def test_kv_pool_shapes_and_padding():
    kv = KVPool(num_layers=2, num_slots=12, kv_heads=2, head_dim=4, dtype=torch.float32,
                device="cpu", v_head_dim=3)
    assert len(kv.k) == len(kv.v) == 2
    assert kv.k[0].shape == (12, 2, 4) and kv.v[1].shape == (12, 2, 3)
    for t in kv.k + kv.v:
        t.fill_(7.0)
    kv.zero_padding(4)
    for t in kv.k + kv.v:
        assert (t[:4] == 0).all() and (t[4:] == 7).all()
    assert KVPool.bytes_per_token(2, 2, 4, torch.bfloat16, v_head_dim=3) == 2 * 2 * (4 + 3) * 2
    assert KVPool.bytes_per_token(3, 1, 8, torch.float32) == 3 * 1 * 16 * 4


@settings(max_examples=100, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 15),
                                 st.lists(st.integers(1, 999), min_size=1, max_size=8), st.integers(0, 2)),
                       max_size=12),
       bucket=st.booleans())
def test_req_to_token_writes_apply_at_flush_last_write_wins(writes, bucket):
    """Writes are applied at flush(), in order (a later write to a position wins), to the
    same table a direct write would give; with a write bucket (XLA) the padding entries
    touch only the pad row's position 0, which stays slot 0."""
    pool = ReqToTokenPool(4, 24, "cpu")
    if bucket:
        pool.write_bucket = lambda n: max(16, 1 << (n - 1).bit_length())
    want = pool.req_to_token.clone()
    for row, start, slots, how in writes:
        if how == 0:
            pool.write(row, start, slots)
        elif how == 1:
            pool.write(row, start, torch.tensor(slots))
        else:  # as points, the way a decode step writes
            pool.write_points([row] * len(slots), list(range(start, start + len(slots))), slots)
        want[row, start:start + len(slots)] = torch.tensor(slots, dtype=torch.int32)
    assert torch.equal(pool.req_to_token, torch.zeros_like(want))  # nothing before the flush
    pool.flush()
    assert torch.equal(pool.req_to_token, want)
    pool.flush()  # nothing pending: unchanged
    assert torch.equal(pool.req_to_token, want)
