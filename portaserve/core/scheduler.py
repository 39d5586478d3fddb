"""The scheduler: admission, chunked prefill, continuous batching, retraction.

One ``step()`` runs one forward pass:
  * if requests are waiting (or a chunked prefill is in progress) and fit, a prefill
    ("extend") batch over their uncached tokens, at most ``chunked_prefill_size`` tokens;
  * otherwise one decode step of every running request.
With the overlap scheduler (accelerators) a step launches its pass and then reads the
previous step's sampled tokens while the device runs it (see "overlapped decode" and
"overlapped prompt passes" below).
New requests therefore join between decode steps (continuous batching).  Prefixes come
from the radix cache; a request's KV goes back into the tree when it finishes.  When a
decode step cannot get a slot per request even after evicting the cache, the requests
with the least progress are retracted: their KV is handed to the tree (evictable), and
they go back to the front of the queue to be re-prefilled later, output kept.

The scheduler is single-threaded and transport-free: the in-process Engine drives it from
a thread, the server from its own process.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from portaserve.core import ops, shared_prefix, stop_regex
from portaserve.core.forward_batch import ForwardBatch
from portaserve.core.grammar import GrammarError
from portaserve.core.hostcopy import to_device
from portaserve.core.memory import KVPool, OutOfSlots, ReqToTokenPool, SlotAllocator
from portaserve.core.radix_cache import RadixCache
from portaserve.core.request import Req
from portaserve.core.sampler import Sampler

logger = logging.getLogger(__name__)

# Admission orders (SGLang's --schedule-policy): lpm and dfs-weight look at the radix
# cache (without one they admit in arrival order, as SGLang's do); fcfs, lof (longest
# output first: the largest max_new_tokens, arrival order among equals) and random do not.
# Under lof a request that has run already (retracted, or re-queued by jump-forward) stays
# ahead of the ones that have not, as it does under fcfs.
POLICIES = ("fcfs", "lpm", "dfs-weight", "lof", "random")


def _lof_key(r: Req) -> tuple:
    return (not r.admitted_once, -r.sampling.max_new_tokens)


def _longest_first(r: Req) -> int:
    return -r.kv_len


@dataclass
class _Inflight:
    reqs: list
    ids: torch.Tensor  # sampled ids, on the device
    host: torch.Tensor  # pinned copy, valid once event has completed (lazy devices: ids itself)
    event: object
    # each request's epoch at launch, -1 for rows whose token is thrown away: a request
    # released since (a jump re-queues it) may be running again when the tokens are read
    epochs: list


@dataclass
class SchedulerConfig:
    context_len: int
    max_total_tokens: int
    max_running_requests: int = 256
    chunked_prefill_size: int = 8192  # <= 0: no chunking
    max_prefill_tokens: int = 16384
    page_size: int = 1
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    random_seed: int = 0
    overlap: bool = False  # launch decode N+1 before processing N's tokens (accelerators)
    # with overlap: launch a prompt pass before reading the previous step's tokens, and the
    # decode step after it before reading the pass's (--disable-overlap-prefill: off)
    overlap_prefill: bool = True
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    # Running requests take their decode step inside a prefill batch (one forward instead
    # of stalling the decode batch while the prefill runs); SGLang's --enable-mixed-chunk.
    enable_mixed_chunk: bool = False
    # Tensor-parallel ranks each run a replica of this scheduler and must take identical
    # decisions: nothing may depend on wall-clock timing (grammar compiles are waited for).
    deterministic: bool = False


@dataclass
class StepStats:
    mode: str = "idle"  # "extend" | "mixed" (extend + running requests' decode) | "decode" | "idle"
    batch_size: int = 0
    num_tokens: int = 0
    retracted: int = 0


def common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@dataclass
class SchedulerCounters:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    retractions: int = 0
    forward_extend: int = 0
    forward_decode: int = 0
    forward_mixed: int = 0  # extend passes that also carried running requests' decode step
    decode_shared: int = 0  # decode passes that ran cascade attention over shared prefixes
    jump_forward_tokens: int = 0
    extend_tokens: int = 0


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, model, kv: KVPool, device, eos_ids,
                 decode_fn: Optional[Callable[[list[int]], str]] = None, grammar=None,
                 jump_forward: bool = True, rng_device=None, inference_mode: bool = True,
                 pin_memory: bool = True):
        if cfg.schedule_policy not in POLICIES:
            raise ValueError(f"unknown schedule policy {cfg.schedule_policy!r}; choose from {POLICIES}")
        self.cfg = cfg
        self.model = model
        self.kv = kv
        self.device = device
        self.eos_ids = set(eos_ids)
        self.decode_fn = decode_fn
        self.page_size = cfg.page_size
        self.allocator = SlotAllocator(cfg.max_total_tokens, cfg.page_size)
        self.req_pool = ReqToTokenPool(cfg.max_running_requests + 1, cfg.context_len + 8, device, pin_memory)
        self.tree: Optional[RadixCache] = None if cfg.disable_radix_cache else RadixCache(
            self.allocator, cfg.page_size)
        self.pin_memory = pin_memory
        self.sampler = Sampler(model.cfg.vocab_size, device, cfg.random_seed, rng_device, pin_memory)
        self.no_grad = torch.inference_mode if inference_mode else torch.no_grad
        self.rng = random.Random(cfg.random_seed)
        # Set by the platform: replays captured decode graphs (e.g. CUDA graphs) when it can.
        self.decode_graph = None
        self.overlap = cfg.overlap
        self.overlap_prefill = cfg.overlap_prefill
        self.inflight: Optional[_Inflight] = None  # a launched step whose sampled tokens are unread
        self.grammar = grammar  # GrammarBackend or None
        self.jump_forward = jump_forward and self.tree is not None
        # Only jump when every running request can jump at this step (--jump-forward
        # whole-batch: a jump's extend pass is eager and, with graphed decode, costs more
        # than the steps it saves unless no request is left decoding beside it; with the
        # overlap scheduler the already launched decode step is wasted as well).
        self.jump_whole_batch = False
        # Cascade attention over prefixes shared through the radix cache (set by the
        # runtime, --cascade-attention; core/shared_prefix.py).
        self.cascade_attention = False
        # Set by platforms whose graphs are compiled per tensor shape (XLA): sizes to pad
        # batches to on the host, so that no device op sees an unpadded batch shape.
        # decode(b) -> padded batch; extend(tokens, requests) -> padded pair; rows(n) ->
        # padded number of sampled rows.  Padding follows the pad-row convention
        # (ReqToTokenPool): padded entries read and write only slot 0 and are dropped.
        self.padding = None
        # Set by platforms with lazy tensors (XLA): a launched step's sampled ids are read by
        # value later (reading runs what is pending) instead of copied out under an event.
        self.lazy_device = False
        self.cut_graph = None  # lazy devices: launch what is pending as one graph (XLA: sync)
        self.grammar_queue: list[Req] = []  # constrained requests waiting for their grammar
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Optional[Req] = None
        self._finished_early: list[Req] = []  # finished without running (reported next step)
        self.new_token_ratio = cfg.init_new_token_ratio
        self.counters = SchedulerCounters()
        self.last_step = StepStats()

    # ---- public interface -------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        req.generator = self.sampler.request_generator(req.sampling.sampling_seed)
        c = req.constraint()
        if c is not None:
            if self.grammar is None:
                req.finished_reason = {"type": "abort", "message": "structured output is off on this server",
                                       "status_code": 400}
                self._finished_early.append(req)
                return
            req.grammar_future = self.grammar.compile(*c)
            self.grammar_queue.append(req)
            return
        self.waiting.append(req)

    def compiled_grammars(self) -> list[str]:
        """Rids of queued requests whose grammar has compiled on this rank and is not yet
        released.  Under tensor parallelism rank 0 announces these to every rank
        (``release_grammars``), so all replicas admit them at the same step."""
        if not self.grammar_queue:
            return []
        if not self.waiting and not self.running and self.chunked is None:
            self._wait_first_grammar()
        return [r.rid for r in self.grammar_queue
                if not r.grammar_released and r.grammar_future.done()]

    def release_grammars(self, rids) -> None:
        rids = set(rids)
        for r in self.grammar_queue:
            if r.rid in rids:
                r.grammar_released = True

    def _wait_first_grammar(self) -> None:
        # nothing else to do: wait briefly for the first grammar instead of spinning
        try:
            self.grammar_queue[0].grammar_future.exception(timeout=0.01)
        except Exception:
            pass

    def _poll_grammars(self) -> None:
        """Move requests whose grammar compiled into the queue (compiling happens on a
        worker thread, off this loop).  In deterministic mode only released requests
        move: readiness must not differ between ranks (a released grammar that is still
        compiling here is waited for; it finished on rank 0 already)."""
        if not self.grammar_queue:
            return
        if not self.cfg.deterministic and not self.waiting and not self.running and self.chunked is None:
            self._wait_first_grammar()
        still = []
        for r in self.grammar_queue:
            fut = r.grammar_future
            if self.cfg.deterministic:
                if not r.grammar_released:
                    still.append(r)
                    continue
                fut.exception()  # wait
            elif not fut.done():
                still.append(r)
                continue
            r.grammar_future = None
            err = fut.exception()
            if err is not None:
                # cannot be compiled or matches nothing: the client's input; else a server fault
                r.finished_reason = {"type": "abort", "message": str(err),
                                     "status_code": 400 if isinstance(err, GrammarError) else 500}
                self._finished_early.append(r)
            else:
                r.grammar = self.grammar.matcher(fut.result(), r.constraint()[0])
                self.waiting.append(r)
        self.grammar_queue = still

    def abort(self, rid: str) -> Optional[Req]:
        """Abort a request wherever it is.  Returns it (finished) if it was found."""
        reason = {"type": "abort", "message": "aborted by request"}
        for i, r in enumerate(self.grammar_queue):
            if r.rid == rid:
                self.grammar_queue.pop(i)
                r.finished_reason = reason
                return r
        for i, r in enumerate(self.waiting):
            if r.rid == rid:
                self.waiting.pop(i)
                r.finished_reason = reason
                if r.req_pool_idx is not None:  # a retracted request keeps nothing
                    self._release(r)
                return r
        if self.chunked is not None and self.chunked.rid == rid:
            r, self.chunked = self.chunked, None
            r.finished_reason = reason
            self._release(r)
            return r
        for i, r in enumerate(self.running):
            if r.rid == rid:
                self.running.pop(i)
                r.finished_reason = reason
                self._release(r)
                return r
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.grammar_queue
                    or self._finished_early or self.inflight is not None)

    def num_requests(self) -> int:
        return (len(self.waiting) + len(self.running) + (1 if self.chunked else 0)
                + len(self.grammar_queue))

    def step(self) -> list[Req]:
        """Run one forward pass.  Returns requests that produced tokens or finished."""
        self.last_step = StepStats()
        self._poll_grammars()
        # Decode batches go longest first: attention kernels start a batch's programs in
        # batch order, and a long sequence started last runs alone at the end of the launch
        # (with an offline run's lengths the Triton decode kernel took 0.77-0.93x the time,
        # and the run gave 1.04x the tokens/s; docs/BENCHMARKS.md, session 18).  Lengths grow
        # together, so the list stays sorted between admissions and this is one linear pass.
        if len(self.running) > 1:
            self.running.sort(key=_longest_first)
        early, self._finished_early = self._finished_early, []
        if self.inflight is not None:
            return early + self._step_overlapped()
        reqs = self._schedule_prefill()
        if reqs:
            riders = self._mix_running(reqs) if self._mixing() else []
            if self._overlap_extend(reqs, riders):
                return early + self._launch_extend(reqs)
            return early + self._run_extend(reqs + riders, riders)
        if self.running:
            if self.overlap and self._overlap_safe(self.running) and self._room_for_decode(self.running):
                self.inflight = self._launch_decode(list(self.running))
                return early
            return early + self._run_decode()
        return early

    def flush_cache(self) -> bool:
        """Drop the whole prefix cache.  Only allowed when no request is in flight."""
        if self.has_work():
            return False
        if self.tree is not None:
            self.tree.reset()
        self.allocator.clear()
        return True

    # memory accounting, for /server_info and tests
    def kv_stats(self) -> dict:
        evictable = self.tree.evictable_size() if self.tree else 0
        protected = self.tree.protected_size() if self.tree else 0
        free = self.allocator.available_size()
        return {"max_total_tokens": self.allocator.size, "free": free, "evictable": evictable,
                "protected": protected, "used": self.allocator.size - free,
                "usage": (self.allocator.size - free - evictable) / max(1, self.allocator.size)}

    # ---- memory helpers ---------------------------------------------------------------
    def _available(self) -> int:
        return self.allocator.available_size() + (self.tree.evictable_size() if self.tree else 0)

    def _alloc(self, req: Req, start: int, n: int) -> list[int]:
        """Slots for positions [start, start+n) of req, evicting cache if needed."""
        self._make_room(self.allocator.pages_needed(n, start) * self.page_size)
        # only a partly filled last page (page_size > 1) needs the previous slot, and such a
        # page is always this request's own allocation, so req.last_slot knows it
        slots = self.allocator.alloc_tokens(n, req.last_slot, start)
        req.last_slot = slots[-1]
        del req.slots[start:]
        req.slots.extend(slots)
        self.req_pool.write(req.req_pool_idx, start, slots)
        return slots

    def _make_room(self, tokens: int) -> None:
        short = tokens - self.allocator.available_size()
        if short > 0 and self.tree is not None:
            self.tree.evict(short)

    def _match(self, req: Req) -> None:
        """Find req's cached prefix (limited so at least one token is computed, and so
        positions whose input logprobs are wanted are computed)."""
        fill = req.fill_ids
        limit = len(fill) - 1
        if req.return_logprob and req.input_logprob_start() < len(req.input_ids) and not req.input_lp_done:
            # from the first position whose logprob is not recorded yet (a prompt retracted
            # part-way has some; a cache hit beyond them would skip the rest)
            start = max(req.input_logprob_start() - 1, 0)
            limit = min(limit, start + len(req.input_token_logprobs))
        if self.tree is None or limit <= 0:
            req.prefix_indices = torch.empty(0, dtype=torch.int64)
            req.last_node = None
            return
        req.prefix_indices, req.last_node = self.tree.match_prefix(fill[:limit])

    def _release(self, req: Req) -> None:
        """Return req's KV: into the radix tree if there is one, else to the allocator."""
        if req.req_pool_idx is None:
            return
        total = req.kv_len  # positions holding a slot of this request
        # with overlap, a slot may be allocated one token ahead of what is in fill_ids
        kv_len = min(total, req.seq_len)
        # the host mirror: reading the device row would wait for in-flight work
        slots = torch.tensor(req.slots[:total], dtype=torch.int64)
        own_from = len(req.prefix_indices)
        if self.tree is None:
            self.allocator.free(slots[own_from:])
        else:
            aligned = kv_len - kv_len % self.page_size
            already = self.tree.insert(req.fill_ids[:aligned], slots[:aligned])
            # slots of ours whose tokens another request cached first are duplicates
            if already > own_from:
                self.allocator.free(slots[own_from:already])
            if total > aligned:
                self.allocator.free(slots[aligned:total])
            if req.last_node is not None:
                self.tree.dec_lock_ref(req.last_node)
        req.last_node = None
        req.last_slot = None
        req.epoch += 1
        req.slots = []
        req.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx = None
        req.kv_len = 0

    def _cache_unfinished(self, req: Req) -> None:
        """After a chunk: put the computed prefix in the tree and hold it locked, so the
        rest of the prompt (and other requests) can reuse it."""
        if self.tree is None:
            return
        kv_len = req.kv_len
        aligned = kv_len - kv_len % self.page_size
        slots = torch.tensor(req.slots[:aligned], dtype=torch.int64)
        own_from = len(req.prefix_indices)
        already = self.tree.insert(req.fill_ids[:aligned], slots)
        if already > own_from:
            self.allocator.free(slots[own_from:already])
        new_prefix, new_node = self.tree.match_prefix(req.fill_ids[:aligned])
        assert len(new_prefix) == aligned
        req.slots[:aligned] = new_prefix.tolist()
        if already > own_from:  # the duplicates freed above now read the tree's slots
            self.req_pool.write(req.req_pool_idx, own_from, new_prefix[own_from:already])
        self.tree.inc_lock_ref(new_node)
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.last_node = new_node
        req.prefix_indices = new_prefix

    # ---- policies ---------------------------------------------------------------------
    def _order_waiting(self) -> None:
        p = self.cfg.schedule_policy
        if p == "random":
            self.rng.shuffle(self.waiting)
            return
        if p == "lof":
            self.waiting.sort(key=_lof_key)
            return
        if p == "fcfs" or self.tree is None:
            return
        for r in self.waiting:
            self._match(r)
        if p == "lpm":
            self.waiting.sort(key=lambda r: -len(r.prefix_indices))
        elif p == "dfs-weight":
            self.waiting = self._dfs_weight_order(self.waiting)

    def _dfs_weight_order(self, reqs: list[Req]) -> list[Req]:
        """Visit the radix tree depth-first, heavier subtrees (more waiting requests below)
        first, so requests sharing a prefix are admitted together."""
        at: dict[int, list[Req]] = {}
        nodes = {}
        for r in reqs:
            n = r.last_node or self.tree.root
            at.setdefault(n.id, []).append(r)
            nodes[n.id] = n
        weight: dict[int, int] = {}
        for nid, rs in at.items():
            n = nodes[nid]
            while n is not None:
                weight[n.id] = weight.get(n.id, 0) + len(rs)
                nodes[n.id] = n
                n = n.parent
        out: list[Req] = []
        stack = [self.tree.root]
        while stack:
            n = stack.pop()
            out.extend(at.get(n.id, []))
            kids = [c for c in n.children.values() if c.id in weight]
            kids.sort(key=lambda c: weight[c.id])  # lightest pushed first, heaviest popped first
            stack.extend(kids)
        return out

    # ---- prefill ----------------------------------------------------------------------
    def _reserve(self, r: Req) -> int:
        """KV slots kept free for r's expected output: its remaining max_new_tokens scaled
        by new_token_ratio (SGLang's estimate; it decays while no request retracts)."""
        return int(max(0, r.sampling.max_new_tokens - len(r.output_ids)) * self.new_token_ratio)

    def _reserved_for_running(self) -> int:
        return sum(self._reserve(r) for r in self.running)

    def _schedule_prefill(self) -> list[Req]:
        if not self.waiting and self.chunked is None:
            return []
        self._order_waiting()
        # a chunk is whole pages: at least one (a smaller chunk would round down to none)
        chunk_budget = (max(self.cfg.chunked_prefill_size, self.page_size)
                        if self.cfg.chunked_prefill_size > 0 else 1 << 62)
        if self._mixing() and self.running:
            # the running requests' decode tokens ride along; the prompt part keeps at least
            # half the chunk (and a page), so many running requests cannot starve admission
            chunk_budget = max(chunk_budget - len(self.running), chunk_budget // 2, self.page_size)
        token_budget = self.cfg.max_prefill_tokens
        batch: list[Req] = []

        if self.chunked is not None:
            req = self.chunked
            n = min(req.extend_len(), chunk_budget, self._available())
            if n < req.extend_len():
                n -= n % self.page_size
            if n <= 0:
                return []  # no room for the next chunk yet: let decode run and free some
            self._alloc(req, req.kv_len, n)
            req.extend_n = n
            chunk_budget -= n
            token_budget -= n
            batch.append(req)
            self.chunked = None if n == req.extend_len() else req

        i = 0  # index into waiting: requests deferred by the in-batch check are skipped
        while i < len(self.waiting) and self.chunked is None and i < 64:
            if len(self.running) + len(batch) >= self.cfg.max_running_requests:
                break
            if self.req_pool.available() == 0:
                break
            req = self.waiting[i]
            self._match(req)
            prefix = len(req.prefix_indices)
            if self.tree is not None and self._shares_uncached_prefix(req, prefix, batch):
                i += 1  # compute the shared part once; this one will hit the cache next round
                continue
            if self.tree is not None and req.last_node is not None:
                self.tree.inc_lock_ref(req.last_node)  # protect the prefix from eviction
            extend = req.seq_len - prefix
            reserve = self._reserve(req)
            need = extend + reserve
            # room left: free slots (the batch's prompt slots are allocated already), less
            # the running requests' and this batch's expected output (a batch admitted on
            # free slots alone retracts soon after)
            avail = self._available() - self._reserved_for_running() - sum(self._reserve(r) for r in batch)
            fits = need <= avail or (not batch and not self.running and extend <= avail)
            if not fits or chunk_budget <= 0 or (token_budget < extend and batch):
                if self.tree is not None and req.last_node is not None:
                    self.tree.dec_lock_ref(req.last_node)
                break
            n = min(extend, chunk_budget)
            if n < extend:
                n -= n % self.page_size
                if n <= 0:
                    if self.tree is not None and req.last_node is not None:
                        self.tree.dec_lock_ref(req.last_node)
                    break
            self.waiting.pop(i)
            req.req_pool_idx = self.req_pool.alloc()
            req.slots = req.prefix_indices.tolist()
            self.req_pool.write(req.req_pool_idx, 0, req.prefix_indices)
            req.kv_len = prefix
            if not req.admitted_once:
                req.admitted_once = True
                req.cached_tokens = prefix
                self.counters.prompt_tokens += len(req.input_ids)
                self.counters.cached_tokens += prefix
            try:
                self._alloc(req, prefix, n)
            except OutOfSlots:
                # accounting said it fits; if the allocator disagrees, put it back
                self._release(req)
                self.waiting.insert(i, req)
                break
            req.extend_n = n
            chunk_budget -= n
            token_budget -= n
            batch.append(req)
            if n < extend:
                self.chunked = req
        return batch

    def _mixing(self) -> bool:
        """--enable-mixed-chunk, where batches are not padded (padding requests would sit
        after the riders, which attention expects last)."""
        return self.cfg.enable_mixed_chunk and self.padding is None

    def _mix_running(self, batch: list[Req]) -> list[Req]:
        """The running requests, each given a slot for its next token, to take their
        decode step inside this prefill batch; none if the pool cannot hold a token each
        (the decode step after this batch retracts as usual)."""
        riders = list(self.running)  # never in batch: it holds new and chunked requests only
        if not riders or not self._room_for_decode(riders):
            return []
        for r in riders:
            self._alloc(r, r.kv_len, 1)
            r.extend_n = 1
        self._decay_new_token_ratio()
        return riders

    IN_BATCH_PREFIX_CHECK = 32  # tokens (SGLang uses the same threshold)

    def _shares_uncached_prefix(self, req: Req, prefix: int, batch: list[Req]) -> bool:
        """Would req recompute >= 32 uncached tokens that a request of this batch is
        already computing?  Then it waits a round and takes them from the cache."""
        end = prefix + self.IN_BATCH_PREFIX_CHECK
        if len(req.input_ids) < end:
            return False
        head = req.input_ids[:end]
        return any(len(r.input_ids) >= end and r.input_ids[:end] == head for r in batch)

    def _run_extend(self, batch: list[Req], riders: list[Req] = ()) -> list[Req]:
        """One extend pass over batch: prompt chunks, plus (mixed batches) the riders,
        running requests computing their one newest token; its tokens sampled and read."""
        logits, sel_owner = self._extend_forward(batch, riders)
        # input logprobs: logits at position p score token p+1
        sample_rows, sample_reqs = [], []
        if logits is not None:
            need_lp = [i for i, (r, p, last) in enumerate(sel_owner)
                       if r.return_logprob and p + 1 < len(r.input_ids)]
            if need_lp:
                lps = torch.log_softmax(logits[self._pad_rows(need_lp)], dim=-1)
                for j, i in enumerate(need_lp):
                    r, p, _ = sel_owner[i]
                    if p + 1 >= r.input_logprob_start():
                        self._record_input_logprob(r, lps[j], r.input_ids[p + 1])
            for i, (r, p, last) in enumerate(sel_owner):
                if last:
                    sample_rows.append(i)
                    sample_reqs.append(r)
        for r in sample_reqs:
            if r.return_logprob and r.input_logprob_start() < len(r.input_ids) and not r.input_lp_done:
                if r.input_logprob_start() == 0:
                    r.input_token_logprobs.insert(0, (None, r.input_ids[0], None))
                    if r.top_logprobs_num:
                        r.input_top_logprobs.insert(0, None)
                r.input_lp_done = True
        if sample_reqs:
            self._sample_and_advance(logits[self._pad_rows(sample_rows)], sample_reqs)
        return [r for r in batch if r is not self.chunked]

    # ---- overlapped prompt passes ------------------------------------------------------
    # A prompt pass is launched without reading the previous step's tokens first (those
    # are read while the pass runs), and its requests join the running batch at launch:
    # the decode step after it is launched with their first tokens still on the device.
    # Passes that need the host between forward and sampling (input logprobs, riders of a
    # mixed batch) and padded batches (XLA) run as before.
    def _overlap_extend(self, batch: list[Req], riders) -> bool:
        return (self.overlap and self.overlap_prefill and not riders and self.padding is None
                and not self.lazy_device and self._overlap_safe(batch)
                and all(r.sampling.max_new_tokens > 0 for r in batch))

    def _launch_extend(self, batch: list[Req], prev: Optional["_Inflight"] = None) -> list[Req]:
        """Launch batch's forward and sampling, then read and process prev's tokens (if
        any) while they run.  Returns the requests prev's tokens went to."""
        logits, sel_owner = self._extend_forward(batch, ())
        done = [r for r, _, last in sel_owner if last]  # no logprob rows: one row per request
        self.running.extend(done)
        # the new requests' first tokens depend on nothing prev decides (their grammar
        # masks included), so the sampling is queued right behind the forward
        launched = self._launch_sampling(done, logits) if done else None
        out = self._resolve(prev) if prev is not None else []
        self.inflight = launched
        return out

    def _extend_forward(self, batch: list[Req], riders) -> tuple:
        """Build and launch one extend pass; advance its requests' KV bookkeeping.  Returns
        (logits of the selected rows or None, their (request, position, samples) owners)."""
        ids, pos, locs, sel, sel_owner = [], [], [], [], []
        row = 0
        for req in batch:
            start, n = req.kv_len, req.extend_n
            fill = req.fill_ids
            ids.extend(fill[start:start + n])
            pos.extend(range(start, start + n))
            locs.extend(req.slots[start:start + n])  # the host mirror of the row
            end = start + n
            completes = end == len(fill)
            # rows whose logits we need: input logprobs (positions [lp_from - 1, prompt - 1)),
            # and the last row to sample from; ranges, not a loop over the chunk's tokens
            lp_from = req.input_logprob_start()
            want = []
            if req.return_logprob and lp_from < len(req.input_ids) and not req.input_lp_done:
                # from the first position not recorded yet: a prompt retracted part-way
                # resumes from a page-aligned prefix and recomputes a few it has
                done_to = max(lp_from - 1, 0) + len(req.input_token_logprobs)
                want = range(max(start, lp_from - 1, 0, done_to), min(end, len(req.input_ids) - 1))
            for p in want:
                sel.append(row + (p - start))
                sel_owner.append((req, p, completes and p == end - 1))
            if completes and (not want or want[-1] != end - 1):
                sel.append(row + n - 1)
                sel_owner.append((req, end - 1, True))
            row += n
        rows = [r.req_pool_idx for r in batch]
        prefix_lens = [r.kv_len for r in batch]
        extend_lens = [r.extend_n for r in batch]
        real_tokens = len(ids)
        if self.padding is not None:
            # padding requests on the pad row hold the padding tokens, each at most a row
            tp, bp = self.padding.extend(len(ids), len(batch))
            nt, nb = tp - len(ids), bp - len(batch)
            width = self.req_pool.req_to_token.shape[1]
            if nt > nb * width:
                raise RuntimeError(f"extend padding: {nt} padding tokens need more than {nb} padding requests")
            ids, pos, locs = ids + [0] * nt, pos + [0] * nt, locs + [0] * nt
            rows += [self.req_pool.pad_row] * nb
            prefix_lens += [0] * nb
            extend_lens += [min(width, max(nt - j * width, 0)) for j in range(nb)]
        self.req_pool.flush()
        seq_l = [p + e for p, e in zip(prefix_lens, extend_lens)]
        sel_rows = self._pad_rows(sel) if sel else []
        # the pass's metadata in one asynchronous copy: a plain torch.tensor(..., device=)
        # per field would wait for the previous pass to finish, each, before this one launches
        (input_ids, positions, out_loc, rows_d, prefix_d, extend_d, seq_d, sel_d) = self._upload(
            [ids, pos, locs, rows, prefix_lens, extend_lens, seq_l, sel_rows])
        seq_cpu = torch.tensor(seq_l, dtype=torch.int64)
        fb = ForwardBatch(
            is_decode=False, input_ids=input_ids, positions=positions, out_cache_loc=out_loc,
            req_pool_indices=rows_d, seq_lens=seq_d, kv=self.kv,
            req_to_token=self.req_pool.req_to_token, prefix_lens=prefix_d, extend_lens=extend_d,
            decode_tail=len(riders), seq_lens_cpu=seq_cpu,
            extend_lens_cpu=torch.tensor(extend_lens, dtype=torch.int64),
            max_extend_len=max(extend_lens[:len(extend_lens) - len(riders)], default=0),
        )
        ops.attention_prepare(fb)
        with self.no_grad():
            hidden = self.model(fb)
            logits = self.model.compute_logits(hidden[sel_d]) if sel else None
        self.counters.forward_extend += 1
        self.counters.extend_tokens += real_tokens - len(riders)
        if riders:
            self.counters.forward_mixed += 1
        self.last_step = StepStats("mixed" if riders else "extend", len(batch), real_tokens)

        riding = {id(r) for r in riders}
        for req in batch:
            req.kv_len += req.extend_n
            req.extend_n = 0
            # share the prompt's KV right away (not only when the request finishes), so
            # requests with the same prefix admitted later skip recomputing it
            if id(req) not in riding:
                self._cache_unfinished(req)
        return logits, sel_owner

    def _upload(self, fields: list[list[int]]) -> list[torch.Tensor]:
        """int64 device tensors of the given lists, through one host->device copy (pinned
        and asynchronous where the platform allows).  Each field starts at an even offset of
        the buffer, so 16-byte aligned (kernels specialise on pointer alignment: an odd
        offset would compile another variant of each).  XLA (lazy, nothing waits): a tensor
        per field, so each keeps its own bucketed shape and the graphs stay few."""
        if self.lazy_device:
            return [torch.tensor(f, dtype=torch.int64, device=self.device) for f in fields]
        flat, spans = [], []
        for f in fields:
            spans.append((len(flat), len(f)))
            flat.extend(f)
            if len(f) % 2:
                flat.append(0)
        buf = to_device(torch.tensor(flat, dtype=torch.int64), self.device, self.pin_memory)
        return [buf[o:o + n] for o, n in spans]

    def _pad_rows(self, rows: list) -> list:
        """rows, repeated-row padded to padding.rows(len(rows)) where batches are padded."""
        if self.padding is None:
            return rows
        return rows + [rows[0]] * (self.padding.rows(len(rows)) - len(rows))

    def _record_input_logprob(self, req: Req, lp: torch.Tensor, tok: int) -> None:
        req.input_token_logprobs.append((float(lp[tok]), tok, None))
        if req.top_logprobs_num:
            v, i = lp.topk(req.top_logprobs_num)
            req.input_top_logprobs.append([(float(a), int(b), None) for a, b in zip(v.tolist(), i.tolist())])

    # ---- decode -----------------------------------------------------------------------
    def _run_decode(self) -> list[Req]:
        retracted = self._ensure_decode_memory()
        batch = list(self.running)
        if not batch:
            return []
        logits = self._decode_forward(batch)  # asynchronous on accelerators
        masks = self._grammar_masks(batch)  # on the CPU, while the forward runs
        self.last_step.retracted = retracted
        return self._sample_and_advance(logits, batch, masks)

    def _decode_forward(self, batch: list[Req], input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decode pass: a slot per request, one host->device copy of the batch's
        metadata, then a captured graph or an eager forward.  input_ids defaults to each
        request's last sampled token (fill_ids[kv_len] == output_ids[-1])."""
        dev = self.device
        n_pad = 0 if self.padding is None else self.padding.decode(len(batch)) - len(batch)
        if input_ids is not None and input_ids.shape[0] != len(batch) + n_pad:  # before any state changes
            raise RuntimeError(f"decode ids of {input_ids.shape[0]} rows for a batch of {len(batch) + n_pad}")
        self._make_room(sum(self.allocator.pages_needed(1, r.kv_len) for r in batch) * self.page_size)
        locs = []
        for r in batch:
            r.last_slot = self.allocator.alloc_tokens(1, r.last_slot, r.kv_len)[0]
            r.slots.append(r.last_slot)
            locs.append(r.last_slot)
        positions_l, rows_l = [r.kv_len for r in batch], [r.req_pool_idx for r in batch]
        self.req_pool.write_points(rows_l, positions_l, locs)
        rows_meta = [positions_l, locs, rows_l]
        if input_ids is None:
            rows_meta.append([r.output_ids[-1] for r in batch])
        if n_pad:  # position 0, slot 0, pad row, token 0 (overlapped ids: padded on the device already)
            rows_meta = [m + [v] * n_pad for m, v in zip(rows_meta, (0, 0, self.req_pool.pad_row, 0))]
        width = len(rows_meta[0])
        if width % 2:  # rows of even length: each starts 16-byte aligned (one Triton variant)
            rows_meta = [m + [0] for m in rows_meta]
        meta = host_meta = torch.tensor(rows_meta, dtype=torch.int64)
        shared = None
        if self.cascade_attention and len(batch) > 1 and self.padding is None:
            shared = shared_prefix.build([r.slots for r in batch], rows_l)
        if shared is not None:  # one copy to the device for both
            n = meta.numel()
            both = to_device(torch.cat([meta.view(-1), shared]), dev, self.pin_memory)
            meta, shared = both[:n].view(meta.shape), shared_prefix.unpack(both[n:], len(batch))
        else:
            meta = to_device(meta, dev, self.pin_memory)
        meta, host_meta = meta[:, :width], host_meta[:, :width]
        positions, out_loc, rows = meta[0], meta[1], meta[2]
        if input_ids is None:
            input_ids = meta[3]
        self.req_pool.flush()
        fb = ForwardBatch(is_decode=True, input_ids=input_ids, positions=positions, out_cache_loc=out_loc,
                          req_pool_indices=rows, seq_lens=positions + 1, kv=self.kv,
                          req_to_token=self.req_pool.req_to_token, shared=shared,
                          seq_lens_cpu=host_meta[0] + 1)
        if shared is not None:
            self.counters.decode_shared += 1
        with self.no_grad():
            if self.decode_graph is not None and self.decode_graph.can_run(fb):
                logits = self.decode_graph.replay(fb)  # plans its own static batch
            else:
                ops.attention_prepare(fb)
                logits = self.model.compute_logits(self.model(fb))
        for r in batch:
            r.kv_len += 1
        self.counters.forward_decode += 1
        self.last_step = StepStats("decode", len(batch), len(batch))
        self._decay_new_token_ratio()
        return logits

    def _decay_new_token_ratio(self) -> None:
        """Each decode step (standalone or riding in a mixed batch) lowers the share of
        max_new_tokens reserved for running requests at admission."""
        self.new_token_ratio = max(self.cfg.min_new_token_ratio,
                                   self.new_token_ratio - self.cfg.new_token_ratio_decay)

    def _ensure_decode_memory(self) -> int:
        """Make room for one more token per running request, retracting if needed."""
        retracted = 0
        while self.running:
            need = sum(self.allocator.pages_needed(1, r.kv_len) for r in self.running) * self.page_size
            if need <= self._available():
                return retracted
            c = self.chunked
            if len(self.running) == 1 and c is not None and self.inflight is None:
                # a prompt part-way through its chunks holds the room (the running requests
                # rode along in its chunks with --enable-mixed-chunk): it goes back to the
                # queue, its prefilled part into the radix cache, to resume from there
                self.chunked = None
                self._release(c)
                c.retractions += 1
                self.waiting.insert(0, c)
                retracted += 1
                self.counters.retractions += 1
                continue
            if len(self.running) == 1:
                # One request alone cannot grow: admission guarantees this never happens
                # (prompt + max_new_tokens <= pool), so fail loudly rather than loop; the
                # caller is told (the next step reports it)
                r = self.running.pop()
                r.finished_reason = {"type": "abort", "message": "out of KV cache memory", "status_code": 500}
                self._release(r)
                self._finished_early.append(r)
                logger.error("request %s aborted: KV pool exhausted", r.rid)
                return retracted
            # retract the request with the least output (and longest prompt) first
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            self.running.remove(victim)
            self._release(victim)
            victim.retractions += 1
            self.waiting.insert(0, victim)
            retracted += 1
            self.counters.retractions += 1
            self.new_token_ratio = min(1.0, self.new_token_ratio + 0.2)
        return retracted

    # ---- overlapped decode ----------------------------------------------------------------
    # The CPU's share of a decode step (stop checks, bookkeeping, building the next batch)
    # runs while the accelerator computes: batch N+1 is launched with N's sampled tokens
    # still on the device, then N's tokens are read and processed.  A request that turns
    # out to have finished at N wastes its slot in N+1, whose result is ignored.
    # Grammar-constrained requests take part: their batch N+1 is launched with N's tokens
    # still on the device, then N's tokens are read and accepted by the matchers (and
    # jump-forward runs), then N+1's masks are filled and its sampling is queued, the CPU
    # work all done while the accelerator computes N+1's forward.
    def _overlap_safe(self, reqs) -> bool:
        return all(not r.return_logprob and not r.sampling.needs_penalties
                   and r.sampling.min_new_tokens == 0 for r in reqs)

    def _room_for_decode(self, reqs) -> bool:
        need = sum(self.allocator.pages_needed(1, r.kv_len) for r in reqs) * self.page_size
        return need <= self._available()

    def _prefill_possible(self) -> bool:
        if self.chunked is not None:
            return True
        if not self.waiting or len(self.running) >= self.cfg.max_running_requests:
            return False
        if self.req_pool.available() == 0:
            return False
        if self.cfg.schedule_policy == "lof":
            self._order_waiting()  # look at the request admission takes first (sorting is idempotent)
        first = self.waiting[0]
        return first.seq_len <= self._available() - self._reserved_for_running()

    def _launch_decode(self, batch: list[Req], input_ids: Optional[torch.Tensor] = None) -> "_Inflight":
        return self._launch_sampling(batch, self._decode_forward(batch, input_ids))

    def _launch_sampling(self, batch: list[Req], logits: torch.Tensor) -> "_Inflight":
        masks = self._grammar_masks(batch)  # on the CPU, while the forward runs
        running = {id(r) for r in self.running}
        ignored = {i for i, r in enumerate(batch) if r.finished or id(r) not in running}
        with self.no_grad():
            ids, _ = self.sampler.sample_tensor(logits, batch, self.eos_ids,
                                                self.grammar if masks is not None else None, masks,
                                                ignored)
            if ids.device.type == "cpu":  # nothing runs asynchronously: the logic only
                host, event = ids, None
            elif self.lazy_device:  # XLA: read by value at resolve time, after N+1 is launched
                if self.cut_graph is not None:
                    # run the sampling as its own graph now (asynchronously), keyed by this
                    # batch's bucket only, not folded into N+1's bookkeeping graph
                    self.cut_graph()
                host, event = ids, None
            else:
                host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=self.pin_memory)
                host.copy_(ids, non_blocking=True)
                event = torch.Event(device=ids.device)
                event.record()
        return _Inflight(batch, ids, host, event, [-1 if i in ignored else r.epoch for i, r in enumerate(batch)])

    def _step_overlapped(self) -> list[Req]:
        prev, self.inflight = self.inflight, None
        if self._prefill_possible():
            if not self.overlap_prefill or (self._mixing() and self.running):
                return self._resolve(prev)  # the prefill goes next step, after prev's tokens
            batch = self._schedule_prefill()
            if batch:
                if self._overlap_extend(batch, ()):
                    return self._launch_extend(batch, prev)
                out = self._resolve(prev)
                return out + self._run_extend(batch)
            # nothing fits yet: decode on
        running = {id(r) for r in self.running}  # not finished, aborted or re-queued since
        # requests whose token at prev is unread, by row of prev
        pending = {id(r): i for i, (r, ep) in enumerate(zip(prev.reqs, prev.epochs))
                   if ep == r.epoch and not r.finished and id(r) in running}

        def more(r):  # not certain to finish by length at prev
            k = 1 if id(r) in pending else 0
            return (len(r.output_ids) + k < r.sampling.max_new_tokens
                    and r.seq_len + k < self.cfg.context_len)

        live = [r for r in self.running if not r.finished]
        batch = [r for r in live if more(r)]
        if batch and self._overlap_safe(live) and self._room_for_decode(batch):
            ids = self._next_ids(prev, batch, pending)
            if any(r.grammar is not None for r in batch):
                # N+1's masks need N's tokens in the matchers: launch N+1's forward, read
                # and process N's tokens, then fill the masks and queue the sampling
                logits = self._decode_forward(batch, ids)
                out = self._resolve(prev)
                self.inflight = self._launch_sampling(batch, logits)
                return out
            self.inflight = self._launch_decode(batch, ids)
        return self._resolve(prev)

    def _next_ids(self, prev: "_Inflight", batch: list[Req], pending: dict) -> torch.Tensor:
        """The next decode's input ids on the device: prev's sampled ids for its requests
        (padded batches: then the padding rows), the host's last token for the others
        (running requests that prev, a prompt pass, did not hold)."""
        idx = [pending.get(id(r), -1) for r in batch]
        ids = prev.ids
        want = len(batch) if self.padding is None else self.padding.decode(len(batch))
        if -1 not in idx:
            if idx == list(range(len(prev.reqs))) and ids.shape[0] == want:
                return ids
            # the continuing requests' ids, padded (rows of request 0's id) to N+1's size
            idx = torch.tensor(idx + [idx[0]] * (want - len(idx)), dtype=torch.int64)
            return ids.index_select(0, to_device(idx, ids.device, self.pin_memory))
        assert self.padding is None, "prompt passes are not overlapped on padded batches"
        host = [r.output_ids[-1] for r, i in zip(batch, idx) if i < 0]
        extra = iter(range(ids.shape[0], ids.shape[0] + len(host)))
        idx = [i if i >= 0 else next(extra) for i in idx]
        host_d, idx_d = self._upload([host, idx])
        return torch.cat([ids, host_d.to(ids.dtype)]).index_select(0, idx_d)

    def _resolve(self, prev: "_Inflight") -> list[Req]:
        """Read a launched step's tokens (a decode step's, or a prompt pass's first ones)
        and process them."""
        if prev.event is not None:
            prev.event.synchronize()
        toks = prev.host.tolist()
        running = {id(r) for r in self.running}
        out = []
        for r, tok, ep in zip(prev.reqs, toks, prev.epochs):
            if ep != r.epoch or r.finished or id(r) not in running:  # aborted, finished or jumped forward earlier
                continue
            r.output_ids.append(tok)
            self.counters.generated_tokens += 1
            if r.grammar is None or self._advance_grammar(r, tok):
                self._check_finished(r)
            out.append(r)
        jumped = self._jump_forward_all(out)
        # a finished request's KV up to its newest token is valid (or being written by a
        # batch queued before anything that could reuse the slots)
        self._retire([r for r in out if r.finished] + jumped)
        self.waiting[:0] = jumped
        return out

    # ---- sampling and finishing ----------------------------------------------------------
    def _grammar_masks(self, batch: list[Req]):
        """Token bitmasks of the batch's live constrained requests (None if there are none);
        their matchers have accepted every token sampled so far."""
        if self.grammar is None:
            return None
        rows = [i for i, r in enumerate(batch) if r.grammar is not None and not r.finished]
        if rows:  # an overlapped batch may hold requests that jumped forward since its launch
            running = {id(r) for r in self.running}
            rows = [i for i in rows if id(batch[i]) in running]
        return self.grammar.fill_masks(len(batch), rows, [batch[i].grammar for i in rows])

    def _sample_and_advance(self, logits: torch.Tensor, reqs: list[Req], masks=None) -> list[Req]:
        next_ids, logprobs = self.sampler.sample(logits, reqs, self.eos_ids, self.grammar, masks)
        for i, (r, tok) in enumerate(zip(reqs, next_ids)):
            if r.sampling.max_new_tokens == 0:  # prompt scoring only: no output token
                r.finished_reason = {"type": "length", "length": 0}
                continue
            r.output_ids.append(tok)
            self.counters.generated_tokens += 1
            if r.return_logprob:
                lp = logprobs[i]
                r.output_token_logprobs.append((float(lp[tok]), tok, None))
                if r.top_logprobs_num:
                    v, idx = lp.topk(r.top_logprobs_num)
                    r.output_top_logprobs.append(
                        [(float(a), int(b), None) for a, b in zip(v.tolist(), idx.tolist())])
            if r.grammar is not None and not self._advance_grammar(r, tok):
                continue
            self._check_finished(r)
        jumped = self._jump_forward_all(reqs)
        self._retire([r for r in reqs if r.finished] + jumped)
        self.waiting[:0] = jumped
        running = {id(r) for r in self.running}
        self.running.extend(r for r in reqs if not r.finished and r not in jumped and id(r) not in running)
        return reqs

    def _retire(self, reqs: list[Req]) -> None:
        """Take reqs out of the running batch (one pass) and return their KV."""
        if not reqs:
            return
        gone = {id(r) for r in reqs}
        self.running = [r for r in self.running if id(r) not in gone]
        for r in reqs:
            self._release(r)

    def _jump_forward_all(self, reqs: list[Req]) -> list[Req]:
        """Jump-forward every constrained request that can.  Returns those to re-queue:
        their forced tokens need KV, so they are re-prefilled on top of the cached rest, at
        the front of the queue (a request the jump finished is not re-queued)."""
        if not self.jump_forward:
            return []
        cands = [r for r in reqs if not r.finished and r.grammar is not None and not r.return_logprob]
        if self.jump_whole_batch and cands:
            live = {id(r) for r in self.running if not r.finished}
            live.update(id(r) for r in reqs if not r.finished)
            if len(cands) < len(live) or not all(
                    r.sampling.max_new_tokens - len(r.output_ids) > 1 and r.grammar.find_jump_forward_string()
                    for r in cands):
                return []
        jumped = [r for r in cands if self._jump_forward(r)]
        return [r for r in jumped if not r.finished]  # finishing wins over re-prefill

    def _advance_grammar(self, r: Req, tok: int) -> bool:
        if not r.grammar.accept_token(tok):
            if self.grammar.allows_nothing(r.grammar):  # the constraint's fault: a 400
                kind = r.constraint()[0]
                r.finished_reason = {"type": "abort", "status_code": 400, "param": kind, "message": (
                    f"the {kind} constraint matches no complete text: after the text generated "
                    "so far it allows no continuation and no end")}
                return False
            r.finished_reason = {"type": "abort", "message": f"grammar rejected token {tok}",
                                  "status_code": 500}
            logger.error("request %s: sampled token %d rejected by its grammar", r.rid, tok)
            return False
        if r.grammar.is_terminated():
            r.finished_reason = {"type": "stop", "matched": tok}
            return False
        return True

    def _jump_forward(self, r: Req) -> bool:
        room = r.sampling.max_new_tokens - len(r.output_ids)
        if room <= 1:
            return False
        toks = self.grammar.jump_forward(r.grammar, room - 1)
        if not toks:
            return False
        for k, tok in enumerate(toks):  # the stop checks see every forced token, as if sampled
            r.output_ids.append(tok)
            self._check_finished(r)
            if r.finished:
                toks = toks[:k + 1]
                break
        r.jump_forward_tokens += len(toks)
        self.counters.jump_forward_tokens += len(toks)
        self.counters.generated_tokens += len(toks)
        if not r.finished and r.grammar.is_terminated():
            r.finished_reason = {"type": "stop", "matched": toks[-1]}
        return True

    def _stop_regex_hit(self, r: Req) -> bool:
        """A stop regex with a match the last token made (core/stop_regex.py): the request
        stops (matched: the pattern).  A search past its time limit ends it with a 400."""
        pats = r.sampling.stop_regex_strs
        window = r.output_ids[-max(stop_regex.window(p) for p in pats):]
        tail = self.decode_fn(window)
        before = common_prefix_len(self.decode_fn(window[:-1]), tail) if len(window) > 1 else 0
        for p in pats:
            try:
                hit = stop_regex.search(p, tail, before)
            except stop_regex.StopRegexTimeout:
                r.finished_reason = {"type": "abort", "status_code": 400, "param": "stop_regex", "message": (
                    f"stop_regex {p[:60]!r} took longer than {stop_regex.TIME_LIMIT_S * 1e3:.0f} ms to search "
                    "the output (a pattern that backtracks catastrophically, such as (a|aa)+)")}
                return True
            if hit:
                r.finished_reason = {"type": "stop", "matched": p}
                return True
        return False

    def _check_finished(self, r: Req) -> None:
        tok = r.output_ids[-1]
        sp = r.sampling
        if len(r.output_ids) > sp.min_new_tokens or sp.min_new_tokens == 0:
            if not sp.ignore_eos and tok in self.eos_ids:
                r.finished_reason = {"type": "stop", "matched": tok}
                return
            if sp.stop_token_ids and tok in sp.stop_token_ids:
                r.finished_reason = {"type": "stop", "matched": tok}
                return
            if sp.stop_strs and self.decode_fn is not None:
                # a stop string that this token completes: one that ended earlier was
                # seen then, or came before min_new_tokens and does not count
                # a token covers at least one byte of UTF-8 ('草莓' is 6 byte tokens of some
                # tokenizers), plus two for a character split over tokens
                longest = max(len(s.encode("utf-8")) for s in sp.stop_strs)
                window = r.output_ids[-(longest + 2):]
                tail = self.decode_fn(window)
                hits = [s for s in sp.stop_strs if s in tail]
                if hits:
                    # the text before this token: the part both decodes share (without the
                    # token, a character it completes decodes as U+FFFD)
                    before = common_prefix_len(self.decode_fn(window[:-1]), tail) if len(window) > 1 else 0
                    for s in hits:
                        if tail.find(s, max(0, before - len(s) + 1)) >= 0:
                            r.finished_reason = {"type": "stop", "matched": s}
                            return
            if sp.stop_regex_strs and self.decode_fn is not None and self._stop_regex_hit(r):
                return
        if len(r.output_ids) >= sp.max_new_tokens:
            r.finished_reason = {"type": "length", "length": sp.max_new_tokens}
        elif len(r.input_ids) + len(r.output_ids) >= self.cfg.context_len:
            r.finished_reason = {"type": "length", "length": len(r.output_ids)}
