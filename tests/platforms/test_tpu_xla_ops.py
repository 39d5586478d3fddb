"""The TPU platform's attention and batch padding against the native oracle.

The gather path (what runs on XLA without a TPU) is plain torch, so these run on the CPU
in the main environment too; the Pallas path's inputs (interleaved pages, padded
ragged metadata) are checked through torch_xla's reference ragged attention where
torch_xla is installed."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from portaserve.core.forward_batch import ForwardBatch
from portaserve.core.ops import native
from portaserve.platforms.tpu import runner, xla_ops

S, W, Hk, H, D = 300, 40, 2, 4, 16


class _Pool:
    def __init__(self, size):
        self.size = size
        self.pad_row = size
        self.req_to_token = torch.zeros(size + 1, W, dtype=torch.int32)


def _setup(seed, lens):
    """A pool with random K/V (slot 0 = padding, zeroed), requests with random slots."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(S, Hk, D, generator=g)
    v = torch.randn(S, Hk, D, generator=g)
    k[0] = v[0] = 0
    pool = _Pool(6)
    perm = torch.randperm(S - 1, generator=g) + 1
    rows = torch.tensor([4, 1, 5, 0][:len(lens)])
    used = 0
    for r, n in zip(rows.tolist(), lens):
        pool.req_to_token[r, :n] = perm[used:used + n].to(torch.int32)
        pool.req_to_token[r, n:] = perm[used + n:used + n + W - n].to(torch.int32)  # stale slots
        used += W
    return g, k, v, pool, rows


def test_gather_decode_matches_native_and_ignores_padding():
    lens = [7, 1, 33, 40]
    g, k, v, pool, rows = _setup(0, lens)
    q = torch.randn(len(lens), H, D, generator=g)
    seq = torch.tensor(lens)
    want = native.attention_decode(q, k, v, pool.req_to_token, rows, seq, 0.25)
    got = xla_ops.attention_decode(q, k, v, pool.req_to_token, rows, seq, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # padded entries (pad row, seq_len 1) leave the real rows unchanged and stay finite
    qp = torch.cat([q, torch.randn(3, H, D, generator=g)])
    rp = torch.cat([rows, torch.full((3,), pool.pad_row)])
    sp = torch.cat([seq, torch.ones(3, dtype=seq.dtype)])
    got_p = xla_ops.attention_decode(qp, k, v, pool.req_to_token, rp, sp, 0.25)
    torch.testing.assert_close(got_p[:len(lens)], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got_p).all()


def _extend_batch(seed):
    prefix, ext = [0, 5, 12], [9, 1, 20]
    g, k, v, pool, rows = _setup(seed, [p + e for p, e in zip(prefix, ext)])
    T = sum(ext)
    fb = ForwardBatch(is_decode=False, input_ids=torch.randint(0, 50, (T,), generator=g),
                      positions=torch.cat([torch.arange(p, p + e) for p, e in zip(prefix, ext)]),
                      out_cache_loc=torch.zeros(T, dtype=torch.int64), req_pool_indices=rows,
                      seq_lens=torch.tensor([p + e for p, e in zip(prefix, ext)]), kv=None,
                      req_to_token=pool.req_to_token, prefix_lens=torch.tensor(prefix),
                      extend_lens=torch.tensor(ext))
    q = torch.randn(T, H, D, generator=g)
    return g, k, v, pool, fb, q


def _padded(pool, fb):
    padder = runner.XlaExtendPadder.__new__(runner.XlaExtendPadder)
    padder.pad_row, padder.num_reqs = pool.pad_row, pool.size + 1
    return padder.padded(fb)


def test_extend_padding_shapes():
    _, _, _, pool, fb, _ = _extend_batch(1)
    p = _padded(pool, fb)
    T = fb.input_ids.shape[0]
    assert p.input_ids.shape[0] == runner.token_bucket(T) == 32 and p.batch_size == pool.size + 1
    assert int(p.extend_lens.sum()) == 32 and p.extend_lens[3] == 32 - T and (p.extend_lens[4:] == 0).all()
    assert (p.out_cache_loc[T:] == 0).all() and (p.req_pool_indices[3:] == pool.pad_row).all()
    assert [runner.token_bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def test_gather_extend_matches_native_with_and_without_padding():
    g, k, v, pool, fb, q = _extend_batch(2)
    args = (pool.req_to_token, fb.req_pool_indices, fb.prefix_lens, fb.extend_lens, 0.3)
    want = native.attention_extend(q, k, v, *args)
    got = xla_ops.attention_extend(q, k, v, *args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    p = _padded(pool, fb)
    T = q.shape[0]
    qp = torch.cat([q, torch.randn(p.input_ids.shape[0] - T, H, D, generator=g)])
    got_p = xla_ops.attention_extend(qp, k, v, pool.req_to_token, p.req_pool_indices, p.prefix_lens,
                                     p.extend_lens, 0.3)
    torch.testing.assert_close(got_p[:T], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got_p).all()


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch_xla")
def test_pallas_inputs_through_torch_xla_reference():
    """What the TPU path hands ragged_paged_attention (interleaved pages, padded ragged
    metadata with num_seqs counting the real requests) — run through torch_xla's own
    reference implementation (use_kernel=False) instead of the Pallas kernel."""
    g, k, v, pool, fb, q = _extend_batch(3)
    args = (pool.req_to_token, fb.req_pool_indices, fb.prefix_lens, fb.extend_lens, 0.3)
    want = native.attention_extend(q, k, v, *args)
    p = _padded(pool, fb)
    T = q.shape[0]
    qp = torch.cat([q, torch.zeros(p.input_ids.shape[0] - T, H, D)])
    got = xla_ops.ragged(qp, k, v, pool.req_to_token[p.req_pool_indices], p.prefix_lens + p.extend_lens,
                         p.extend_lens, 0.3, use_kernel=False)
    torch.testing.assert_close(got[:T], want, rtol=1e-4, atol=1e-4)
