"""Structured output with xgrammar: JSON schema, regex and EBNF constraints.

* ``validate_constraint`` parses a constraint without a tokenizer (cheap), so bad input is
  refused before any decoding with a message naming the problem.
* ``GrammarBackend`` compiles constraints against the model's tokenizer on a worker
  thread (a request waits for its grammar; others keep running), caching compiled
  grammars by (kind, text).
* Each constrained request holds a ``GrammarMatcher``.  For a decode batch the scheduler
  launches the forward first, then fills one token-bitmask row per constrained request on
  the CPU (``fill_masks``) while the accelerator computes, and the sampler applies the
  mask to the logits in place (``apply_masks``); the scheduler advances the matcher with
  every accepted token.
* Jump-forward: when the grammar admits exactly one continuation (e.g. the literal key of
  a JSON object), ``jump_forward`` returns its tokens so the scheduler can append them
  without a decode step each.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from portaserve.core import grammar_bounds, schema_check
from portaserve.core.hostcopy import to_device

logger = logging.getLogger(__name__)

KINDS = ("json_schema", "regex", "ebnf")
# The longest text a constraint may force (on any path through it).  xgrammar builds a
# forced continuation whole, ~0.4 us a character, on the scheduler's thread: 100k is ~40 ms.
MAX_FORCED_CHARS = 100_000


class GrammarError(ValueError):
    pass


def _clean(msg: str) -> str:
    # xgrammar prefixes its messages with a timestamp and C++ source location
    msg = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(msg).strip())
    msg = msg.replace("Check failed: (error.empty()) is false: ", "")
    return msg.splitlines()[0] if msg else "invalid grammar"


def normalise(kind: str, value) -> str:
    if kind == "json_schema" and not isinstance(value, str):
        return json.dumps(value)
    if not isinstance(value, str):
        raise GrammarError(f"{kind} must be a string")
    return value


# xgrammar converts schemas and grammars recursively in C++, a level per $ref or nesting
# (2-4 KB of stack each): a few thousand levels overflow an 8 MB thread stack, a segfault
# that takes the process down.  So that work runs on threads with 256 MB stacks (address
# space, touched only as deep as used), and a constraint may be 1 MiB long at most (a
# chain of ~10k $refs; ~0.5 s to convert).
DEEP_STACK = 256 << 20
MAX_CONSTRAINT_CHARS = 1 << 20
_pools: dict = {}  # name -> ThreadPoolExecutor (deep stacks), made on first use
_validator_lock = threading.Lock()


def deep_stack_pool(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """A pool whose threads have DEEP_STACK stacks."""
    old = threading.stack_size()
    try:
        threading.stack_size(DEEP_STACK)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        # its threads start now, with that stack: each task holds one until all have started
        started = threading.Barrier(workers + 1)
        try:
            for _ in range(workers):
                pool.submit(started.wait)
            started.wait()
        except BaseException:  # a thread could not start (e.g. no room for its stack)
            started.abort()  # releases those that did
            pool.shutdown(wait=False)
            raise
    finally:
        threading.stack_size(old)
    return pool


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    with _validator_lock:
        if name not in _pools:
            _pools[name] = deep_stack_pool(name, workers)
        return _pools[name]


# Checked constraints, (kind, text) -> None (valid) or the GrammarError's message, least
# recently used first: clients repeat their schemas, and the server checks each request's
# constraints ahead of building it (check_ahead), then the build finds the verdict here.
# A check under way is in _inflight, so a second caller waits on it rather than repeating it.
_checked: "OrderedDict[tuple[str, str], Optional[str]]" = OrderedDict()
_inflight: "dict[tuple[str, str], Future]" = {}
CHECK_THREADS = 4
CHECKED_CHARS = 16 << 20  # the texts kept, at most (a few 1 MiB constraints, or many schemas)
_checked_chars = 0


def _length_check(kind: str, text: str) -> None:
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise GrammarError(f"the {kind} is {len(text)} characters long, more than the "
                           f"{MAX_CONSTRAINT_CHARS} allowed")


def _verdict_or_check(kind: str, text: str, pool: str, workers: int) -> "tuple[Optional[str], Optional[Future]]":
    """The cached verdict (message or None) and no future; or no verdict and the future of
    the check under way (started here on the named pool when none is)."""
    key = (kind, text)
    with _validator_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return _checked[key], None
        fut = _inflight.get(key)
        if fut is not None and not fut.cancelled():
            return None, fut
    executor = _pool(pool, workers)
    with _validator_lock:
        fut = _inflight.get(key)
        if fut is None or fut.cancelled():
            fut = _inflight[key] = executor.submit(_validate, kind, text)
        return None, fut


def _record(kind: str, text: str, fut: Future) -> Optional[str]:
    """The verdict of a finished check (kept in _checked); other exceptions propagate."""
    global _checked_chars
    key = (kind, text)
    try:
        fut.result()
        why = None
    except GrammarError as e:
        why = str(e)
    finally:
        with _validator_lock:
            if _inflight.get(key) is fut:
                del _inflight[key]
    with _validator_lock:
        if key not in _checked:
            _checked[key] = why
            _checked_chars += len(text)
            while _checked_chars > CHECKED_CHARS:
                (_, old), _ = _checked.popitem(last=False)
                _checked_chars -= len(old)
    return why


def validate_constraint(kind: str, text: str) -> None:
    """Raise GrammarError naming the problem if the constraint cannot be compiled.  The
    request builder calls this: it finds check_ahead's verdict, waits for its check if one
    is under way, or checks on its own thread."""
    _length_check(kind, text)
    why, fut = _verdict_or_check(kind, text, "grammar-check", 1)
    if fut is not None:
        try:
            why = _record(kind, text, fut)
        except CancelledError:  # check_ahead's queued check, dropped at a server's close
            why = _record(kind, text, _pool("grammar-check", 1).submit(_validate, kind, text))
    if why is not None:
        raise GrammarError(why)


def check_ahead(constraints) -> "list[Future]":
    """Start checking (kind, value) pairs as the request builder will (normalise, then
    validate_constraint) on CHECK_THREADS threads of their own, and return the checks'
    futures (done ones included).  The server awaits them off its one request-building
    thread, so a large constraint's check (seconds near the 1 MiB limit) holds only its own
    request; the build then finds the verdicts.  Bad values are left to the build, which
    words its refusal."""
    futures = []
    for kind, value in constraints:
        try:
            text = normalise(kind, value)
            _length_check(kind, text)
        except GrammarError:
            continue
        why, fut = _verdict_or_check(kind, text, "grammar-ahead", CHECK_THREADS)
        if fut is not None:
            fut.add_done_callback(lambda f, kind=kind, text=text: _record_quietly(kind, text, f))
            futures.append(fut)
    return futures


def _record_quietly(kind: str, text: str, fut: Future) -> None:
    try:
        _record(kind, text, fut)
    except Exception:  # noqa: BLE001 - cancelled, or not a GrammarError: the build checks again
        pass


def _validate(kind: str, text: str) -> None:
    import xgrammar as xgr

    try:
        if kind == "json_schema":
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as e:
                raise GrammarError(f"json_schema is not valid JSON: {e}") from None
            except RecursionError:
                raise GrammarError("json_schema is nested too deeply") from None
            g = xgr.Grammar.from_json_schema(text, any_whitespace=False)
            found = schema_check.unenforced(schema)
            if found:
                raise GrammarError(f"json_schema at {found[1]}: {schema_check.REFUSAL.format(found[0])}")
        elif kind == "regex":
            g = xgr.Grammar.from_regex(text)
        elif kind == "ebnf":
            g = xgr.Grammar.from_ebnf(text)
        else:
            raise GrammarError(f"unknown constraint kind {kind!r}")
    except GrammarError:
        raise
    except Exception as e:
        raise GrammarError(f"invalid {kind}: {_clean(str(e))}") from None
    why = grammar_bounds.problem(str(g), MAX_FORCED_CHARS)
    if why:
        raise GrammarError(f"the {kind} is refused: {why}")


@dataclass
class GrammarMasks:
    """Token bitmasks of one batch: int32 [batch, ceil(vocab/32)] on the CPU (a set bit
    allows a token); only ``rows`` are constrained."""
    bitmask: torch.Tensor
    rows: list[int]

    def padded(self, batch: int) -> "GrammarMasks":
        """The same masks for a batch padded to `batch` rows (the extra rows allow all)."""
        extra = batch - self.bitmask.shape[0]
        if extra <= 0:
            return self
        return GrammarMasks(torch.cat([self.bitmask, self.bitmask.new_full((extra, self.bitmask.shape[1]), -1)]),
                            self.rows)


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, eos_ids, threads: int = 1, pin_memory: bool = True):
        import xgrammar as xgr

        self.xgr = xgr
        self.pin_memory = pin_memory
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(eos_ids) or None)
        # xgrammar's own cache (of what our futures hold) is unbounded by default
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_limit_bytes=256 << 20)
        self.pool = deep_stack_pool("grammar")  # compiling recurses as deep as checking
        # masks of a batch are filled in parallel (one 128k-vocabulary mask is ~0.1-0.5 ms
        # of CPU; sixteen in a row outlast a decode forward on a GPU); half the cores, so
        # the scheduler thread and the tokenizer keep theirs
        self.mask_threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        self._batch_matcher = None
        self._no_ctrl = None
        # compiled constraints, the most recently used kept: a server taking a new schema
        # per request would otherwise grow without end
        self.cache: OrderedDict[tuple[str, str], Future] = OrderedDict()

    CACHE_ENTRIES = 1024

    def compile(self, kind: str, text: str) -> Future:
        key = (kind, text)
        fut = self.cache.get(key)
        if fut is None:
            fut = self.pool.submit(self._compile, kind, text)
            self.cache[key] = fut
            while len(self.cache) > self.CACHE_ENTRIES:
                self.cache.popitem(last=False)  # a request holding its future keeps it
        else:
            self.cache.move_to_end(key)
        return fut

    def _compile(self, kind: str, text: str):
        try:
            if kind == "json_schema":
                compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "regex":
                compiled = self.compiler.compile_regex(text)
            else:
                compiled = self.compiler.compile_grammar(text)
        except Exception as e:
            raise GrammarError(f"invalid {kind}: {_clean(str(e))}") from None
        # a constraint whose language is empty (a regex such as [^\x00-\U0010FFFF]) allows
        # no first token, not even the end: refuse it here rather than sample a token it rejects
        bits = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        m = self.xgr.GrammarMatcher(compiled)
        m.fill_next_token_bitmask(bits, 0)
        if not bool(bits.any()) and not m.is_terminated():
            raise GrammarError(f"the {kind} matches no text: no token can begin an output it accepts")
        return compiled

    def matcher(self, compiled, kind: Optional[str] = None):
        m = self.xgr.GrammarMatcher(compiled)
        # JSON (compact separators, no free whitespace) never holds a raw control
        # character, but xgrammar's string rule lets tokens such as "\tcase" through;
        # fill_masks bars them for JSON matchers
        m.portaserve_json = kind == "json_schema"
        return m

    def _no_control_bits(self) -> torch.Tensor:
        """Bitmask row allowing every token whose bytes hold no control character (< 0x20)."""
        if self._no_ctrl is None:
            import numpy as np

            ok = np.ones(((self.vocab_size + 31) // 32) * 32, dtype=bool)
            for i, b in enumerate(self.info.decoded_vocab[: self.vocab_size]):
                if any(c < 0x20 for c in b):
                    ok[i] = False
            self._no_ctrl = torch.from_numpy(np.packbits(ok, bitorder="little").view(np.int32).copy())
        return self._no_ctrl

    # ---- masks ----------------------------------------------------------------------
    def fill_masks(self, batch_size: int, rows: list[int], matchers: list) -> Optional["GrammarMasks"]:
        """Fill, on the CPU, one token-bitmask row per constrained request: rows[i] gets
        the tokens matchers[i] accepts next.  The scheduler calls this right after
        launching a decode forward, so on an accelerator it runs while the forward does."""
        if not rows:
            return None
        bitmask = self.xgr.allocate_token_bitmask(batch_size, self.vocab_size)
        if len(rows) > 1 and self.mask_threads > 1:
            if self._batch_matcher is None:
                self._batch_matcher = self.xgr.BatchGrammarMatcher(max_threads=self.mask_threads)
            self._batch_matcher.batch_fill_next_token_bitmask(list(matchers), bitmask, indices=list(rows))
        else:
            for row, m in zip(rows, matchers):
                m.fill_next_token_bitmask(bitmask, row)
        json_rows = [row for row, m in zip(rows, matchers) if getattr(m, "portaserve_json", False)]
        if json_rows:
            bitmask[json_rows] &= self._no_control_bits()
        return GrammarMasks(bitmask, list(rows))

    def allows_nothing(self, matcher) -> bool:
        """Whether no token (not even the end) may come next: a dead end of the constraint,
        which the check before compiling cannot see past the first position ("a[^\\s\\S]")."""
        masks = self.fill_masks(1, [0], [matcher])
        words = masks.bitmask[0]
        full, rest = divmod(self.vocab_size, 32)
        if bool(words[:full].any()):
            return False
        return not (rest and int(words[full]) & ((1 << rest) - 1))

    def apply_masks(self, logits: torch.Tensor, masks: "GrammarMasks") -> None:
        """Mask logits[masks.rows] in place (-inf where the bitmask bars a token)."""
        bitmask = masks.bitmask
        # pinned, asynchronous where possible: the copy queues behind the forward
        bitmask = to_device(bitmask, logits.device, self.pin_memory)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                             indices=masks.rows)

    def jump_forward(self, matcher, max_tokens: int) -> list[int]:
        """Tokens of the unique continuation the grammar forces now (may be empty), at
        most max_tokens.  Every token is checked against the matcher, which is advanced
        past exactly the tokens returned."""
        try:
            s = matcher.find_jump_forward_string()
        except Exception:  # noqa: BLE001 - an optimisation: decoding goes on without it
            logger.exception("jump-forward failed; the request decodes on")
            return []
        if not s or max_tokens <= 0:
            return []
        if len(s) > 64 * max_tokens:  # more than the room left: encode only a prefix,
            s = s[:64 * max_tokens]  # less its last token (the cut may split a merge)
            ids = self.tokenizer.encode(s, add_special_tokens=False)[:-1][:max_tokens]
        else:
            ids = self.tokenizer.encode(s, add_special_tokens=False)[:max_tokens]
        taken = []
        for t in ids:
            if not matcher.accept_token(t):
                break
            taken.append(t)
        return taken

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
