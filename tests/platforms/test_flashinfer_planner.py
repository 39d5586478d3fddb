"""The FlashInfer provider's planning (platforms/cuda/flashinfer_ops.py) on the CPU, against
the native ops.  The real kernels need a GPU (tests/gpu/test_flashinfer.py); here a stand-in
``flashinfer`` implements the two wrappers' documented contract by brute force: page lists
(indptr, indices, last_page_len), qo_indptr, causal bottom-right alignment, GQA head groups,
and graph mode's fixed buffers (plan copies into them, run reads only them).  It checks the
adapter's plans and where it finds them, not FlashInfer's numerics."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from portaserve.core import ops
from portaserve.core.forward_batch import ForwardBatch
from portaserve.core.ops import native
from portaserve.platforms.cuda import flashinfer_ops as fo

PLANS: list = []  # (kind, wrapper) per plan() call


def _attend(q, k, v, scale, offset=None):
    """q [Tq, H, D] over k, v [L, Hk, D]; offset: query 0's position among the keys."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if offset is not None:
        s = s.masked_fill(torch.arange(k.shape[0])[None, :] > torch.arange(q.shape[0])[:, None] + offset, -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def _check_run(meta, q, paged_kv):
    k, v = paged_kv
    heads, kv_heads, head_dim, q_dt, kv_dt, _ = meta
    assert k.dim() == 4 and k.shape[1] == 1 and k.shape[2] == kv_heads and k.shape[3] == head_dim
    assert q.shape[1:] == (heads, head_dim) and q.dtype == q_dt and k.dtype == kv_dt == v.dtype
    return k[:, 0], v[:, 0]


class _Decode:
    def __init__(self, workspace, kv_layout, use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):
        assert kv_layout == "NHD"
        self.graph, self.tensor_cores = use_cuda_graph, use_tensor_cores
        self.bufs = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             q_data_type, kv_data_type, sm_scale):
        PLANS.append(("decode", self))
        bs = indptr.numel() - 1
        assert page_size == 1 and last_page_len.tolist() == [1] * bs and int(indptr[-1]) == indices.numel()
        self.meta = (num_qo_heads, num_kv_heads, head_dim, q_data_type, kv_data_type, sm_scale)
        if self.graph:  # as FlashInfer does: fixed batch size, copy into the captured buffers
            ip, ix, lp = self.bufs
            if bs != lp.numel() or indices.numel() > ix.numel():
                raise ValueError("batch size / indices do not fit the graph buffers")
            ip.copy_(indptr), lp.copy_(last_page_len), ix[:indices.numel()].copy_(indices)
        else:
            self.lists = (indptr.clone(), indices.clone())

    def run(self, q, paged_kv):
        k, v = _check_run(self.meta, q, paged_kv)
        indptr, indices = self.bufs[:2] if self.graph else self.lists
        assert q.shape[0] == indptr.numel() - 1
        out = [_attend(q[i:i + 1], k[p], v[p], self.meta[-1])
               for i in range(q.shape[0]) for p in [indices[int(indptr[i]):int(indptr[i + 1])].long()]]
        return torch.cat(out).to(q.dtype)


class _Prefill:
    def __init__(self, workspace, kv_layout):
        assert kv_layout == "NHD"

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, causal=False, sm_scale=None, q_data_type=None,
             kv_data_type=None):
        PLANS.append(("extend", self))
        bs = qo_indptr.numel() - 1
        assert page_size == 1 and paged_kv_indptr.numel() == bs + 1 and paged_kv_last_page_len.tolist() == [1] * bs
        assert int(paged_kv_indptr[-1]) == paged_kv_indices.numel()
        self.meta = (num_qo_heads, num_kv_heads, head_dim_qk, q_data_type, kv_data_type, sm_scale)
        self.lists = (qo_indptr.clone(), paged_kv_indptr.clone(), paged_kv_indices.clone(), causal)
        # as FlashInfer 0.6 does (its kv-lens buffer): a buffer made at the first plan and
        # updated in place by later ones
        if getattr(self, "kv_lens", None) is None or self.kv_lens.numel() < bs:
            self.kv_lens = torch.empty(max(bs, 64), dtype=torch.int32)
        self.kv_lens[:bs].copy_(paged_kv_indptr.diff())

    def run(self, q, paged_kv):
        k, v = _check_run(self.meta, q, paged_kv)
        qo, kvp, idx, causal = self.lists
        assert q.shape[0] == int(qo[-1])
        out = []
        for i in range(qo.numel() - 1):
            qi, p = q[int(qo[i]):int(qo[i + 1])], idx[int(kvp[i]):int(kvp[i + 1])].long()
            assert qi.shape[0] <= p.numel()
            out.append(_attend(qi, k[p], v[p], self.meta[-1], p.numel() - qi.shape[0] if causal else None))
        return torch.cat(out).to(q.dtype)


