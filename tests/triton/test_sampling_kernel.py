"""The Triton top-k/top-p/min-p sampler (no sort) against the native op, given the same
Exp(1) noise: the same token ids for every row.  Under TRITON_INTERPRET=1 on the CPU;
compiled on a GPU host with PORTASERVE_TEST_DEVICE=cuda."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from portaserve.core.ops import native

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

DEVICE = os.environ.get("PORTASERVE_TEST_DEVICE", "cpu")


def _inputs(B, V, seed, temp):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * temp
    logits[0, : V // 3] = -float("inf")  # a grammar-masked row: many exact zeros
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty(B, V).exponential_(generator=g)
    return probs, noise


@pytest.mark.parametrize("V", [1000, 5000])
@pytest.mark.parametrize("temp", [1.0, 4.0])  # flat and peaked distributions
def test_sampling_kernel_matches_native(V, temp):
    from portaserve.platforms.triton_kernels.sampling import top_k_top_p_min_p_sample

    B = 12
    settings = [(0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (50, 0.9, 0.0), (0, 0.9, 0.0), (0, 0.5, 0.0),
                (0, 0.05, 0.0), (0, 1.0, 0.1), (20, 0.8, 0.05), (V, 0.95, 0.0), (3, 0.99, 0.2), (0, 0.0, 0.0)]
    top_k = torch.tensor([s[0] for s in settings])
    top_p = torch.tensor([s[1] for s in settings])
    min_p = torch.tensor([s[2] for s in settings])
    for seed in range(4):
        probs, noise = _inputs(B, V, seed * 7 + V, temp)
        ref = native.top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise)
        args = [t.to(DEVICE) for t in (probs, top_k, top_p, min_p, noise)]
        got = top_k_top_p_min_p_sample(*args)
        assert got.cpu().tolist() == ref.tolist(), (seed, got.cpu().tolist(), ref.tolist())
        # the draw really filtered: top_k=1 is the most probable token, top_k=5 within the top 5
        assert got[1].item() == probs[1].argmax().item()
        assert got[2].item() in probs[2].topk(5).indices.tolist()


def test_non_float32_falls_back_to_native():
    from portaserve.platforms.triton_kernels.sampling import top_k_top_p_min_p_sample

    probs, noise = _inputs(3, 300, 0, 1.0)
    k, p, m = torch.tensor([4, 0, 0]), torch.tensor([1.0, 0.7, 1.0]), torch.tensor([0.0, 0.0, 0.3])
    args = [probs.double(), k, p.double(), m.double(), noise.double()]
    assert top_k_top_p_min_p_sample(*args).tolist() == native.top_k_top_p_min_p_sample(*args).tolist()


def test_ties_rank_by_token_id_like_native():
    """Equal probabilities (common: bf16 logits) rank by token id on both sides, so the
    top-k / top-p cut-offs agree exactly; a uniform row with top_k=1 gives token 0."""
    from portaserve.platforms.triton_kernels.sampling import top_k_top_p_min_p_sample

    g = torch.Generator().manual_seed(5)
    B, V = 48, 3000
    logits = (torch.randn(B, V, generator=g) * 2).to(torch.bfloat16).float()  # many exact ties
    logits[0] = 0.0  # uniform
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty(B, V).exponential_(generator=g)
    top_k = torch.tensor([1] + [int(k) for k in torch.randint(1, 60, (B - 1,), generator=g)])
    top_p = torch.where(torch.arange(B) % 3 == 0, torch.tensor(0.3), torch.tensor(1.0))
    min_p = torch.zeros(B)
    ref = native.top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise)
    got = top_k_top_p_min_p_sample(*[t.to(DEVICE) for t in (probs, top_k, top_p, min_p, noise)])
    assert got.cpu().tolist() == ref.tolist()
    assert ref[0].item() == 0


def test_unusable_row_and_huge_top_k():
    """A NaN row (every logit -inf) gives token 0, inside the vocabulary, and a top_k beyond
    int32 keeps every token, as native does."""
    from portaserve.platforms.triton_kernels.sampling import top_k_top_p_min_p_sample

    probs, noise = _inputs(3, 200, 1, 1.0)
    probs[1] = torch.softmax(torch.full((200,), -float("inf")), dim=-1)  # NaN
    k = torch.tensor([2**32 + 1, 5, 0])
    p, m = torch.tensor([1.0, 0.9, 0.8]), torch.zeros(3)
    got = top_k_top_p_min_p_sample(*[t.to(DEVICE) for t in (probs, k, p, m, noise)]).cpu()
    ref = native.top_k_top_p_min_p_sample(probs, k, p, m, noise)
    assert got[1].item() == 0
    assert got[0].item() == ref[0].item() and got[2].item() == ref[2].item()


def test_startup_selftest_accepts_the_kernel_and_rejects_a_wrong_one(monkeypatch):
    """The provider's start-up check (compile on the device, compare with native) passes
    for the kernel and names the disagreement for a broken one (the registry then picks
    native).  Here the 'device' is the interpreter."""
    from portaserve.platforms.triton_kernels import sampling, selftest

    monkeypatch.setattr(selftest, "accel_device", lambda: torch.device(DEVICE))
    monkeypatch.setattr(sampling, "_SELFTEST", {})
    assert sampling.selftest() is None
    monkeypatch.setattr(sampling, "_SELFTEST", {})
    monkeypatch.setattr(sampling, "top_k_top_p_min_p_sample",
                        lambda probs, *a: torch.zeros(probs.shape[0], dtype=torch.int64))
    assert "disagrees with native" in sampling.selftest()


# ---- greedy argmax ---------------------------------------------------------------------
ARGMAX_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE != "cpu" else [])


@pytest.mark.parametrize("dtype", ARGMAX_DTYPES)
def test_argmax_kernel_matches_torch(dtype):
    """The split-row argmax returns torch's index on rows built to tell implementations
    apart (ties within and across blocks, NaN, infinities, signed zeros, the last column),
    on random rows with many ties (small integers) and on a strided view."""
    from portaserve.platforms.triton_kernels import sampling

    cases = sampling.argmax_cases().to(dtype)
    g = torch.Generator().manual_seed(1)
    ties = torch.randint(-3, 4, (5, 2 * sampling.ARGMAX_BLOCK + 17), generator=g).to(dtype)
    short = torch.randn(3, 7, generator=g).to(dtype)  # one partial block
    wide = torch.randn(4, 3000, generator=g).to(dtype)
    for x in (cases, ties, short, wide[:, 10:1510], wide[:, ::2]):  # a row stride; a column stride
        want = x.float().argmax(dim=-1)
        got = sampling.argmax(x.to(DEVICE)).cpu()
        assert got.dtype == torch.int64
        assert got.tolist() == want.tolist()
    assert sampling.argmax(torch.empty(0, 10, device=DEVICE)).shape == (0,)


def test_argmax_startup_selftest_accepts_the_kernel_and_rejects_a_wrong_one(monkeypatch):
    from portaserve.platforms.triton_kernels import sampling, selftest

    monkeypatch.setattr(selftest, "accel_device", lambda: torch.device(DEVICE))
    monkeypatch.setattr(sampling, "_ARGMAX_SELFTEST", {})
    assert sampling.argmax_selftest() is None
    monkeypatch.setattr(sampling, "_ARGMAX_SELFTEST", {})
    # a plain max-reduction that ignores NaN: what the ordered keys are there to avoid
    monkeypatch.setattr(sampling, "argmax", lambda x: torch.nan_to_num(x, nan=-1.0).argmax(dim=-1))
    assert "disagrees with torch" in sampling.argmax_selftest()
