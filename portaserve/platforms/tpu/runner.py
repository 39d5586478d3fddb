"""Forward passes on XLA with static shapes, so XLA compiles a bounded set of graphs.

**Decode** batches are padded up to a bucket of a fixed ladder of batch sizes (the CUDA
graph runner's ladder): one graph per bucket.  Padded entries read and write only the
padding slot 0 through the request table's pad row, and their logits are dropped.

**Extend** (prefill) batches are padded the same way: the number of tokens up to a power
of two (at least ``MIN_EXTEND_TOKENS``) and the number of requests to one fixed size
(every request row plus one padding request), so extend graphs number at most
log2(largest batch) + 1.  The padding tokens form padding requests on the pad row, each
at most a row long (input id 0, position 0, K/V written to the padding slot 0, attending
only to slot 0); the other padding requests have no tokens.  The scheduler pads its
batches this way on the host (Scheduler.padding, HostPadding below), so the hook's own
padding only serves batches built elsewhere.  No real request's keys, queries or outputs change.
The scheduler calls the model directly for extend batches, so the padding is installed
as a forward pre-hook on the model (and the graph cut as a forward hook); the returned
hidden states keep the padded rows (rows >= the real token count are padding; callers
select rows by index) so that selecting the sampled rows does not depend on the real
token count either.

**Graph cuts.**  torch_xla runs a graph only when a value is read; reading the sampled
ids would run forward + sampling as one graph keyed by every unpadded shape around it,
and the in-place KV writes would stay pending and grow step after step (each step
recompiling a larger graph).  So each forward is cut out with ``torch_xla.sync()`` on
both sides: before it, the scheduler's own small writes (request-table updates, the
batch's metadata) run as a bookkeeping graph; after it, the padded forward (and KV
writes) run as a graph whose shapes are only the buckets.  ``forward_compiles`` counts
the compilations of those forward graphs: one per bucket, plus one for the engine's very
first forward (the loader leaves the embedding weight a view, which XLA reads through an
``as_strided`` in that graph only and materialises by its end).
"""
from __future__ import annotations

import bisect

import torch

from portaserve.core.forward_batch import ForwardBatch
from portaserve.platforms.cuda.graph_runner import batch_size_ladder

MIN_EXTEND_TOKENS = 16


def pad_to_bucket(n: int, buckets: list[int]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def token_bucket(n: int) -> int:
    return max(MIN_EXTEND_TOKENS, 1 << max(n - 1, 0).bit_length())


def compile_count() -> int:
    import torch_xla.debug.metrics as met

    d = met.metric_data("CompileTime")
    return int(d[0]) if d else 0


def sync() -> None:
    import torch_xla

    torch_xla.sync()


def _pad(t: torch.Tensor, n: int, value) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t, torch.full((n,), value, dtype=t.dtype, device=t.device)])