@pytest.fixture(autouse=True)
def _fake_flashinfer(monkeypatch):
    fake = types.ModuleType("flashinfer")
    fake.BatchDecodeWithPagedKVCacheWrapper, fake.BatchPrefillWithPagedKVCacheWrapper = _Decode, _Prefill
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(fo, "_WORKSPACE_BYTES", 1 << 12)
    # no op table in use (an engine test earlier in the process may have set the CPU's,
    # which routes no attention op to FlashInfer): the provider plans decode and extend
    monkeypatch.setattr(ops, "_table", None)
    PLANS.clear()
    fo._STATES.clear()
    yield
    fo._STATES.clear()


def _pool(seed, dtype, Hk, D, S=2048, rows=8, width=96):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(S, Hk, D, generator=g).to(dtype) for _ in range(2))
    r2t = torch.randperm(S - 1, generator=g)[:rows * width].add(1).view(rows, width).to(torch.int32)
    return g, k, v, r2t


def _close(got, ref):
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def _differs(got, ref):
    assert (got.float() - ref.float()).abs().max() > 0.1


def _fb(rpi, seq, r2t, ext=None, tail=0, host=None):
    host = seq.to(torch.int32) if host is None else host
    return ForwardBatch(is_decode=ext is None, input_ids=None, positions=None, out_cache_loc=None,
                        req_pool_indices=rpi, seq_lens=seq, kv=None, req_to_token=r2t,
                        prefix_lens=None if ext is None else seq - ext, extend_lens=ext, decode_tail=tail,
                        seq_lens_cpu=host, extend_lens_cpu=None if ext is None else ext.to(torch.int32))


def test_unsupported_reason():
    bf, hd = torch.bfloat16, {"head_dim": 128}
    assert fo.unsupported_reason({"dtype": bf, "kv_dtype": bf, **hd}) is None
    assert "float32" in fo.unsupported_reason({"dtype": torch.float32, "kv_dtype": torch.float32, **hd})
    assert "differs" in fo.unsupported_reason({"dtype": bf, "kv_dtype": torch.float8_e4m3fn, **hd})
    assert "96" in fo.unsupported_reason({"dtype": torch.float16, "kv_dtype": torch.float16, "head_dim": 96})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hk,D", [(8, 2, 64), (4, 4, 128), (8, 1, 256)])
