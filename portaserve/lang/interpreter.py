"""The interpreter: one ``StreamExecutor`` per program state (and per fork).

``s += expr`` only queues ``expr``; the executor's own thread runs the queue in order,
so a program body returns quickly and independent states (forks, run_batch) run their
backend calls concurrently, which the server batches.  Reading ``s["var"]`` waits for
that variable; ``s.text()`` waits for everything queued so far."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from portaserve.lang.choices import greedy_pick
from portaserve.lang.errors import LangError
from portaserve.lang.ir import Expr, Gen, Join, RoleBegin, RoleEnd, Select, Seq, Text, to_expr

_END = object()


class StreamExecutor:
    def __init__(self, backend, default_sampling: Optional[dict] = None, stream: bool = False):
        self.backend = backend
        self.default_sampling = dict(default_sampling or {})
        self.stream = stream
        self.text = ""
        self.messages: list[dict] = []
        self.variables: dict = {}
        self.meta_info: dict = {}
        self.error: Optional[LangError] = None
        self.new_vars: set = set()      # set since this state was forked (for join)
        self._roles: list = []          # open roles: (role, start offset, suffix)
        self._var_pending: dict[str, int] = {}  # queued assignments not yet done, by name
        self.fork_start = 0             # len(text) when this state was forked (for join)
        self._events: list = []         # (var name or None, text piece) for text_iter
        self._cond = threading.Condition()
        self._ended = False
        self._children: list = []       # forks, ended with this state
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="portaserve-lang")
        self._thread.start()

    # ---- called from the program's thread -----------------------------------------------
    def submit(self, expr) -> None:
        if self._ended:
            raise RuntimeError("this program state has finished; it can be read, not extended")
        expr = to_expr(expr)
        names = _names(expr)  # the variables it sets, counted until it has run
        with self._cond:
            for name in names:
                self._var_pending[name] = self._var_pending.get(name, 0) + 1
        self._queue.put((expr, names))

    def sync(self) -> None:
        self._queue.join()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._queue.put((_END, []))
        for k in self._children:  # forks never joined still end (and free their thread)
            k.end()

    def wait_done(self) -> None:
        self._done.wait()

    def get_var(self, name: str):
        """The variable's value once every assignment queued to it so far is done."""
        with self._cond:
            known = name in self._var_pending
            while self._var_pending.get(name, 0) > 0:
                self._cond.wait()
        if not known:
            self.sync()
        if name in self.variables:
            return self.variables[name]
        if self.error is not None:
            raise self.error
        raise KeyError(f"no variable {name!r} in this state")

    def fork(self, n: int) -> list["StreamExecutor"]:
        """n copies of this state.  The shared prefix is first prefilled once
        (max_new_tokens=0), so every branch's first call finds it in the radix cache."""
        self.sync()
        if self.error is not None:
            raise self.error
        if n > 1 and self.text:
            try:
                self.backend.generate(self.text, {"max_new_tokens": 0})
            except LangError as e:
                self.error = e
                raise
        kids = []
        for _ in range(n):
            k = StreamExecutor(self.backend, self.default_sampling, self.stream)
            k.text, k.messages = self.text, list(self.messages)
            k.variables, k.meta_info = dict(self.variables), dict(self.meta_info)
            k._roles = list(self._roles)
            k.fork_start = len(self.text)
            kids.append(k)
        self._children.extend(kids)
        return kids

    def iter_events(self, var_name: Optional[str] = None):
        """Text pieces as they are appended (only those of ``var_name`` if given)."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self._done.is_set():
                    self._cond.wait()
                batch, i = self._events[i:], len(self._events)
                finished = self._done.is_set()
            for name, piece in batch:
                if var_name is None or name == var_name:
                    yield piece
            if finished and i >= len(self._events):
                return

    # ---- the executor's thread ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            expr, names = self._queue.get()
            try:
                if expr is _END:
                    return
                if self.error is None:
                    try:
                        self._exec(expr)
                    except LangError as e:
                        self.error = e
                    except Exception as e:  # noqa: BLE001 - a bug or bad input: keep the state
                        self.error = LangError(f"{type(e).__name__}: {e}")
                        self.error.__cause__ = e
            finally:
                with self._cond:
                    if expr is not _END:
                        for name in names:
                            self._var_pending[name] -= 1
                    else:
                        self._done.set()
                    self._cond.notify_all()
                self._queue.task_done()

    def _append(self, piece: str, var: Optional[str] = None) -> None:
        if not piece:
            return
        with self._cond:
            self.text += piece
            self._events.append((var, piece))
            self._cond.notify_all()

    def _exec(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Seq):
            for e in expr.items:
                self._exec(e)
        elif isinstance(expr, RoleBegin):
            prefix, suffix = self.backend.chat_template().affixes(expr.role, self.messages)
            self._append(prefix)
            self._roles.append((expr.role, len(self.text), suffix))
        elif isinstance(expr, RoleEnd):
            if not self._roles or self._roles[-1][0] != expr.role:
                raise LangError(f"{expr.role}_end() without a matching {expr.role}_begin()")
            role, start, suffix = self._roles.pop()
            self.messages.append({"role": role, "content": self.text[start:]})
            self._append(suffix)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, Join):
            self._join(expr)
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _set_var(self, name: Optional[str], value, meta: dict) -> None:
        if name is not None:
            with self._cond:  # new_vars is read from the program's thread (a join's names)
                self.variables[name] = value
                self.meta_info[name] = meta
                self.new_vars.add(name)

    def _gen(self, g: Gen) -> None:
        sp = {**self.default_sampling, **g.sampling}
        if self.stream:
            out, sent = None, 0
            for out in self.backend.generate(self.text, sp, stream=True, **g.logprob):
                self._append(out["text"][sent:], g.name)
                sent = len(out["text"])
        else:
            out = self.backend.generate(self.text, sp, **g.logprob)
            self._append(out["text"], g.name)
        text = out["text"] if out else ""
        value = text
        if g.dtype is not None:
            try:
                value = g.dtype(text.strip())
            except ValueError:
                raise LangError(f"gen({g.name!r}, dtype={g.dtype.__name__}) produced {text!r}, "
                                f"which is not a {g.dtype.__name__} (finish reason "
                                f"{out['meta_info'].get('finish_reason')})") from None
        self._set_var(g.name, value, out["meta_info"] if out else {})

    def _select(self, s: Select) -> None:
        """Score each choice by the logprobs of its tokens after the current text and append
        the best one.  The tokenizer may merge the prompt's last token with a choice's
        first (" " + "yes" is one token " yes"), so the prompt's own last tokens are scored
        beside the choices' (from two tokens before the prompt's end, as SGLang does), and
        every choice is scored from the first position where any choice's tokens part from
        the prompt's: all choices then cover the same text before them."""
        prompt = self.text
        n_prompt, start = 0, 0
        if prompt:  # prefill the prompt once: its length, and a radix-cache hit for each choice
            fill = self.backend.generate(prompt, {"max_new_tokens": 0})
            n_prompt = fill["meta_info"]["prompt_tokens"]
            start = max(n_prompt - 2, 0)
        texts = ([prompt] if prompt else []) + [prompt + c for c in s.choices]
        outs = self.backend.generate(texts, {"max_new_tokens": 0}, return_logprob=True,
                                     logprob_start_len=start)
        entries = [o["meta_info"]["input_token_logprobs"] for o in outs]
        own = [e[1] for e in entries.pop(0)] if prompt else []  # the prompt's last tokens
        outs = outs[1:] if prompt else outs

        def parts_at(ids):
            return next((j for j, (a, b) in enumerate(zip(own, ids)) if a != b), min(len(own), len(ids)))

        first = min(parts_at([e[1] for e in es]) for es in entries)
        rows, tokens = [], []  # per choice: the logprobs and the tokens scored
        for c, es in zip(s.choices, entries):
            scored = [e for e in es[first:] if e[0] is not None]
            if not scored:
                raise LangError(f"select: choice {c!r} cannot be scored (no token of it has a "
                                "logprob: an empty prompt, on a model without a BOS token?)")
            rows.append([e[0] for e in scored])
            tokens.append([e[1] for e in scored])
        sums = [sum(r) for r in rows]
        norms = [sum(r) / len(r) for r in rows]
        meta = {}
        if s.method == "greedy":
            best = greedy_pick(rows, tokens)
            scores = rows
        elif s.method == "unconditional":
            # the same tokens with no context before them; the first has no logprob there
            # and counts as 0, so it keeps its logprob in context
            alone = self.backend.generate(None, {"max_new_tokens": 0}, input_ids=tokens,
                                          return_logprob=True, logprob_start_len=0)
            uncond = [[e[0] or 0.0 for e in o["meta_info"]["input_token_logprobs"]] for o in alone]
            scores = [sum(a - b for a, b in zip(r, u)) / len(r) for r, u in zip(rows, uncond)]
            best = max(range(len(scores)), key=lambda i: scores[i])
            meta["unconditional_logprobs"] = uncond
        else:
            scores = norms if s.method == "normalized" else sums
            best = max(range(len(scores)), key=lambda i: scores[i])
        self._append(s.choices[best], s.name)
        self._set_var(s.name, s.choices[best], {
            "choices": list(s.choices), "method": s.method, "scores": scores,
            "normalized_logprobs": norms, "logprobs": sums, "token_logprobs": rows,
            "choice_tokens": [[e[2] if len(e) > 2 and e[2] is not None else e[1]
                               for e in es[first:]] for es in entries],
            "prompt_tokens": n_prompt, **meta,
            "cached_tokens": [o["meta_info"]["cached_tokens"] for o in outs]})

    def _join(self, j: Join) -> None:
        for k in j.children:
            k.sync()
            k.end()
            k.wait_done()
        for k in j.children:
            if k.error is not None:
                raise k.error
        if j.mode == "gather_variable":
            names = {n for k in j.children for n in k.new_vars}
            for n in sorted(names):
                self._set_var(n, [k.variables.get(n) for k in j.children],
                              [k.meta_info.get(n) for k in j.children])
        elif j.mode == "concate_and_append":  # what each fork added after forking
            self._append("".join(k.text[k.fork_start:] for k in j.children))
        else:
            raise LangError(f"join mode must be 'gather_variable' or 'concate_and_append', "
                            f"got {j.mode!r}")


