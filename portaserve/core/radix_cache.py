"""RadixAttention's prefix cache: a radix tree over token ids whose nodes own KV slots.

Each edge holds a run of token ids (``key``) and the KV slots computed for them
(``value``).  Requests sharing a prefix share those slots.  A node referenced by a running
request is locked (lock_ref > 0, on it and every ancestor) and never evicted; unlocked
leaves are evicted least-recently-used first when the pool runs short.

With page_size > 1 keys are compared and split only at page boundaries, so every node
owns whole pages.
"""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Optional

import torch

_counter = itertools.count()


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access", "id")

    def __init__(self, key=None, value=None, parent=None):
        self.children: dict = {}
        self.parent: Optional[TreeNode] = parent
        self.key: list[int] = key or []
        self.value: torch.Tensor = value if value is not None else torch.empty(0, dtype=torch.int64)
        self.lock_ref = 0
        self.last_access = time.monotonic()
        self.id = next(_counter)

    def __lt__(self, other):  # heap order: least recently used first
        return self.last_access < other.last_access


class RadixCache:
    def __init__(self, allocator, page_size: int = 1):
        self.allocator = allocator
        self.page_size = page_size
        self.reset()

    # ---- bookkeeping ----------------------------------------------------------------
    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return sum(len(n.value) for n in self.nodes())

    def nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            if n is not self.root:
                yield n
            stack.extend(n.children.values())

    def _child_key(self, key):
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _match_len(self, a, b) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        if self.page_size > 1:
            i -= i % self.page_size
        return i

    # ---- lookup ---------------------------------------------------------------------
    def match_prefix(self, key: list[int]):
        """Longest cached prefix of key (page-aligned).  Returns (slots tensor, last node).
        Splits a node on a partial match so the returned node ends exactly there."""
        if self.page_size > 1:
            key = key[: len(key) - len(key) % self.page_size]
        node = self.root
        now = time.monotonic()
        node.last_access = now
        values = []
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access = now
            n = self._match_len(child.key, key)
            if n == 0:
                break
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node = child
            key = key[n:]
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split child at n: returns the new upper node holding key[:n]."""
        upper = TreeNode(child.key[:n], child.value[:n], child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children = {self._child_key(child.key[n:]): child}
        child.parent.children[self._child_key(child.key)] = upper
        child.parent = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        return upper

    # ---- insertion ------------------------------------------------------------------
    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Insert key -> value.  Returns how many leading tokens were already cached; the
        caller owns value[:that] duplicates (it must free those not already its own)."""
        assert len(key) == len(value)
        if self.page_size > 1:
            cut = len(key) - len(key) % self.page_size
            key, value = key[:cut], value[:cut]
        node = self.root
        now = time.monotonic()
        matched = 0
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                new = TreeNode(list(key), value.clone(), node)
                new.last_access = now
                node.children[self._child_key(key)] = new
                self._evictable += len(key)
                return matched
            child.last_access = now
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            matched += n
            node = child
            key = key[n:]
            value = value[n:]
        return matched

    # ---- locking --------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.value)
                self._protected += len(node.value)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlocking an unlocked radix node"
            if node.lock_ref == 1:
                self._evictable += len(node.value)
                self._protected -= len(node.value)
            node.lock_ref -= 1
            node = node.parent

    # ---- eviction -------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves, LRU first (or as many as
        are evictable).  Returns the number freed."""
        leaves = [n for n in self.nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.allocator.free(leaf.value)
            freed += len(leaf.value)
            self._evictable -= len(leaf.value)
            parent = leaf.parent
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed
