"""``portaserve.Engine``: the in-process API (DESIGN.md §5).

    with portaserve.Engine() as engine:
        out = engine.generate("The capital of France is", {"max_new_tokens": 16, "temperature": 0})
        print(out["text"], out["meta_info"]["cached_tokens"])

A background thread drives the scheduler; ``generate`` may be called from several
threads at once, and their requests are batched together.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
import weakref
from typing import Iterator, Optional, Union

from portaserve.core.detokenize import IncrementalDetokenizer
from portaserve.core.request import Req
from portaserve.core.request_builder import build_req, copy_params
from portaserve.core.sampling_params import InvalidRequest, lax_int
from portaserve.runtime import Runtime, build_runtime
from portaserve.server_args import ServerArgs
from portaserve.tp import step_commands

logger = logging.getLogger("portaserve")


class EngineDead(RuntimeError):
    pass


_SHUT_DOWN = object()  # put in every waiter's queue when the scheduler thread ends


class _Handle:
    """Consumer-side state of one request: its queue and detokenizer."""

    def __init__(self, req: Req, tokenizer):
        self.req = req
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        sp = req.sampling
        self.detok = IncrementalDetokenizer(tokenizer, sp.skip_special_tokens,
                                            sp.spaces_between_special_tokens, sp.stop_strs,
                                            sp.no_stop_trim) if tokenizer is not None else None
        self.output_ids: list[int] = []
        self.finished_reason = None
        self.meta: dict = {}
        self.logprobs = {"input_token_logprobs": [], "input_top_logprobs": [],
                         "output_token_logprobs": [], "output_top_logprobs": []}

    def absorb(self, msg: dict) -> None:
        self.output_ids.extend(msg["new_ids"])
        if self.detok is not None:
            self.detok.feed(msg["new_ids"], msg["finished_reason"])
        for k in self.logprobs:
            self.logprobs[k].extend(msg.get(k, []))
        self.meta.update(msg["meta"])
        if msg["finished_reason"] is not None:
            self.finished_reason = msg["finished_reason"]

    def result(self) -> dict:
        meta = {"id": self.req.rid, **self.meta, "finish_reason": self.finished_reason}
        if self.req.return_logprob:
            meta.update(self.logprobs)
        return {"text": self.detok.text if self.detok is not None else "",
                "output_ids": list(self.output_ids), "meta_info": meta}


class _Unsent:
    """A stream not read yet; abort_request sets ``aborted``."""
    aborted = False


def output_due(r: Req, sent: dict, every: int) -> bool:
    """--stream-interval: a running request's new tokens go out `every` at a time; its
    first message and its end go at once."""
    return (every <= 1 or r.finished_reason is not None or r.rid not in sent
            or len(r.output_ids) - sent[r.rid]["ids"] >= every)


def make_output_message(r: Req, sent: dict) -> dict:
    """The delta of r since the last message (sent tracks per-rid offsets)."""
    s = sent.setdefault(r.rid, {"ids": 0, "olp": 0, "ilp": 0})
    msg = {
        "rid": r.rid,
        "new_ids": r.output_ids[s["ids"]:],
        "finished_reason": r.finished_reason,
        "meta": {"prompt_tokens": len(r.input_ids), "completion_tokens": len(r.output_ids),
                 "cached_tokens": r.cached_tokens},
    }
    if r.return_logprob:
        msg["output_token_logprobs"] = r.output_token_logprobs[s["olp"]:]
        msg["output_top_logprobs"] = r.output_top_logprobs[s["olp"]:]
        msg["input_token_logprobs"] = r.input_token_logprobs[s["ilp"]:]
        msg["input_top_logprobs"] = r.input_top_logprobs[s["ilp"]:]
        s["olp"] = len(r.output_token_logprobs)
        s["ilp"] = len(r.input_token_logprobs)
    s["ids"] = len(r.output_ids)
    if r.finished_reason is not None:
        sent.pop(r.rid, None)
    return msg


class Engine:
    def __init__(self, model_path: Optional[str] = None, **kwargs):
        args = kwargs.pop("server_args", None) or ServerArgs(model_path=model_path, **kwargs)
        self.args = args
        self.rt: Runtime = build_runtime(args)
        logger.info("portaserve engine ready\n%s", self.rt.startup_report())
        self.tokenizer = self.rt.tokenizer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, _Handle] = {}
        self._sent: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._closed = False  # the scheduler thread has ended: no request is taken
        # ids of requests dropped unfinished, until the scheduler has handled their abort:
        # a new request reusing one before then would receive the old one's messages
        self._releasing: set = set()
        # streams made but not read yet (sent on their first read): an abort_request meanwhile
        # is kept here; an iterator dropped unread takes its entry with it
        self._unsent: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._thread = threading.Thread(target=self._loop, name="portaserve-scheduler", daemon=True)
        self._thread.start()
        if self.rt.tp is not None:
            # the other ranks are child processes that multiprocessing joins at exit: stop
            # them first, even when the caller never calls shutdown()
            import atexit

            ref = weakref.ref(self)
            atexit.register(lambda: ref() is not None and ref().shutdown())

    # ---- scheduler thread -------------------------------------------------------------
    def _loop(self) -> None:
        sched = self.rt.scheduler
        tp = self.rt.tp
        try:
            while not self._stop.is_set():
                block = not sched.has_work()
                items = []
                while True:
                    try:
                        item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    block = False
                    items.append(item)
                if tp is not None:
                    # every rank applies the same state-changing commands, then steps
                    tp.broadcast_commands(step_commands(sched, items))
                for item in items:
                    self._handle_command(item)
                if sched.has_work():
                    for r in sched.step():
                        if output_due(r, self._sent, self.rt.args.stream_interval):
                            self._deliver(r)
        except BaseException as e:  # report to every waiter instead of hanging them
            logger.exception("scheduler thread died")
            self._error = e
        finally:
            # no request gets an answer after this: wake every waiter (a stream still being
            # read when shutdown() was called, too), and take no new request
            with self._lock:
                self._closed = True
                for h in self._handles.values():
                    h.q.put(self._error or _SHUT_DOWN)
            if tp is not None:
                tp.shutdown()

    def _handle_command(self, item) -> None:
        kind, payload = item[0], item[1]
        sched = self.rt.scheduler
        if kind in ("start_profile", "stop_profile"):  # (kind, reply queue[, options])
            prof = self.rt.profiler
            try:
                payload.put(prof.start(**item[2]) if kind == "start_profile" else prof.stop())
            except Exception as e:  # noqa: BLE001 - raised to the caller
                payload.put(e)
            return
        if kind == "add":
            sched.add_request(payload)
        elif kind == "abort":
            r = sched.abort(payload)
            if r is not None:
                self._deliver(r)
            with self._lock:  # nothing more comes for this id
                self._releasing.discard(payload)
        elif kind == "flush_cache":
            payload.put(sched.flush_cache())
        elif kind == "call":  # read-only queries, answered on this thread
            fn, done = payload
            try:
                done.put(fn())
            except Exception as e:  # pragma: no cover - surfaced to the caller
                done.put(e)

    def _deliver(self, r: Req) -> None:
        msg = make_output_message(r, self._sent)
        with self._lock:
            h = self._handles.get(r.rid)
        if h is not None:
            h.q.put(msg)

    def _call(self, fn):
        """Run fn on the scheduler thread (where scheduler state may be touched)."""
        return self._command(lambda done: ("call", (fn, done)))

    def _command(self, item):
        """Send item(reply queue) to the scheduler thread and return its answer; raises
        what it answered with, or EngineDead if the thread has stopped (it would never
        answer)."""
        self._check_alive()
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(item(done))
        while True:
            try:
                res = done.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    self._check_alive()
        if isinstance(res, Exception):
            raise res
        return res

    def _make_req(self, prompt, input_ids, sp, return_logprob, logprob_start_len,
                  top_logprobs_num, rid=None) -> Req:
        return build_req(self.rt.limits(), self.tokenizer, prompt, input_ids, sp, return_logprob,
                         logprob_start_len, top_logprobs_num, rid)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDead(f"the engine's scheduler died: {self._error!r}")
        if self._closed or not self._thread.is_alive():
            raise EngineDead("the engine has been shut down")

    def _submit(self, reqs: list[Req], pending: Optional["_Unsent"] = None) -> Optional[list[_Handle]]:
        """Register and send reqs, all or none (an id already in use refuses them all).
        Under the lock abort_request takes, so an abort is either seen here (``pending``:
        a stream aborted before its first read; returns None) or queued after the add."""
        handles = [_Handle(r, self.tokenizer) for r in reqs]
        with self._lock:
            if pending is not None:
                self._unsent.pop(reqs[0].rid, None)
                if pending.aborted:
                    return None
            self._check_alive()
            rids = [r.rid for r in reqs]
            dup = ([x for x in rids if x in self._handles or x in self._releasing]
                   or [x for x in rids if rids.count(x) > 1])
            if dup:
                raise InvalidRequest(f"request id {dup[0]!r} is already in use", "rid")
            for h in handles:
                self._handles[h.req.rid] = h
            for r in reqs:
                self._inbox.put(("add", r))
        return handles

    def _wait(self, h: _Handle) -> Iterator[dict]:
        try:
            while h.finished_reason is None:
                msg = h.q.get()
                if msg is _SHUT_DOWN:
                    raise EngineDead("the engine was shut down while this request ran")
                if isinstance(msg, BaseException):
                    raise EngineDead(f"the engine's scheduler died: {msg!r}") from msg
                h.absorb(msg)
                yield msg
        finally:
            self._drop(h)

    def _drop(self, h: _Handle) -> None:
        """The caller is done with h; an unfinished request is aborted (its KV freed)."""
        with self._lock:
            if self._handles.get(h.req.rid) is not h:
                return
            del self._handles[h.req.rid]
            if h.finished_reason is None and not self._closed:
                self._releasing.add(h.req.rid)
                self._inbox.put(("abort", h.req.rid))

    # ---- public API -------------------------------------------------------------------
    def generate(self, prompt: Union[str, list, None] = None, sampling_params=None,
                 input_ids=None, return_logprob: bool = False, logprob_start_len=None,
                 top_logprobs_num=None, stream: bool = False, rid=None):
        """One prompt -> one dict; a list of prompts -> a list of dicts; stream=True ->
        an iterator of dicts whose ``text`` is the text so far (SGLang's semantics).  A
        sampling parameter n > 1 gives n samples of each prompt, in a list (a prompt's n
        next to each other)."""
        batch = isinstance(prompt, list) or (isinstance(input_ids, list) and input_ids
                                             and isinstance(input_ids[0], list))
        if prompt is None and input_ids is None:
            raise InvalidRequest("give prompt or input_ids", "prompt")
        if prompt is not None and input_ids is not None:
            raise InvalidRequest("give prompt or input_ids, not both", "prompt")
        n_of = lambda sp: sp.get("n", 1) if isinstance(sp, dict) else getattr(sp, "n", 1)  # noqa: E731
        if batch and rid is not None:
            raise InvalidRequest("rid takes a single prompt", "rid")
        n1 = lax_int(n_of(sampling_params))
        if not batch and isinstance(n1, int) and not isinstance(n1, bool) and n1 > 1:
            batch, prompt, input_ids = True, (None if prompt is None else [prompt]), \
                (None if input_ids is None else [input_ids])
        if batch:
            n = len(prompt) if prompt is not None else len(input_ids)
            sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
            if len(sps) != n:
                raise InvalidRequest("sampling_params list length differs from the prompts", "sampling_params")
            if stream:
                raise InvalidRequest("stream=True takes a single prompt and n = 1", "stream")
            reqs = []
            for i in range(n):
                first = self._make_req(prompt[i] if prompt is not None else None,
                                       input_ids[i] if input_ids is not None else None, sps[i],
                                       return_logprob, logprob_start_len, top_logprobs_num,
                                       None if rid is None else f"{rid}-0")
                reqs.append(first)  # its n - 1 copies reuse its tokens
                reqs += [self._make_req(None, first.input_ids, copy_params(sps[i], j), return_logprob,
                                        logprob_start_len, top_logprobs_num,
                                        None if rid is None else f"{rid}-{j}")
                         for j in range(1, first.sampling.n)]
            handles = self._submit(reqs)
            try:
                for h in handles:
                    for _ in self._wait(h):
                        pass
            finally:  # interrupted: the rest are dropped (aborted), not left registered
                for h in handles:
                    self._drop(h)
            return [h.result() for h in handles]
        req = self._make_req(prompt, input_ids, sampling_params, return_logprob,
                             logprob_start_len, top_logprobs_num, rid)
        if stream:  # sent when the iteration starts: an iterator never read holds nothing
            pending = _Unsent()
            with self._lock:
                if req.rid in self._unsent:
                    raise InvalidRequest(f"request id {req.rid!r} is already in use", "rid")
                self._unsent[req.rid] = pending
            return self._stream(req, pending)
        h, = self._submit([req])
        for _ in self._wait(h):
            pass
        return h.result()

    def _stream(self, req: Req, pending: "_Unsent") -> Iterator[dict]:
        handles = self._submit([req], pending)
        if handles is None:  # aborted before its first read: never sent
            h = _Handle(req, self.tokenizer)
            h.meta = {"prompt_tokens": len(req.input_ids), "completion_tokens": 0, "cached_tokens": 0}
            h.finished_reason = {"type": "abort", "message": "aborted by request"}
            yield h.result()
            return
        h, = handles
        for _ in self._wait(h):
            out = h.result()
            if h.detok is not None:
                # never stream a prefix of a stop string that may still be trimmed
                h.detok.pop_delta(h.finished_reason is not None)
                out["text"] = h.detok.text[:h.detok.sent]
            yield out

    def abort_request(self, rid: str) -> None:
        """Abort by id; a request given rid R with n > 1 runs as R-0, R-1, ...: R aborts
        them all (as on the HTTP side)."""
        def copy_of(x):
            return x.startswith(rid + "-") and x[len(rid) + 1:].isdigit()

        with self._lock:  # see _submit
            copies = [x for x in self._handles if copy_of(x)]
            for x, pending in list(self._unsent.items()):
                if x == rid or copy_of(x):
                    pending.aborted = True
            for x in [rid, *copies]:
                self._inbox.put(("abort", x))

    def flush_cache(self) -> bool:
        return self._command(lambda done: ("flush_cache", done))

    def start_profile(self, output_dir: Optional[str] = None, num_steps: Optional[int] = None,
                      activities=None, record_shapes: bool = False, with_stack: bool = False) -> dict:
        """torch.profiler over the next num_steps scheduler steps (or until stop_profile);
        see portaserve.profiler.  Under tensor parallelism every rank writes its own trace;
        the summary returned is rank 0's."""
        return self._profile_command(("start_profile", dict(
            output_dir=output_dir, num_steps=num_steps, activities=activities, record_shapes=record_shapes,
            with_stack=with_stack)))

    def stop_profile(self) -> dict:
        """Stop, write the trace and the per-step-kind summary; returns their paths and
        the summary."""
        return self._profile_command(("stop_profile",))

    def _profile_command(self, cmd: tuple):
        """Through the inbox like a state change, so tensor-parallel ranks get it too."""
        return self._command(lambda done: (cmd[0], done, *cmd[1:]))

    def get_server_info(self) -> dict:
        self._check_alive()
        info = self.rt.info()
        info["kv"] = self._call(self.rt.scheduler.kv_stats)
        info["counters"] = dict(vars(self._call(lambda: self.rt.scheduler.counters)))
        return info

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if not self._thread.is_alive() and getattr(self.rt, "profiler", None) is not None:
            self.rt.profiler.stop_quietly()  # write what was profiled
        if not self._thread.is_alive() and getattr(self.rt, "model", None) is not None:
            # free the weights and the KV pool now, not when the last reference goes
            import gc

            grammar = self.rt.scheduler.grammar
            if grammar is not None:
                grammar.shutdown()
            self.rt.model = None
            self.rt.scheduler.model = None
            self.rt.scheduler.kv = None
            self.rt.scheduler.decode_graph = None
            self.rt.scheduler.req_pool = None  # and the attention providers' state kept per table
            gc.collect()
            self.rt.platform.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

    def __del__(self):  # pragma: no cover
        try:
            self._stop.set()
        except Exception:
            pass
