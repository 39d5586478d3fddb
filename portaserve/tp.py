"""Tensor parallelism across processes (SGLang's layout).

Every rank is one process driving one device.  Each holds its slice of the weights
(models/linear.py) and a full replica of the Scheduler; the replicas stay identical
because they see the same commands in the same order and decide deterministically
(``SchedulerConfig.deterministic``), and every rank computes the same full logits (the
vocabulary-parallel head gathers them) and so samples the same tokens.

Rank 0 is the driver: it runs in the process that receives requests (the in-process
Engine's thread, or the server's scheduler process).  Before each scheduler step it
broadcasts the commands it received since the last step (add / abort / flush_cache /
shutdown, and release_grammars: which constrained requests' grammars compiled on rank 0)
over a CPU (gloo) group; the other ranks ("followers") block on that broadcast, apply the
same commands and step too.  While idle, rank 0 keeps broadcasting empty lists (every
50-500 ms), so followers notice a vanished driver.

Processes: rank 0 (on node 0) spawns the other ranks of its node; on every other node
``portaserve serve --node-rank K`` spawns that node's ranks and waits.  Ranks meet at
``--dist-init-addr`` (a free local port when there is one node).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import socket
import sys
import time
from typing import Optional

import torch

logger = logging.getLogger("portaserve.tp")


def step_commands(sched, items) -> list:
    """What rank 0 broadcasts before a step: the inbox's state-changing commands, then
    the grammars that finished compiling on rank 0 (released here at once, on the other
    ranks when they apply the command)."""
    cmds = synced_commands(items)
    done = sched.compiled_grammars()
    if done:
        sched.release_grammars(done)
        cmds.append(("release_grammars", done))
    return cmds


def synced_commands(items) -> list:
    """The part of a driver loop's inbox that changes scheduler state, in arrival order,
    as the tuples every rank applies: ("add", req), ("abort", rid), ("flush_cache",),
    ("start_profile", options), ("stop_profile",), ("shutdown",).  Items are (kind,
    payload, ...); other kinds (queries answered by rank 0 alone) are left out, as are
    reply handles."""
    out = []
    for it in items:
        if it[0] in ("add", "abort"):
            out.append((it[0], it[1]))
        elif it[0] in ("flush_cache", "shutdown", "stop_profile"):
            out.append((it[0],))
        elif it[0] == "start_profile":  # (kind, reply handle, options): every rank profiles
            out.append((it[0], it[2] if len(it) > 2 else None))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_per_node(args) -> int:
    return args.tp_size // args.nnodes


def with_rendezvous(args):
    """args with dist_init_addr set (a free local port when not given)."""
    if args.dist_init_addr:
        return args
    return dataclasses.replace(args, dist_init_addr=f"127.0.0.1:{free_port()}")


def spawn_ranks(args, ranks) -> list:
    """Start follower processes for the given global ranks."""
    ctx = mp.get_context("spawn")
    procs = []
    for r in ranks:
        # not daemonic: rank 0 may itself be a daemonic process (the server's scheduler),
        # and followers exit on their own when the driver's broadcasts stop
        p = ctx.Process(target=run_follower, args=(args, r), name=f"portaserve-tp{r}")
        p.start()
        procs.append(p)
    return procs


class TPGroup:
    """This rank's membership: the control channel (broadcast of pickled commands over
    a gloo group) and, on rank 0, the follower processes it started."""

    def __init__(self, rank: int, size: int, control_group, procs: Optional[list] = None):
        self.rank, self.size = rank, size
        self.control = control_group
        self.procs = procs or []
        self._closed = False
        self._told_shutdown = False  # a broadcast already carried ("shutdown",)

    # ---- the command channel --------------------------------------------------------------
    def broadcast_commands(self, cmds: Optional[list]) -> list:
        """Rank 0 passes its commands and gets them back; followers pass None and get
        rank 0's.  Length first, then the pickled bytes (SGLang's broadcast_pyobj)."""
        import torch.distributed as dist

        if self.rank == 0:
            self._told_shutdown |= any(c[0] == "shutdown" for c in cmds or [])
            data = pickle.dumps(cmds or [])
            n = torch.tensor([len(data)], dtype=torch.long)
            dist.broadcast(n, 0, group=self.control)
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.control)
            return cmds or []
        n = torch.zeros(1, dtype=torch.long)
        dist.broadcast(n, 0, group=self.control)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.control)
        return pickle.loads(buf.numpy().tobytes())

    def gather_object(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def min_int(self, v: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([v], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    # ---- teardown -------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Leave the group.  Rank 0 first tells the followers to exit; then every rank
        tears the process group down at the same time (NCCL's teardown waits for the
        peers), and rank 0 waits for its follower processes."""
        if self._closed:
            return
        self._closed = True
        if self.rank == 0 and not self._told_shutdown:
            try:
                self.broadcast_commands([("shutdown",)])
            except Exception as e:  # a follower already died
                logger.warning("could not reach the other ranks at shutdown: %s", e)
        _leave_process_group(timeout_s)
        if self.rank == 0:
            deadline = time.monotonic() + timeout_s
            for p in self.procs:
                p.join(max(0.1, deadline - time.monotonic()))
                if p.is_alive():
                    logger.warning("rank process %s did not exit; terminating it", p.name)
                    p.terminate()
                    p.join(5)
                if p.is_alive():
                    p.kill()
        logger.info("rank %d left the tensor-parallel group", self.rank)


    def abort(self) -> None:
        """Rank 0 failed part-way through startup: stop the followers without the
        goodbye (they may be waiting in another collective)."""
        if self._closed:
            return
        self._closed = True
        for p in self.procs:
            p.kill()
            p.join(5)
        _leave_process_group(5.0)