def _names(expr) -> list:
    if isinstance(expr, (Gen, Select)):
        return [expr.name] if expr.name is not None else []
    if isinstance(expr, Seq):
        return [n for e in expr.items for n in _names(e)]
    if isinstance(expr, Join):
        names = set()
        for k in expr.children:
            with k._cond:
                names |= k.new_vars | set(k._var_pending)
        return sorted(names)
    return []


# ---- running programs -------------------------------------------------------------------
def run_program(program, backend, args, kwargs, sampling, stream=False):
    from portaserve.lang.state import ProgramState

    ex = StreamExecutor(backend, sampling, stream)
    state = ProgramState(ex)
    try:
        program.fn(state, *args, **kwargs)
    except LangError as e:
        ex.end()
        ex.wait_done()
        e.state = state
        raise
    except BaseException:
        ex.end()
        raise
    ex.end()
    if not stream:
        ex.wait_done()
        if ex.error is not None:
            ex.error.state = state
            raise ex.error
    return state


def run_batch(program, backend, batch_kwargs, sampling, num_threads="auto", progress_bar=False):
    """Run the program once per kwargs dict, ``num_threads`` at a time; returns the states
    in order.  A failed program's state has ``.error`` set instead of raising here."""
    from portaserve.lang.state import ProgramState

    if num_threads == "auto":
        num_threads = min(64, max(1, len(batch_kwargs)))

    def one(kw):
        try:
            return run_program(program, backend, (), dict(kw), sampling)
        except LangError as e:
            return e.state if e.state is not None else ProgramState.failed(backend, e)

    with ThreadPoolExecutor(max_workers=max(1, int(num_threads))) as pool:
        futures = [pool.submit(one, kw) for kw in batch_kwargs]
        it = futures
        if progress_bar:
            try:
                from tqdm import tqdm

                it = tqdm(futures, total=len(futures))
            except ImportError:
                pass
        return [f.result() for f in it]