def test_unprepared_calls_plan_themselves(dtype, H, Hk, D):
    g, k, v, r2t = _pool(1, dtype, Hk, D)
    rpi, scale = torch.tensor([5, 0, 3, 7, 2]), D ** -0.5
    seq = torch.tensor([1, 96, 40, 7, 63])
    q = torch.randn(5, H, D, generator=g).to(dtype)
    _close(fo.attention_decode(q, k, v, r2t, rpi, seq, scale), native.attention_decode(q, k, v, r2t, rpi, seq, scale))
    assert [kind for kind, _ in PLANS] == ["decode"] and PLANS[0][1].tensor_cores == (H // Hk >= 4)
    ext = torch.tensor([1, 96, 13, 1, 30])  # one token, no prefix, both, ...
    q = torch.randn(int(ext.sum()), H, D, generator=g).to(dtype)
    args = (q, k, v, r2t, rpi, seq - ext, ext, scale)
    _close(fo.attention_extend(*args), native.attention_extend(*args))
    assert [kind for kind, _ in PLANS] == ["decode", "extend"]


def test_prepared_decode_is_reused_and_goes_stale_until_prepared_again():
    g, k, v, r2t = _pool(2, torch.bfloat16, 2, 64)
    rpi, seq = torch.tensor([6, 1, 4]), torch.tensor([50, 9, 70])
    q = torch.randn(3, 8, 64, generator=g).to(torch.bfloat16)
    fo.attention_prepare(_fb(rpi, seq, r2t))  # shape not known yet: planned at the first layer
    assert PLANS == []
    for _ in range(3):  # three layers, one plan
        _close(fo.attention_decode(q, k, v, r2t, rpi, seq, 0.125),
               native.attention_decode(q, k, v, r2t, rpi, seq, 0.125))
    assert len(PLANS) == 1
    seq.add_(5)  # rewritten in place and not prepared again: the old plan is found (and wrong)
    _differs(fo.attention_decode(q, k, v, r2t, rpi, seq, 0.125), native.attention_decode(q, k, v, r2t, rpi, seq, 0.125))
    fo.attention_prepare(_fb(rpi, seq, r2t))  # shape known: plans here
    assert len(PLANS) == 2
    _close(fo.attention_decode(q, k, v, r2t, rpi, seq, 0.125), native.attention_decode(q, k, v, r2t, rpi, seq, 0.125))
    # host lengths that disagree with the batch (same total) plan the wrong page boundaries
    fo.attention_prepare(_fb(rpi, seq, r2t, host=torch.tensor([65, 4, 75], dtype=torch.int32)))
    _differs(fo.attention_decode(q, k, v, r2t, rpi, seq, 0.125), native.attention_decode(q, k, v, r2t, rpi, seq, 0.125))


def test_mixed_batch_head_and_tail_views_find_their_plans():
    g, k, v, r2t = _pool(3, torch.float16, 2, 128)
    rpi = torch.tensor([4, 1, 6, 0, 2])
    ext = torch.tensor([30, 45, 1, 1, 1])  # two prompt chunks, then three decode riders
    seq = torch.tensor([0, 40, 37, 90, 11]) + ext
    n, scale = 3, 128 ** -0.5
    fb = _fb(rpi, seq, r2t, ext=ext, tail=n)
    q = torch.randn(int(ext.sum()), 8, 128, generator=g).to(torch.float16)
    t = int(ext[:-n].sum())
    ref_head = native.attention_extend(q[:t], k, v, r2t, rpi[:-n], fb.prefix_lens[:-n], ext[:-n], scale)
    ref_tail = native.attention_decode(q[t:], k, v, r2t, rpi[-n:], seq[-n:], scale)
    for forward in range(2):  # the first plans at its first layer (pending), the second in prepare
        fo.attention_prepare(fb)
        assert len(PLANS) == (0, 4)[forward]  # (pending, planned now)
        for _ in range(3):  # layers: views made afresh each time, as models/layers.py does
            head = fo.attention_extend(q[:t], k, v, r2t, fb.req_pool_indices[:-n], fb.prefix_lens[:-n],
                                       fb.extend_lens[:-n], scale)
            tail = fo.attention_decode(q[t:], k, v, r2t, fb.req_pool_indices[-n:], fb.seq_lens[-n:], scale)
            _close(head, ref_head)
            _close(tail, ref_tail)
        assert [kind for kind, _ in PLANS] == ["extend", "decode"] * (forward + 1)  # none per layer
    # the whole batch as one extend is not the head's plan: planned by itself, still right
    args = (q, k, v, r2t, rpi, fb.prefix_lens, ext, scale)
    _close(fo.attention_extend(*args), native.attention_extend(*args))
    assert len(PLANS) == 5


def test_graph_mode_replans_into_the_fixed_buffers():
    g, k, v, r2t = _pool(4, torch.bfloat16, 2, 64, rows=12)
    static_rpi, static_seq = torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.int64)
    q, scale = torch.zeros(8, 8, 64, dtype=torch.bfloat16), 0.125
    captured = {}
    for bs in (8, 3):  # largest first, as the graph runner captures; 3 shares 8's buffers
        rpi, seq = static_rpi[:bs], static_seq[:bs]
        fo.attention_prepare(_fb(rpi, seq, r2t), graph=True)
        fo.attention_decode(q[:bs], k, v, r2t, rpi, seq, scale)  # warm-up/capture: finds the graph plan
        captured[bs] = PLANS[-1][1]
        assert captured[bs].graph
    assert len(PLANS) == 2 and captured[3].bufs[1].data_ptr() == captured[8].bufs[1].data_ptr()
    for trial, bs in enumerate((3, 8, 8, 3)):  # "replay": run the captured wrapper, no lookup
        rpi, seq = static_rpi[:bs], static_seq[:bs]
        rpi.copy_(torch.randperm(12, generator=g)[:bs])
        seq.copy_(torch.randint(1, 97, (bs,), generator=g))
        q[:bs].copy_(torch.randn(bs, 8, 64, generator=g).to(torch.bfloat16))
        ref = native.attention_decode(q[:bs], k, v, r2t, rpi, seq, scale)
        paged = (fo._paged(k), fo._paged(v))
        if trial == 0:  # not re-planned: the buffers still hold the last plan
            _differs(captured[bs].run(q[:bs], paged), ref)
        fo.attention_prepare(_fb(rpi, seq, r2t), graph=True)
        _close(captured[bs].run(q[:bs], paged), ref)
    assert len(PLANS) == 6 and all(w is captured[bs] for (_, w), bs in zip(PLANS[2:], (3, 8, 8, 3)))
    assert set(fo._state(r2t)._graph) == {3, 8}


