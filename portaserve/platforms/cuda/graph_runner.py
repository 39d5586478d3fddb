"""CUDA graphs for decode batches (also used by ROCm through HIP graphs).

One graph per batch size of a ladder up to max_bs, all sharing a memory pool.  A decode
batch of size b runs the smallest captured size >= b, padded: padded entries read and write
only the padding slot 0 through the pool's pad row, and their logits are dropped.
Everything a captured forward reads lives in static buffers that replay() refills.
Attention providers that plan on the host (FlashInfer) plan into fixed buffers of their
own: ops.attention_prepare(graph=True) before capture and before each replay.

With cascade attention (core/shared_prefix.py) each batch size >= 2 has a second graph,
captured with the tiles in static buffers too, as many as a batch can have (bs // 2);
unused tiles have length 0 and their programs exit at once.  A step with nothing shared
replays the plain graph, which does not pay for the tiles (+4.8% per step at batch 128
when one graph served both, H200).
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from portaserve.core import ops, shared_prefix
from portaserve.core.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def batch_size_ladder(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32] + list(range(48, 257, 16)) + list(range(288, 1025, 32))
    out = [s for s in sizes if s <= max_bs]
    if not out or out[-1] != max_bs:
        out.append(max_bs)
    return out


class CudaGraphRunner:
    def __init__(self, model, kv, req_pool, max_bs: int, device, compiled=None, cascade: bool = False):
        self.model = model
        self.compiled = compiled  # a CompiledDecode (--enable-torch-compile) or None
        self.kv = kv
        self.req_to_token = req_pool.req_to_token
        self.pad_row = req_pool.pad_row
        self.device = device
        self.sizes = batch_size_ladder(max_bs)
        self.max_bs = self.sizes[-1]
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.full((n,), self.pad_row, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.shared = cascade
        if cascade:
            nt = max(1, n // 2)
            self.kv_start = torch.zeros(n, dtype=torch.int64, device=device)
            self.tile_rows = torch.zeros(nt, dtype=torch.int64, device=device)
            self.tile_lens = torch.zeros(nt, dtype=torch.int64, device=device)
            self.tile_members = torch.full((nt, shared_prefix.TILE), -1, dtype=torch.int64, device=device)
        # (batch size, with cascade tiles) -> graph and its logits
        self.plans = True  # set by capture()
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple, torch.Tensor] = {}

    def _fb(self, bs: int, cascade: bool, seq_lens_cpu=None) -> ForwardBatch:
        shared = None
        if cascade:
            nt = bs // 2
            shared = shared_prefix.SharedPrefix(self.kv_start[:bs], self.tile_rows[:nt], self.tile_lens[:nt],
                                                self.tile_members[:nt])
        return ForwardBatch(is_decode=True, input_ids=self.input_ids[:bs], positions=self.positions[:bs],
                            out_cache_loc=self.out_cache_loc[:bs], req_pool_indices=self.req_pool_indices[:bs],
                            seq_lens=self.seq_lens[:bs], kv=self.kv, req_to_token=self.req_to_token,
                            shared=shared, seq_lens_cpu=seq_lens_cpu)

    def _fill_tiles(self, sp: shared_prefix.SharedPrefix, b: int, bs: int) -> None:
        k = sp.tile_rows.shape[0]
        self.kv_start[:b].copy_(sp.kv_start, non_blocking=True)
        self.kv_start[b:bs].zero_()
        self.tile_rows[:k].copy_(sp.tile_rows, non_blocking=True)
        self.tile_lens[:k].copy_(sp.tile_lens, non_blocking=True)
        self.tile_lens[k:bs // 2].zero_()
        self.tile_members[:k].copy_(sp.tile_members, non_blocking=True)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        table = ops.current_table()
        # does the attention plan on the host (FlashInfer)? then replays re-plan first
        self.plans = table is None or table.choices["attention_prepare"].provider != "native"
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        variants = [(bs, c) for bs in reversed(self.sizes)  # largest first: later graphs reuse its memory
                    for c in ((False, True) if self.shared and bs > 1 else (False,))]
        for key in variants:
            fb = self._fb(*key, seq_lens_cpu=torch.ones(key[0], dtype=torch.int32))
            if not key[1]:  # host-planned attention (FlashInfer) plans into fixed buffers
                ops.attention_prepare(fb, graph=True)
            if self.compiled is not None and self.compiled.can_run(fb):
                forward = self.compiled.fn
            else:
                def forward(fb):
                    return self.model.compute_logits(self.model(fb))
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (compiling, autotuning, lazy init) outside the graph
                    forward(fb)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                out = forward(fb)
            self.graphs[key] = g
            self.outputs[key] = out
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s%s in %.1f s", self.sizes,
                    " (each >= 2 also with cascade attention)" if self.shared else "", time.perf_counter() - t0)

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.batch_size <= self.max_bs

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        b = fb.batch_size
        bs = self.sizes[bisect.bisect_left(self.sizes, b)]
        if bs > b:  # reset the padded tail to harmless values
            self.input_ids[b:bs].zero_()
            self.positions[b:bs].zero_()
            self.out_cache_loc[b:bs].zero_()
            self.req_pool_indices[b:bs].fill_(self.pad_row)
            self.seq_lens[b:bs].fill_(1)
        self.input_ids[:b].copy_(fb.input_ids, non_blocking=True)
        self.positions[:b].copy_(fb.positions, non_blocking=True)
        self.out_cache_loc[:b].copy_(fb.out_cache_loc, non_blocking=True)
        self.req_pool_indices[:b].copy_(fb.req_pool_indices, non_blocking=True)
        self.seq_lens[:b].copy_(fb.seq_lens, non_blocking=True)
        key = (bs, self.shared and fb.shared is not None)
        if key[1]:
            self._fill_tiles(fb.shared, b, bs)
        elif self.plans:  # re-plan host-planned attention for this batch, into the captured buffers
            host = fb.seq_lens_cpu
            if host is not None and bs > b:
                host = torch.cat([host, torch.ones(bs - b, dtype=host.dtype)])
            ops.attention_prepare(self._fb(bs, False, host), graph=True)
        self.graphs[key].replay()
        return self.outputs[key][:b]