class XlaExtendPadder:
    """Pads extend batches (see the module doc); installed on the model as hooks."""

    def __init__(self, model, req_pool):
        self.pad_row = req_pool.pad_row
        self.num_reqs = req_pool.size + 1  # every request row + one padding request
        self.buckets_used: set[tuple[int, int]] = set()  # (tokens, requests)
        self.forward_compiles = 0
        self.compiled: list[tuple] = []  # (bucket, real tokens, real requests) per new graph
        self._active = None
        for h in getattr(model, "_portaserve_xla_hooks", ()):  # a runner built again
            h.remove()
        model._portaserve_xla_hooks = (model.register_forward_pre_hook(self._before),
                                       model.register_forward_hook(self._after))

    def padded(self, fb: ForwardBatch) -> ForwardBatch:
        T, B = int(fb.input_ids.shape[0]), fb.batch_size
        if B == self.num_reqs and T == token_bucket(T):  # padded by the scheduler already
            return fb
        if B >= self.num_reqs:
            raise ValueError(f"{B} requests exceed the request table ({self.num_reqs - 1})")
        nt, nb = token_bucket(T) - T, self.num_reqs - B
        dev = fb.input_ids.device
        width = fb.req_to_token.shape[1]
        if nt > nb * width:
            raise ValueError(f"{nt} padding tokens need more than {nb} padding requests")
        # the padding tokens in the padding requests, each at most a request-table row
        ext = torch.tensor([min(width, max(nt - j * width, 0)) for j in range(nb)], dtype=fb.extend_lens.dtype)
        ext = ext.to(dev)
        zeros = torch.zeros(nb, dtype=fb.prefix_lens.dtype, device=dev)
        return ForwardBatch(
            is_decode=False, input_ids=_pad(fb.input_ids, nt, 0), positions=_pad(fb.positions, nt, 0),
            out_cache_loc=_pad(fb.out_cache_loc, nt, 0),
            req_pool_indices=_pad(fb.req_pool_indices, nb, self.pad_row),
            seq_lens=torch.cat([fb.seq_lens, ext.to(fb.seq_lens.dtype)]), kv=fb.kv,
            req_to_token=fb.req_to_token, prefix_lens=torch.cat([fb.prefix_lens, zeros]),
            extend_lens=torch.cat([fb.extend_lens, ext]))

    def _before(self, module, args):
        fb = args[0] if args else None
        if not isinstance(fb, ForwardBatch) or fb.is_decode or fb.input_ids.device.type != "xla":
            return None
        pfb = self.padded(fb)
        bucket = (int(pfb.input_ids.shape[0]), pfb.batch_size)
        self.buckets_used.add(bucket)
        sync()  # the bookkeeping graph (scheduler writes, padding) apart from the forward
        self._active = (bucket, int(fb.input_ids.shape[0]), fb.batch_size)
        return (pfb,) + tuple(args[1:])

    def _after(self, module, args, output):
        if self._active:
            c = compile_count()
            sync()  # the forward graph: padded shapes only
            n = compile_count() - c
            if n:
                self.forward_compiles += n
                self.compiled.append(self._active)
            self._active = None
        return None  # the padded hidden states, as computed


class HostPadding:
    """The scheduler's batch sizes padded on the host (Scheduler.padding), so the small
    bookkeeping and sampling graphs around each forward see bucket shapes only."""

    def __init__(self, decode_sizes: list[int], num_reqs: int):
        self.decode_sizes = decode_sizes
        self.num_reqs = num_reqs

    def decode(self, b: int) -> int:
        return pad_to_bucket(b, self.decode_sizes) if b <= self.decode_sizes[-1] else b

    def extend(self, tokens: int, reqs: int) -> tuple[int, int]:
        return token_bucket(tokens), self.num_reqs

    def rows(self, n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()


class XlaDecodeRunner:
    cut = staticmethod(sync)  # the scheduler's graph cut after sampling (overlap scheduler)

    def __init__(self, model, kv, req_pool, max_bs: int, device):
        self.model = model
        self.kv = kv
        self.req_to_token = req_pool.req_to_token
        self.pad_row = req_pool.pad_row
        self.device = device
        self.sizes = batch_size_ladder(max_bs)
        self.max_bs = self.sizes[-1]
        self.buckets_used: set[int] = set()
        self.forward_compiles = 0
        self.extend = XlaExtendPadder(model, req_pool)
        # the scheduler's request-table writes go out as one scatter padded to a bucket
        req_pool.write_bucket = token_bucket
        self.padding = HostPadding(self.sizes, self.extend.num_reqs)

    @property
    def extend_buckets_used(self):
        return self.extend.buckets_used

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.batch_size <= self.max_bs

    def padded(self, fb: ForwardBatch) -> ForwardBatch:
        b = fb.batch_size
        n = pad_to_bucket(b, self.sizes) - b
        if n == 0:
            return fb
        return ForwardBatch(is_decode=True, input_ids=_pad(fb.input_ids, n, 0),
                            positions=_pad(fb.positions, n, 0), out_cache_loc=_pad(fb.out_cache_loc, n, 0),
                            req_pool_indices=_pad(fb.req_pool_indices, n, self.pad_row),
                            seq_lens=_pad(fb.seq_lens, n, 1), kv=fb.kv, req_to_token=fb.req_to_token)

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        b = fb.batch_size
        pfb = self.padded(fb)
        self.buckets_used.add(pfb.batch_size)
        sync()  # bookkeeping graph
        logits = self.model.compute_logits(self.model(pfb))
        c = compile_count()
        sync()  # forward graph: one per bucket
        self.forward_compiles += compile_count() - c
        return logits[:b]
