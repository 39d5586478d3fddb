"""The HTTP process's side of the process layout (SGLang's TokenizerManager).

It starts the scheduler process, receives its handshake, sends it requests and
commands over ZMQ, and turns the per-step deltas it sends back into per-request state:
token ids, incrementally detokenized text, logprobs, meta info.  A watchdog notices the
scheduler process dying: every request in flight gets an error and the server is told to
exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import zmq
import zmq.asyncio

from portaserve.core.detokenize import IncrementalDetokenizer
from portaserve.core.request import Req
from portaserve.core.request_builder import Limits
from portaserve.core.sampling_params import SamplingParams

logger = logging.getLogger("portaserve.server")
_DEFAULT_SAMPLING = SamplingParams().to_dict()  # --log-requests shows what differs


class SchedulerDead(RuntimeError):
    pass


class Overloaded(RuntimeError):
    pass


class ReqState:
    """Everything the HTTP side knows about one request in flight."""

    def __init__(self, req: Req, tokenizer, event: asyncio.Event):
        self.req = req
        self.rid = req.rid
        sp = req.sampling
        self.detok = IncrementalDetokenizer(tokenizer, sp.skip_special_tokens,
                                            sp.spaces_between_special_tokens, sp.stop_strs,
                                            sp.no_stop_trim) if tokenizer is not None else None
        self.event = event
        self.output_ids: list[int] = []
        self.meta: dict = {"prompt_tokens": len(req.input_ids), "completion_tokens": 0,
                           "cached_tokens": 0}
        self.logprobs = {"input_token_logprobs": [], "input_top_logprobs": [],
                         "output_token_logprobs": [], "output_top_logprobs": []}
        self.finished_reason: Optional[dict] = None
        self.error: Optional[str] = None
        self.created = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None
        # consumer-side cursors (streaming)
        self.sent_ids = 0
        self.sent_olp = 0
        self.sent_ilp = 0

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None or self.error is not None

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    def absorb(self, msg: dict) -> None:
        self.output_ids.extend(msg["new_ids"])
        if self.detok is not None:
            self.detok.feed(msg["new_ids"], msg["finished_reason"])
        for k in self.logprobs:
            if k in msg:
                self.logprobs[k].extend(msg[k])
        self.meta.update(msg["meta"])
        if msg["finished_reason"] is not None:
            self.finished_reason = msg["finished_reason"]

    def fail(self, message: str) -> None:
        self.error = message
        self.event.set()


def _is_copy(rid: str, name: str) -> bool:
    """rid is name, or one of the requests a request named name runs as: choice k
    "<name>-<k>", prompt i of a batch "<name>-<i>", its choice k "<name>-<i>-<k>"."""
    if rid == name:
        return True
    rest = rid[len(name) + 1:].split("-") if rid.startswith(name + "-") else [""]
    return len(rest) <= 2 and all(p.isdigit() for p in rest)


class SchedulerClient:
    def __init__(self, args, metrics=None):
        self.args = args
        self.metrics = metrics
        self.tokenizer = None
        self.limits: Optional[Limits] = None
        self.info: dict = {}
        self.report = ""
        self.model_type = None
        self.states: dict[str, ReqState] = {}
        self.releasing: set[str] = set()  # ids released unfinished, their last message not yet in
        # requests being built (see building_request): the ids each body names, and the
        # ids /abort_request named for it meanwhile
        self.building: list[tuple[list[str], set[str]]] = []
        # constraint checks requests await before their build (common.check_constraints):
        # those still queued are dropped at close
        self.checks: set = set()
        self.num_inflight = 0  # submitted, not yet finished in the scheduler
        self.pending: dict[str, asyncio.Future] = {}
        self.dead: Optional[str] = None
        self.on_death: Optional[Callable[[str], None]] = None
        self.proc = None
        self._tmpdir = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.started = int(time.time())
        # Turning a request body into Reqs (tokenizing, chat templates, grammar checks) runs
        # on this one worker thread, not on the event loop: a multi-megabyte prompt takes
        # seconds to tokenize, and /health and every stream would wait that long.  One thread:
        # requests are built in arrival order, and the tokenizer is never used from two
        # builders at once.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portaserve-build")

    # ---- startup ------------------------------------------------------------------------
    async def start(self) -> None:
        from portaserve.server.scheduler_process import run_scheduler_process

        self._tmpdir = tempfile.mkdtemp(prefix="portaserve-ipc-")
        in_addr = f"ipc://{self._tmpdir}/in"
        out_addr = f"ipc://{self._tmpdir}/out"
        self._sync_ctx = zmq.Context()
        self._send = self._sync_ctx.socket(zmq.PUSH)
        self._send.setsockopt(zmq.SNDHWM, 0)
        self._send.setsockopt(zmq.LINGER, 0)
        self._send.bind(in_addr)
        self._actx = zmq.asyncio.Context()
        self._recv = self._actx.socket(zmq.PULL)
        self._recv.setsockopt(zmq.RCVHWM, 0)
        self._recv.setsockopt(zmq.LINGER, 0)
        self._recv.bind(out_addr)

        ctx = mp.get_context("spawn")
        self.proc = ctx.Process(target=run_scheduler_process, name="portaserve-scheduler",
                                args=(self.args, in_addr, out_addr, os.getpid()),
                                # a daemonic process may not start the tensor-parallel ranks
                                daemon=self.args.tp_size == 1)
        self.proc.start()
        logger.info("scheduler process started (pid %d); loading the model", self.proc.pid)
        while True:
            if await self._recv.poll(500):
                msg = await self._recv.recv_pyobj()
                break
            if not self.proc.is_alive():
                raise RuntimeError(f"the scheduler process exited with code {self.proc.exitcode} "
                                   "during startup (see its log above)")
        if "error" in msg:
            self.proc.join(timeout=10)
            raise RuntimeError(f"the scheduler process failed to start: {msg['error']}")
        ready = msg["ready"]
        self.info = ready["info"]
        self.limits = Limits(**ready["limits"])
        self.report = ready["report"]
        self.model_type = ready.get("model_type")
        self.tokenizer = await asyncio.get_running_loop().run_in_executor(None, self._load_tokenizer)
        self._tasks = [asyncio.create_task(self._recv_loop(), name="portaserve-recv"),
                       asyncio.create_task(self._watchdog(), name="portaserve-watchdog")]

    def _load_tokenizer(self):
        if self.args.skip_tokenizer_init:
            return None
        from portaserve.models.loader import load_tokenizer, resolve_model_path

        a = self.args
        tok = load_tokenizer(resolve_model_path(a.model_path, revision=a.revision), a.tokenizer_path,
                             trust_remote_code=a.trust_remote_code, tokenizer_mode=a.tokenizer_mode,
                             chat_template=a.chat_template)
        # transformers clears a truncation or padding setting of the tokenizer file on the
        # first encode, a mutation of the Rust tokenizer that must not race a decode on the
        # event loop while the request-building thread encodes: do it now
        tok.encode("portaserve")
        return tok

    async def off_loop(self, fn: Callable, *args):
        """fn(*args) on the request-building thread; its exceptions are re-raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._builder, fn, *args)

    # ---- background tasks ---------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            try:
                obj = await self._recv.recv_pyobj()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            kind = obj[0]
            if kind == "out":
                now = time.perf_counter()
                for msg in obj[1]:
                    try:
                        self._on_output(msg, now)
                    except Exception as e:  # noqa: BLE001 - fail this request; the loop serves the rest
                        self._fail_one(msg["rid"], e)
            elif kind == "reply":
                fut = self.pending.pop(obj[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(obj[2])
            elif kind == "fatal":
                self._die(obj[1])

    def _fail_one(self, rid: str, e: Exception) -> None:
        """Processing one request's output failed (detokenizing, a metric): that request
        ends with an error and is aborted in the scheduler; every other goes on."""
        logger.exception("request %s: processing its output failed", rid)
        st = self.states.get(rid)
        if st is None or st.error is not None:
            return
        if st.finished_time is not None:  # counted out already; the failure came after (a metric)
            st.event.set()
            return
        if st.finished_reason is not None:  # it had finished in the scheduler: count it out here
            st.finished_time = time.perf_counter()
            self.num_inflight -= 1
        elif self.dead is None:
            self._send.send_pyobj(("abort", rid))
        st.fail(f"processing the output failed: {type(e).__name__}: {e}")

    def _on_output(self, msg: dict, now: float) -> None:
        if msg["rid"] in self.releasing:
            if msg["finished_reason"] is not None:
                self.releasing.discard(msg["rid"])
            return
        st = self.states.get(msg["rid"])
        if st is None or st.finished:
            return
        n_new = len(msg["new_ids"])
        st.absorb(msg)
        if n_new:
            if st.first_token_time is None:
                st.first_token_time = now
                if self.metrics:
                    self.metrics.ttft.observe(now - st.created)
                    if n_new > 1:
                        self.metrics.observe_itl(0.0, n_new - 1)
            elif self.metrics:
                self.metrics.observe_itl((now - st.last_token_time) / n_new, n_new)
            st.last_token_time = now
        if st.finished_reason is not None:
            st.finished_time = now
            self.num_inflight -= 1
            if self.metrics:
                self.metrics.on_finish(st, now)
            if self.args.log_requests:
                ttft = "" if st.first_token_time is None else f", first token after {st.first_token_time - st.created:.3f} s"
                logger.info("request %s finished: %s, %d prompt + %d output tokens (%d cached), %.3f s%s",
                            st.rid, json.dumps(st.finished_reason), st.meta["prompt_tokens"], len(st.output_ids),
                            st.meta["cached_tokens"], now - st.created, ttft)
        st.event.set()

    async def _watchdog(self) -> None:
        while self.dead is None and not self._closing:
            await asyncio.sleep(0.2)
            if self._closing:
                return
            if not self.proc.is_alive():
                self._die(f"the scheduler process died (exit code {self.proc.exitcode})")

    def _die(self, message: str) -> None:
        if self.dead is not None:
            return
        self.dead = message
        logger.error("%s; failing %d request(s) in flight", message, len(self.states))
        for st in list(self.states.values()):
            if not st.finished:
                st.fail(message)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(SchedulerDead(message))
        self.pending.clear()
        if self.on_death is not None:
            self.on_death(message)

    # ---- requests -----------------------------------------------------------------------
    @property
    def num_queued(self) -> int:
        return max(0, self.num_inflight - self.args.max_running_requests)

    def check_capacity(self, k: int) -> None:
        if self.dead is not None:
            raise SchedulerDead(self.dead)
        mq = self.args.max_queued_requests
        if mq is not None and self.num_inflight + k - self.args.max_running_requests > mq:
            raise Overloaded(f"the server is overloaded: {self.num_queued} requests are queued "
                             f"(--max-queued-requests {mq}); retry later")

    def submit(self, reqs: list[Req], event: Optional[asyncio.Event] = None,
               aborted: Optional[set] = None) -> list[ReqState]:
        """Register and send reqs (all or none); they share one wake-up event.  aborted:
        the ids an /abort_request named while they were being built (building_request)."""
        self.check_capacity(len(reqs))
        rids = [r.rid for r in reqs]
        dup = [r for r in rids if r in self.states or r in self.releasing]
        if dup or len(set(rids)) != len(rids):
            from portaserve.server.errors import bad_request

            raise bad_request(f"request id {(dup or rids)[0]!r} is already in use", "rid")
        event = event or asyncio.Event()
        states = []
        for r in reqs:
            st = ReqState(r, self.tokenizer, event)
            self.states[r.rid] = st
            states.append(st)
        self.num_inflight += len(reqs)
        if self.metrics:
            self.metrics.requests_in.inc(len(reqs))
        for r in reqs:
            self._send.send_pyobj(("add", r))
            if aborted and any(_is_copy(r.rid, a) for a in aborted):
                self._send.send_pyobj(("abort", r.rid))  # ends it "abort", as if sent now
            if self.args.log_requests:
                sp = {k: v for k, v in r.sampling.to_dict().items() if v != _DEFAULT_SAMPLING.get(k)}
                logger.info("request %s: %d prompt tokens, sampling %s", r.rid, len(r.input_ids),
                            json.dumps(sp, default=str))
        return states

    def release(self, st: ReqState) -> None:
        """The consumer is done with st: forget it, aborting it if it is still running."""
        if self.states.get(st.rid) is not st:
            return
        del self.states[st.rid]
        if st.finished_reason is None:
            if st.error is None:
                self.num_inflight -= 1
                if self.metrics:  # it ends here for the HTTP side: finished, as an abort
                    self.metrics.finished.inc()
                    self.metrics.aborted.inc()
                if self.dead is None:
                    self._send.send_pyobj(("abort", st.rid))
                    # its last message (the abort, or a finish already on its way) is still
                    # to come: until then the id stays taken, or a new request reusing it
                    # (a client's retry) would receive the old one's tokens
                    self.releasing.add(st.rid)
            else:
                self.num_inflight -= 1

    def abort(self, rid: str) -> bool:
        """Abort by id (the /abort_request endpoint); the waiter sees finish_reason abort.
        A request given rid R with several choices or prompts runs as R-0, R-1, ... (R-i-k
        for choice k of prompt i): naming R aborts them all (SGLang matches ids by prefix;
        only R-<number>... counts here, so aborting "1" leaves "12" alone)."""
        if self.dead is not None:
            return False
        copies = [s for s in self.states if s != rid and _is_copy(s, rid)]
        for r in [rid, *copies]:
            self._send.send_pyobj(("abort", r))
        for names, aborted in self.building:  # still being built: submit aborts it (or the copy named)
            if any(_is_copy(x, rid) or _is_copy(rid, x) for x in names):
                aborted.add(rid)
        return rid in self.states or bool(copies)

    @contextlib.contextmanager
    def building_request(self, rid):
        """Around building and submitting a request whose body names rid (a string, a list
        of them, or None): yields the set of ids an /abort_request names for it meanwhile
        (tokenizing a long prompt takes seconds), for submit(aborted=) to apply."""
        names = [rid] if isinstance(rid, str) else [x for x in rid if isinstance(x, str)] \
            if isinstance(rid, list) else []
        entry = (names, set())
        if names:
            self.building.append(entry)
        try:
            yield entry[1]
        finally:
            if names:
                self.building = [e for e in self.building if e is not entry]

    async def call(self, cmd: str, *args, timeout: float = 30.0):
        if self.dead is not None:
            raise SchedulerDead(self.dead)
        token = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.pending[token] = fut
        self._send.send_pyobj((cmd, token, *args))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(token, None)

    # ---- shutdown -----------------------------------------------------------------------
    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        self._builder.shutdown(wait=False, cancel_futures=True)
        for fut in list(self.checks):
            fut.cancel()
        if self.proc is not None and self.proc.is_alive():
            try:
                self._send.send_pyobj(("shutdown",))
            except zmq.ZMQError:
                pass
            for _ in range(50):
                if not self.proc.is_alive():
                    break
                await asyncio.sleep(0.1)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
        for s in (getattr(self, "_send", None), getattr(self, "_recv", None)):
            if s is not None:
                s.close(linger=0)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
