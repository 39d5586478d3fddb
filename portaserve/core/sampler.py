"""Turning a batch of logits into next tokens (and their logprobs).

Order of operations per request: min_new_tokens masking, penalties, logit_bias, the grammar mask,
then either greedy argmax or temperature -> softmax -> top-k / top-p / min-p -> a draw.  Draws use Exp(1)
noise from the request's own generator when it set ``sampling_seed`` (reproducible
whatever else shares its batch), otherwise from the engine's generator.
Logprobs are those of the model's raw distribution (log_softmax of the logits).
"""
from __future__ import annotations

from typing import Optional

import torch

from portaserve.core import ops
from portaserve.core.hostcopy import to_device
from portaserve.core.request import Req


class Sampler:
    def __init__(self, vocab_size: int, device, seed: int = 0, rng_device=None, pin_memory: bool = True):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        # generators live where the platform can host them (e.g. the CPU for XLA devices)
        self.rng_device = torch.device(rng_device) if rng_device is not None else self.device
        self.generator = torch.Generator(device=self.rng_device).manual_seed(seed)

    def request_generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        return torch.Generator(device=self.rng_device).manual_seed(int(seed))

    def sample(self, logits: torch.Tensor, reqs: list[Req], eos_ids: set[int], grammar=None, masks=None):
        """logits: [B, V] float32, B >= len(reqs) (a padded batch's extra rows are sampled
        and dropped).  Returns (next token ids, one per request, raw logprobs [B, V] or None
        when no request asked for logprobs).  masks: the batch's grammar bitmasks
        if the caller filled them already (GrammarBackend.fill_masks), else they are filled
        here for every request holding a matcher."""
        ids, logprobs = self.sample_tensor(logits, reqs, eos_ids, grammar, masks)
        return ids.tolist()[:len(reqs)], logprobs

    def _h2d(self, data, dtype):
        return to_device(torch.tensor(data, dtype=dtype), self.device, self.pin_memory)

    def sample_tensor(self, logits: torch.Tensor, reqs: list[Req], eos_ids: set[int], grammar=None,
                      masks=None, ignored_rows=()):
        """As sample(), leaving the ids on the device: no host synchronisation for
        requests without penalties, grammar, min_new_tokens or logprobs.  ignored_rows:
        rows whose token will be thrown away (an overlapped batch's requests that finished
        or jumped forward since its launch); they draw nothing from their request's own
        generator, so a seeded request's draws do not depend on the scheduling."""
        B, V = logits.shape
        pad = B - len(reqs)  # padded batches (XLA): rows past the requests sample greedily, unused
        raw = logits
        logprobs = torch.log_softmax(raw, dim=-1) if any(r.return_logprob for r in reqs) else None
        if masks is None and grammar is not None:
            rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished]
            masks = grammar.fill_masks(B, rows, [reqs[i].grammar for i in rows])
        logits = self._mask_min_tokens(logits, reqs, eos_ids, masks)
        if any(r.sampling.needs_penalties for r in reqs):
            logits = self._penalise(logits, reqs)
        if any(r.sampling.logit_bias for r in reqs):
            logits = self._bias(logits, reqs, raw)
        if masks is not None:
            if logits is raw:
                logits = logits.clone()
            masks = masks.padded(B)
            grammar.apply_masks(logits, masks)
        greedy = [r.sampling.greedy for r in reqs]
        if all(greedy):
            return ops.argmax(logits), logprobs
        greedy += [True] * pad
        temps = self._h2d([1.0 if g else r.sampling.temperature for g, r in zip(greedy, reqs)] + [1.0] * pad,
                          logits.dtype)
        probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)
        # Exp(1) noise: one draw for the batch, then the seeded requests' own rows
        noise = torch.empty(probs.shape, dtype=probs.dtype, device=self.rng_device)
        noise.exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None and i not in ignored_rows:
                noise[i].exponential_(generator=r.generator)
        noise = noise.to(probs.device, non_blocking=True)
        if all(r.sampling.top_k <= 0 and r.sampling.top_p >= 1.0 and r.sampling.min_p <= 0.0 for r in reqs):
            sampled = ops.argmax(probs / noise)  # nothing to filter: no sort needed
        else:
            top_k = self._h2d([r.sampling.top_k for r in reqs] + [0] * pad, torch.int64)
            top_p = self._h2d([r.sampling.top_p for r in reqs] + [1.0] * pad, probs.dtype)
            min_p = self._h2d([r.sampling.min_p for r in reqs] + [0.0] * pad, probs.dtype)
            sampled = ops.top_k_top_p_min_p_sample(probs, top_k, top_p, min_p, noise)
        if any(greedy):
            sampled = torch.where(self._h2d(greedy, torch.bool), ops.argmax(logits), sampled)
        return sampled, logprobs

    def _mask_min_tokens(self, logits, reqs, eos_ids, masks=None):
        """Bar the end (EOS, stop_token_ids) until min_new_tokens are out, except where a
        grammar allows nothing else: a finished constraint ends the request early."""
        rows = [i for i, r in enumerate(reqs) if len(r.output_ids) < r.sampling.min_new_tokens]
        if not rows:
            return logits
        out = logits
        for i in rows:
            banned = set(eos_ids) | set(reqs[i].sampling.stop_token_ids or [])
            idx = [t for t in banned if 0 <= t < logits.shape[1]]
            if not idx or (masks is not None and i in masks.rows and not _allows_other(masks.bitmask[i], idx)):
                continue
            if out is logits:
                out = logits.clone()
            out[i, idx] = float("-inf")
        return out

    def _bias(self, logits, reqs, raw):
        rows, cols, vals = [], [], []
        for i, r in enumerate(reqs):
            for t, v in (r.sampling.logit_bias or {}).items():
                rows.append(i)
                cols.append(t)
                vals.append(v)
        if logits is raw:
            logits = logits.clone()
        logits.index_put_((self._h2d(rows, torch.int64), self._h2d(cols, torch.int64)),
                          self._h2d(vals, logits.dtype), accumulate=True)
        return logits

    def _penalise(self, logits, reqs):
        B, V = logits.shape
        dev = logits.device
        counts = torch.zeros(B, V, dtype=torch.int32, device=dev)
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        for i, r in enumerate(reqs):
            if not r.sampling.needs_penalties:
                continue
            if r.output_ids:
                out = torch.tensor(r.output_ids, device=dev)
                counts[i].scatter_add_(0, out, torch.ones_like(out, dtype=torch.int32))
            if r.sampling.repetition_penalty != 1.0:
                seen[i, torch.tensor(r.fill_ids, device=dev)] = True
        pad = B - len(reqs)
        f = torch.tensor([r.sampling.frequency_penalty for r in reqs] + [0.0] * pad, device=dev, dtype=logits.dtype)
        p = torch.tensor([r.sampling.presence_penalty for r in reqs] + [0.0] * pad, device=dev, dtype=logits.dtype)
        rp = torch.tensor([r.sampling.repetition_penalty for r in reqs] + [1.0] * pad, device=dev,
                          dtype=logits.dtype)
        return ops.apply_penalties(logits, counts, seen, f, p, rp)


def _allows_other(bitmask_row: torch.Tensor, tokens: list[int]) -> bool:
    """Whether a grammar bitmask row (int32 words, bit t of word t // 32 allows token t)
    allows some token other than `tokens`."""
    row = bitmask_row.clone()
    for t in tokens:
        w = t // 32
        if w < row.numel():
            row[w] = int(row[w]) & ~(1 << (t % 32)) if t % 32 != 31 else int(row[w]) & 0x7FFFFFFF
    return bool(row.any())
