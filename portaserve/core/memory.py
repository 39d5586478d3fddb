"""KV memory: the KV pool, the request -> token table, and the slot allocator.

Slots are indices into the per-layer K/V buffers.  Slots are handed out in pages of
``page_size`` tokens; page 0 is reserved as the padding page (dummy writes go there), so
every usable slot is >= page_size.  With page_size 1 this is exactly token-level
allocation.  A request owns whole pages: its last page may be partly filled.
"""
from __future__ import annotations

import torch

from portaserve.core.hostcopy import to_device


class KVPool:
    """Per-layer K and V buffers of shape [num_slots, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, v_head_dim: int | None = None):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        v_head_dim = v_head_dim or head_dim
        # torch.empty: pages are only touched when written.  Every slot is written before
        # it is read except the padding slots of page 0, which are zeroed.
        self.k = [torch.empty(num_slots, kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.empty(num_slots, kv_heads, v_head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]

    def zero_padding(self, page_size: int) -> None:
        for t in self.k + self.v:
            t[:page_size].zero_()

    @staticmethod
    def bytes_per_token(num_layers, kv_heads, head_dim, dtype, v_head_dim=None) -> int:
        esize = torch.empty((), dtype=dtype).element_size()
        return num_layers * kv_heads * (head_dim + (v_head_dim or head_dim)) * esize


class ReqToTokenPool:
    """Row r maps position p of the request holding row r to its KV slot.  One extra row,
    ``pad_row``, is never handed out: it maps every position to the padding slot 0, for
    padded entries of fixed-shape (graph-captured) batches."""

    def __init__(self, size: int, max_context_len: int, device, pin_memory: bool = False):
        self.size = size
        self.req_to_token = torch.zeros(size + 1, max_context_len, dtype=torch.int32, device=device)
        self.pad_row = size
        self._free = list(range(size - 1, -1, -1))
        self.pin_memory = pin_memory
        # Writes are collected on the host and applied by flush() before a forward reads
        # the table: one copy and one scatter per pass instead of one per request, and on
        # XLA one small graph whose shape is a bucket (write_bucket) instead of one per
        # combination of request lengths.
        self._pending: list = []  # (flat indices, slots) per write, in order
        self.write_bucket = None  # n -> padded n (set by platforms with compiled graphs)

    def write(self, row: int, start: int, slots) -> None:
        """Positions [start, start + len(slots)) of row map to slots (a list or an int
        tensor, not changed by the caller until the flush), applied at flush(); a later
        write to a position wins."""
        if len(slots):
            base = row * self.req_to_token.shape[1] + start
            self._pending.append((range(base, base + len(slots)), slots))

    def write_points(self, rows: list, positions: list, slots: list) -> None:
        """Position positions[i] of row rows[i] maps to slots[i] (a decode step's new
        tokens), applied at flush()."""
        if rows:
            w = self.req_to_token.shape[1]
            self._pending.append(([r * w + p for r, p in zip(rows, positions)], slots))

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        spans = sorted(s for idx, _ in pending for s in (
            [(idx.start, idx.stop)] if isinstance(idx, range) else [(i, i + 1) for i in idx]))
        if any(nxt[0] < prev[1] for prev, nxt in zip(spans, spans[1:])):
            # overlapping writes (a row freed and reused, a position rewritten): keep the
            # last write of each position, since a scatter's order is undefined (rare)
            last: dict = {}
            for idx, v in pending:
                last.update(zip(idx, torch.as_tensor(v).tolist()))
            pending = [(list(last), list(last.values()))]
        idx = torch.cat([torch.arange(i.start, i.stop, dtype=torch.int64) if isinstance(i, range)
                         else torch.tensor(i, dtype=torch.int64) for i, _ in pending])
        vals = torch.cat([torch.as_tensor(v, dtype=torch.int64) for _, v in pending])
        if self.write_bucket is not None:
            extra = self.write_bucket(idx.shape[0]) - idx.shape[0]
            pad = self.pad_row * self.req_to_token.shape[1]  # the pad row's position 0: slot 0
            idx = torch.cat([idx, torch.full((extra,), pad, dtype=torch.int64)])
            vals = torch.cat([vals, torch.zeros(extra, dtype=torch.int64)])
        t = to_device(torch.stack([idx, vals]), self.req_to_token.device, self.pin_memory)
        self.req_to_token.view(-1)[t[0]] = t[1].to(torch.int32)

    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, idx: int) -> None:
        assert 0 <= idx < self.size and idx not in self._free, f"double free of req row {idx}"
        self._free.append(idx)


class OutOfSlots(RuntimeError):
    pass


class SlotAllocator:
    """Hands out KV slots page by page.  ``size`` usable tokens (a multiple of page_size)
    plus the reserved padding page 0."""

    def __init__(self, size: int, page_size: int = 1):
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.page_size = page_size
        self.num_pages = size // page_size
        self.size = self.num_pages * page_size
        self.clear()

    def clear(self) -> None:
        # pages 1..num_pages; pop() from the end hands out low pages first
        self._free_pages = list(range(self.num_pages, 0, -1))
        self._free_set = set(self._free_pages)

    @property
    def total_slots(self) -> int:
        return (self.num_pages + 1) * self.page_size

    def available_size(self) -> int:
        return len(self._free_pages) * self.page_size

    def free_slot_set(self) -> set[int]:
        ps = self.page_size
        return {p * ps + i for p in self._free_pages for i in range(ps)}

    def alloc_tokens(self, n: int, last_slot: int | None = None, seq_len: int = 0) -> list[int]:
        """Slots for the next n tokens of a request whose first seq_len tokens already
        have slots, the last of them being last_slot.  Fills the rest of the request's
        last page before taking new pages.  Raises OutOfSlots (taking nothing) if short."""
        ps = self.page_size
        out: list[int] = []
        if ps > 1 and seq_len % ps and last_slot is not None:
            room = ps - seq_len % ps
            take = min(room, n)
            out.extend(range(last_slot + 1, last_slot + 1 + take))
        need = n - len(out)
        pages_needed = -(-need // ps)
        if pages_needed > len(self._free_pages):
            raise OutOfSlots(f"need {pages_needed} pages, {len(self._free_pages)} free")
        if pages_needed:  # in bulk, in pop() order (the list's end first: low pages)
            taken = self._free_pages[-pages_needed:][::-1]
            del self._free_pages[-pages_needed:]
            self._free_set.difference_update(taken)
            if ps == 1:
                out.extend(taken)
            else:
                for page in taken:
                    out.extend(range(page * ps, page * ps + ps))
        return out[:n]

    def pages_needed(self, n: int, seq_len: int = 0) -> int:
        ps = self.page_size
        room = (ps - seq_len % ps) % ps if ps > 1 else 0
        return -(-max(0, n - room) // ps)

    def free(self, slots) -> None:
        """Return the pages holding these slots.  Callers pass slots that cover whole
        pages, or the tail of a request starting on a page boundary."""
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        if not slots:
            return
        ps = self.page_size
        pages = list({s // ps: None for s in slots}) if ps > 1 else list(slots)  # in order
        lo, hi = min(pages), max(pages)
        if lo <= 0 or hi > self.num_pages:
            raise ValueError(f"freeing slot page {lo if lo <= 0 else hi} outside the pool")
        fresh = set(pages)
        if len(fresh) != len(pages) or not fresh.isdisjoint(self._free_set):
            dup = next(p for i, p in enumerate(pages) if p in self._free_set or p in pages[:i])
            raise ValueError(f"double free of KV page {dup}")
        self._free_set |= fresh
        self._free_pages.extend(pages)


# ---- KV cache storage type (--kv-cache-dtype) -------------------------------------------------
KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's storage dtype.  FP8 caches hold K/V cast directly (a per-tensor scale of
    1.0: e4m3 covers |x| <= 448 with 3 mantissa bits, ample for post-norm K/V of common
    models); attention upcasts what it reads to the query's dtype."""
    if name in (None, "", "auto"):
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {name!r} not understood; use auto, "
                         + ", ".join(KV_CACHE_DTYPES))
    return KV_CACHE_DTYPES[name]