def test_unprepared_extend_with_new_prefix_lens_plans_again():
    g, k, v, r2t = _pool(5, torch.bfloat16, 2, 64)
    rpi, ext = torch.tensor([2, 5]), torch.tensor([8, 4])
    q = torch.randn(12, 8, 64, generator=g).to(torch.bfloat16)
    for prefix in (torch.tensor([0, 10]), torch.tensor([40, 3])):
        args = (q, k, v, r2t, rpi, prefix, ext, 0.125)
        _close(fo.attention_extend(*args), native.attention_extend(*args))


def test_plans_made_under_inference_mode_can_be_replanned_outside_it():
    """The engine's first forward may run under torch.inference_mode (graph capture) and
    later plans outside it: a buffer FlashInfer made at the first plan is then an
    inference tensor, which an in-place update outside inference mode rejects (this
    killed the scheduler on the H200 before the provider planned under inference mode)."""
    g, k, v, r2t = _pool(6, torch.bfloat16, 2, 64)
    rpi, ext = torch.tensor([1, 4]), torch.tensor([5, 9])
    for prefix in (torch.tensor([0, 3]), torch.tensor([7, 0])):
        q = torch.randn(int(ext.sum()), 8, 64, generator=g).to(torch.bfloat16)
        args = (q, k, v, r2t, rpi, prefix, ext, 0.125)
        with torch.inference_mode(prefix[0].item() == 0):
            got = fo.attention_extend(*args)
        torch.testing.assert_close(got.float(), native.attention_extend(*args).float(), atol=2e-2, rtol=2e-2)


def test_state_is_per_request_table_and_keeps_no_pool_alive():
    """Each engine (request table) has its own wrappers and plans, freed with the table;
    a batch prepared before the layers' shape is known does not keep the KV pool alive."""
    import gc
    import weakref

    class Pool:  # stands for the KV pool a ForwardBatch carries
        pass

    g, k, v, r2t = _pool(7, torch.bfloat16, 2, 64)
    pool = Pool()
    rpi, seq = torch.tensor([0, 3]), torch.tensor([5, 40])
    fb = ForwardBatch(is_decode=True, input_ids=None, positions=None, out_cache_loc=None, req_pool_indices=rpi,
                      seq_lens=seq, kv=pool, req_to_token=r2t, seq_lens_cpu=seq.to(torch.int32))
    fo.attention_prepare(fb)  # shape unknown yet: pending
    alive = weakref.ref(pool)
    del fb, pool
    gc.collect()
    assert alive() is None, "the pending batch kept the KV pool alive"
    other = r2t.clone()
    assert fo._state(other) is not fo._state(r2t)
    q = torch.randn(2, 8, 64, generator=g).to(torch.bfloat16)
    _close(fo.attention_decode(q, k, v, r2t, rpi, seq, 0.125), native.attention_decode(q, k, v, r2t, rpi, seq, 0.125))
    n = len(fo._STATES)
    del other
    gc.collect()
    assert len(fo._STATES) == n - 1
