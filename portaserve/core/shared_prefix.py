"""Cascade attention for decode batches whose requests share a cached prefix.

Through the radix cache, requests with a common prompt prefix (a system prompt, few-shot
examples, a forked program) hold the same KV slots for it.  Plain decode attention reads
that prefix once per request and step; cascade attention reads it once per *tile*, a
group of up to TILE requests sharing it, whose queries attend to it together (one matrix
product), then each request attends to its own positions, and the two partial softmaxes
merge by their log-sum-exp (ops.attention_decode_shared).

Grouping works on the host mirror of each request's KV slots (Req.slots): requests share
their first n positions exactly when slots[:n] are equal.  A slot belongs to one position
of one radix-tree path, so if two requests agree at position i they agree at every
position before it: requests are grouped by their slot at position MIN_SHARED - 1, and a
group's common length is found by binary search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 16  # requests per tile (a power of two); a larger group is split into several tiles
MIN_SHARED = 128  # shorter common prefixes are not worth a second attention pass


@dataclass
class SharedPrefix:
    kv_start: torch.Tensor  # [B] positions before this are the request's tile's prefix (0: none)
    tile_rows: torch.Tensor  # [NT] the req_to_token row to read a tile's prefix slots from
    tile_lens: torch.Tensor  # [NT] the tile's prefix length (0: an empty, padding tile)
    tile_members: torch.Tensor  # [NT, TILE] batch indices of the tile's requests, -1 padding


def common_length(a: list, b: list, known: int = 1) -> int:
    """Length of the common prefix of two slot lists known to agree on their first
    `known` entries (agreement is prefix-closed, see above)."""
    lo, hi = known, min(len(a), len(b))
    while lo < hi:  # invariant: a[:lo] == b[:lo]
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_tiles(slot_lists: list, rows: list, min_shared: int = MIN_SHARED, tile: int = TILE):
    """Group requests by shared prefix.  slot_lists[i] is request i's KV slots (position
    order, including the token this step writes); rows[i] its req_to_token row.
    Returns (kv_start per request, [(row, prefix length, [member indices])]) with every
    tile of 2..tile members, or None when no group is worth it."""
    # Requests sharing at least min_shared positions hold the same slot at position
    # min_shared - 1 (and, agreement being prefix-closed, at every position before it), so
    # that slot is the group key: a short common header (a BOS token, a chat template's
    # first page) does not merge groups, and one request sharing only a header cannot
    # shorten a group's prefix.
    groups: dict = {}
    for i, slots in enumerate(slot_lists):
        if len(slots) > min_shared:
            groups.setdefault(slots[min_shared - 1], []).append(i)
    kv_start = [0] * len(slot_lists)
    tiles = []
    for members in groups.values():
        if len(members) < 2:
            continue
        ref = slot_lists[members[0]]
        n = len(ref)
        for i in members[1:]:
            n = min(n, common_length(ref, slot_lists[i]))
            if n < min_shared:
                break
        if n < min_shared:
            continue
        # split evenly (sizes differ by at most one), so every tile keeps >= 2 members
        # and a batch of B requests never has more than B // 2 tiles
        parts = -(-len(members) // tile)
        base, extra = divmod(len(members), parts)
        at = 0
        for p in range(parts):
            chunk = members[at:at + base + (p < extra)]
            at += len(chunk)
            tiles.append((rows[members[0]], n, chunk))
            for i in chunk:
                kv_start[i] = n
    return (kv_start, tiles) if tiles else None


def build(slot_lists: list, rows: list, min_shared: int = MIN_SHARED) -> "torch.Tensor | None":
    """The plan of plan_tiles packed into one int64 host tensor (one copy to the device):
    [kv_start (B) | rows (NT) | lens (NT) | members (NT x TILE)], each part padded to an
    even length so that every part starts 16-byte aligned where the whole does (Triton
    compiles a kernel variant per pointer alignment); None when nothing is shared.
    unpack() splits it (on either side of the copy)."""
    plan = plan_tiles(slot_lists, rows, min_shared)
    if plan is None:
        return None
    kv_start, tiles = plan
    members = [m + [-1] * (TILE - len(m)) for _, _, m in tiles]
    def even(xs):
        return xs + [0] * (len(xs) % 2)

    flat = even(kv_start) + even([t[0] for t in tiles]) + even([t[1] for t in tiles]) + [x for m in members for x in m]
    return torch.tensor(flat, dtype=torch.int64)


def unpack(packed: torch.Tensor, batch_size: int) -> SharedPrefix:
    b = batch_size + batch_size % 2
    nt = (packed.shape[0] - b) // (2 + TILE)  # the padding (< 2 + TILE) drops out
    t = nt + nt % 2
    return SharedPrefix(packed[:batch_size], packed[b:b + nt], packed[b + t:b + t + nt],
                        packed[b + 2 * t:].view(nt, TILE))