def _leave_process_group(timeout_s: float) -> None:
    import threading

    import torch.distributed as dist

    from portaserve.core.parallel import reset_tp

    reset_tp()
    if not dist.is_initialized():
        return
    if dist.get_backend() != "gloo":
        # NCCL's teardown (destroy and abort alike) hung 30 s on both ranks of an H200 pair
        # with every rank past its last collective and the device idle, and a teardown
        # thread still blocked at interpreter exit aborts the process.  The communicators
        # are left to process exit instead (a rank process exits right after this; a
        # second tensor-parallel engine in the same process is refused up front by
        # check_no_process_group).
        logger.info("leaving the %s process group to process exit", dist.get_backend())
        return

    def destroy():
        try:
            dist.destroy_process_group()
        except Exception as e:
            logger.warning("process group teardown failed: %s", e)

    t = threading.Thread(target=destroy, daemon=True, name="portaserve-pg-teardown")
    t.start()
    t.join(timeout_s)
    if t.is_alive():  # never hang an exiting server on a communicator
        logger.warning("process group teardown did not finish in %.0f s; continuing", timeout_s)


def check_no_process_group() -> None:
    """A rank joins with a fresh torch.distributed state.  An NCCL group outlives its
    engine (see _leave_process_group), so a second tensor-parallel engine in one process
    is refused here, before any rank starts, rather than failing inside init."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            f"torch.distributed is already initialized in this process (backend "
            f"{dist.get_backend()}): an earlier tensor-parallel engine's NCCL communicators "
            "stay until the process exits, or the caller set up a group; start the "
            "tensor-parallel engine in a new process")


def join(args, platform, rank: int, procs: Optional[list] = None) -> TPGroup:
    """Join the tensor-parallel group as ``rank``: bind the device, init the process
    group with the platform's backend, set the model-side TP state."""
    import datetime

    import torch.distributed as dist

    from portaserve.core.parallel import set_tp
    from portaserve.platforms.communicator import CommConfig, Communicator, init_distributed

    reasons = Communicator.validate(CommConfig(args.tp_size, platform.dist_backend))
    if reasons:
        raise RuntimeError(f"tensor parallelism on {platform.name}: " + "; ".join(reasons))
    platform.bind_device(rank % ranks_per_node(args))
    host, port = args.dist_init_addr.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), args.tp_size, rank == 0,
                          timeout=datetime.timedelta(seconds=args.dist_timeout), wait_for_workers=False)
    if rank == 0:
        _wait_for_ranks(store, args.tp_size, procs or [], args.dist_timeout)
    else:
        store.set(f"portaserve/up/{rank}", "1")
    init_distributed(platform, rank, args.tp_size, store=store, timeout_s=args.dist_timeout)
    control = dist.group.WORLD if platform.dist_backend == "gloo" else dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=args.dist_timeout))
    set_tp(rank, args.tp_size, None)
    return TPGroup(rank, args.tp_size, control, procs)


