"""The scheduler process: owns the model, the KV pool and the Scheduler.

Started by the HTTP process with multiprocessing's ``spawn``.  It talks to the HTTP
process over two ZMQ ipc:// sockets:

  HTTP --PUSH--> [in]  ("add", Req) | ("abort", rid) | ("flush_cache", token)
                       | ("stats", token) | ("start_profile", token, options)
                       | ("stop_profile", token) | ("shutdown",)
  HTTP <--PULL-- [out] {"ready": {...}} | {"error": msg}        (once, at startup)
                       ("out", [delta message, ...])            (after every step)
                       ("reply", token, payload)                (answers to commands)
                       ("fatal", msg)                           (just before dying)

The loop drains the input (without blocking while there is work, with a short blocking
poll when idle), runs one ``scheduler.step()`` and pushes the deltas of every request
the step touched (``engine.make_output_message``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import traceback

logger = logging.getLogger("portaserve.scheduler")

IDLE_POLL_MS = 500


def _parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def run_scheduler_process(args, in_addr: str, out_addr: str, parent_pid: int) -> None:
    import zmq

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="[%(asctime)s scheduler] %(message)s", datefmt="%H:%M:%S")
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.setsockopt(zmq.RCVHWM, 0)
    recv.connect(in_addr)
    send = ctx.socket(zmq.PUSH)
    send.setsockopt(zmq.SNDHWM, 0)
    send.setsockopt(zmq.LINGER, 2000)
    send.connect(out_addr)

    try:
        from portaserve.runtime import build_runtime

        rt = build_runtime(args)
    except BaseException as e:  # report why instead of dying silently
        logger.error("startup failed: %s", e, exc_info=args.log_level == "debug")
        send.send_pyobj({"error": f"{type(e).__name__}: {e}"})
        _close(ctx, recv, send)
        sys.exit(1)

    limits = dataclasses.asdict(rt.limits())
    send.send_pyobj({"ready": {"info": rt.info(), "limits": limits, "report": rt.startup_report(),
                               "model_type": rt.model_config.model_type}})
    try:
        _loop(rt, recv, send, parent_pid)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        logger.error("scheduler loop crashed:\n%s", traceback.format_exc())
        try:
            send.send_pyobj(("fatal", f"the scheduler crashed: {type(e).__name__}: {e}"))
        except Exception:
            pass
        _close(ctx, recv, send)
        sys.exit(1)
    _close(ctx, recv, send)


def _close(ctx, recv, send) -> None:
    """Close both sockets, then the context: ctx.term() waits for every socket, so one
    left open kept a crashed scheduler process (and its device memory) alive for good."""
    send.close(linger=1000)  # the last message (an error, a fatal) still reaches the HTTP side
    recv.close(linger=0)
    ctx.term()


def _stats(rt) -> dict:
    sched = rt.scheduler
    c = sched.counters
    return {
        "kv": sched.kv_stats(),
        "counters": dict(vars(c)),
        "num_waiting": max(0, sched.num_requests() - len(sched.running)),
        "num_running": len(sched.running),
        "cache_hit_rate": c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
    }


def _profile_command(profiler, kind: str, options: dict = None) -> dict:
    """{"ok": result} or {"error": why, "status": 400 (a bad request) or 500}; never raises:
    a profiler failure must not take the scheduler down."""
    from portaserve.profiler import ProfileError

    try:
        if kind == "start_profile":
            return {"ok": profiler.start(**(options or {}))}
        return {"ok": profiler.stop()}
    except ProfileError as e:
        msg = str(e)
        if kind == "stop_profile" and profiler.last is not None:
            msg += f"; the last profile was written to {profiler.last['trace']}"
        return {"error": msg, "status": 400}
    except Exception as e:  # noqa: BLE001 - reported to the caller, the scheduler goes on
        logger.exception("profiler %s failed", kind)
        return {"error": f"the profiler failed: {type(e).__name__}: {e}", "status": 500}


def _loop(rt, recv, send, parent_pid: int) -> None:
    try:
        _serve(rt, recv, send, parent_pid)
    finally:
        # however the loop ends (shutdown, the HTTP process gone, a crash): write what was
        # profiled; a profiler left running crashes torch's exit handlers (SIGSEGV)
        rt.profiler.stop_quietly()
        if rt.tp is not None:  # tell the other tensor-parallel ranks to exit
            rt.tp.shutdown()


def _serve(rt, recv, send, parent_pid: int) -> None:
    import zmq

    from portaserve.engine import make_output_message, output_due
    from portaserve.tp import step_commands

    sched = rt.scheduler
    sent: dict = {}
    every = rt.args.stream_interval
    poller = zmq.Poller()
    poller.register(recv, zmq.POLLIN)
    last_parent_check = time.monotonic()
    while True:
        busy = sched.has_work()
        if not busy:
            # idle: wait for input (under tensor parallelism the empty broadcast below
            # doubles as the followers' heartbeat)
            events = dict(poller.poll(IDLE_POLL_MS))
            if recv not in events:
                if not _parent_alive(parent_pid):
                    logger.warning("the HTTP process is gone; exiting")
                    return
                if rt.tp is not None:
                    rt.tp.broadcast_commands([])
                continue
        elif time.monotonic() - last_parent_check > 2.0:
            last_parent_check = time.monotonic()
            if not _parent_alive(parent_pid):
                logger.warning("the HTTP process is gone; exiting")
                return
        items = []
        while True:
            try:
                items.append(recv.recv_pyobj(zmq.NOBLOCK))
            except zmq.Again:
                break
        if rt.tp is not None:  # every rank applies the same commands, then steps (or stops)
            rt.tp.broadcast_commands(step_commands(sched, items))
        outs = []
        for item in items:
            kind = item[0]
            if kind == "add":
                sched.add_request(item[1])
            elif kind == "abort":
                r = sched.abort(item[1])
                if r is not None:
                    outs.append(make_output_message(r, sent))
            elif kind == "flush_cache":
                send.send_pyobj(("reply", item[1], sched.flush_cache()))
            elif kind == "stats":
                send.send_pyobj(("reply", item[1], _stats(rt)))
            elif kind in ("start_profile", "stop_profile"):
                send.send_pyobj(("reply", item[1], _profile_command(rt.profiler, kind, *item[2:])))
            elif kind == "shutdown":
                return
            else:
                logger.error("unknown command %r", kind)
        if sched.has_work():
            for r in sched.step():
                if output_due(r, sent, every):
                    outs.append(make_output_message(r, sent))
        if outs:
            send.send_pyobj(("out", outs))