def _wait_for_ranks(store, world: int, procs: list, timeout_s: float) -> None:
    """Rank 0: wait until every other rank has reached the rendezvous, failing at once
    (instead of after the whole timeout) when a rank process this node started dies."""
    keys = [f"portaserve/up/{r}" for r in range(1, world)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        for p in procs:
            if p.exitcode is not None:
                raise RuntimeError(f"tensor-parallel rank process {p.name} exited with code "
                                   f"{p.exitcode} during startup (its log is above)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every tensor-parallel rank joined within {timeout_s:.0f} s")
        time.sleep(0.05)


# ---- followers ------------------------------------------------------------------------------
def run_follower(args, rank: int) -> None:
    """Entry point of a rank > 0: build the same runtime, then mirror rank 0's steps."""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format=f"[%(asctime)s tp{rank}] %(message)s", datefmt="%H:%M:%S")
    from portaserve.runtime import build_runtime

    try:
        rt = build_runtime(args, tp_rank=rank)
    except BaseException as e:
        logger.error("rank %d failed to start: %s", rank, e)
        raise
    follow(rt)
    logger.info("rank %d exiting", rank)
    # skip interpreter teardown of CUDA graphs / communicators (it can block on the
    # device); everything this process owns dies with it
    logging.shutdown()
    os._exit(0)


def follow(rt) -> None:
    sched = rt.scheduler
    tp = rt.tp
    try:
        while True:
            try:
                cmds = tp.broadcast_commands(None)
            except Exception as e:  # rank 0 is gone
                logger.warning("rank %d: lost the driver (%s); exiting", tp.rank, e)
                return
            stop = False
            for c in cmds:
                if c[0] == "shutdown":
                    stop = True
                elif c[0] in ("start_profile", "stop_profile"):
                    _follow_profile(rt.profiler, c)
                else:
                    apply_command(sched, c)
            if stop:
                return
            if sched.has_work():
                sched.step()
    finally:
        rt.profiler.stop_quietly()  # however it ends: write what was profiled (see _loop)
        tp.shutdown()


def _follow_profile(profiler, cmd) -> None:
    """Rank 0's /start_profile or /stop_profile on this rank (its own trace file); rank 0
    answers the caller, so errors here are only logged."""
    try:
        if cmd[0] == "start_profile":
            profiler.start(**(cmd[1] or {}))
        else:
            profiler.stop_quietly()
    except Exception as e:  # noqa: BLE001
        logger.error("rank %d: %s failed: %s", profiler.rank, cmd[0], e)


def apply_command(sched, cmd):
    """Apply one synced command to a scheduler; returns what rank 0 reports back."""
    kind = cmd[0]
    if kind == "add":
        return sched.add_request(cmd[1])
    if kind == "abort":
        return sched.abort(cmd[1])
    if kind == "flush_cache":
        return sched.flush_cache()
    if kind == "release_grammars":
        return sched.release_grammars(cmd[1])
    raise ValueError(f"unknown command {kind!r}")


def run_node(args) -> None:
    """A node other than 0: start this node's ranks and wait for them."""
    per = ranks_per_node(args)
    first = args.node_rank * per
    procs = spawn_ranks(args, range(first, first + per))
    logger.info("node %d: started ranks %d..%d, joining %s", args.node_rank, first,
                first + per - 1, args.dist_init_addr)
    code = 0
    for p in procs:
        p.join()
        code = code or p.exitcode or 0
    sys.exit(code)


class Driver:
    """Drive rank 0's scheduler from a script (benchmarks) while keeping the other
    ranks in step; with one rank it is a thin wrapper over the scheduler."""

    def __init__(self, rt):
        self.sched, self.tp = rt.scheduler, rt.tp
        self._pending: list = []

    def add_request(self, req) -> None:
        self._pending.append(("add", req))

    def has_work(self) -> bool:
        return bool(self._pending) or self.sched.has_work()

    def _sync(self) -> None:
        cmds, self._pending = self._pending, []
        for c in cmds:
            apply_command(self.sched, c)
        if self.tp is not None:
            self.tp.broadcast_commands(cmds + step_commands(self.sched, []))

    def step(self) -> list:
        """One broadcast of the pending commands, then one step: what every rank does."""
        self._sync()
        return self.sched.step() if self.sched.has_work() else []

    def flush_cache(self) -> bool:
        if self.has_work():
            raise RuntimeError("flush_cache needs an idle scheduler")
        self._pending.append(("flush_cache",))
        self.step()  # the flush travels like any command; there is nothing to step
        return True

    @property
    def prefilling(self) -> bool:
        """Requests still to be (or being) prefilled, counting ones not yet sent."""
        return bool(self._pending or self.sched.waiting or self.sched.chunked)

    def shutdown(self) -> None:
        if self.tp is not None:
            self.tp.shutdown()
