"""torch.profiler over a window of scheduler steps: SGLang's /start_profile and
/stop_profile, Engine.start_profile/stop_profile and `bench offline --profile`.

Each scheduler step runs under a ``record_function`` range; once it has run, the step's
kind (extend, mixed, decode, or resolve: a step that only read back a launched decode)
is known from ``Scheduler.last_step``.  On stop the profiler writes

  <dir>/<stamp>-pid<P>-rank<R>.trace.json.gz  the Chrome/Perfetto trace
  <dir>/<stamp>-pid<P>-rank<R>.summary.txt    the summary below

and the summary gives, per step kind: the number of steps, their wall time, and the
device time of the kernels they launched (attributed by launch, so with the overlap
scheduler a decode step's kernels count in the step that launched them), with the top
kernels of each kind.  Under tensor parallelism every rank writes its own files (the
commands travel with the scheduler's synced commands); callers get rank 0's answer.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections import defaultdict
from typing import Optional

import torch

logger = logging.getLogger("portaserve")

ENV_DIR = "PORTASERVE_TORCH_PROFILER_DIR"  # SGLang: SGLANG_TORCH_PROFILER_DIR
STEP_LABEL = "portaserve.step"


class ProfileError(ValueError):
    """A bad profiler request (already running, not running, bad option)."""


class StepProfiler:
    def __init__(self, sched, activities=("cpu",), rank: int = 0):
        self.sched = sched
        self.available = tuple(activities)
        self.rank = rank
        self.prof = None
        self.steps: list = []  # (mode, wall seconds) per profiled step
        self.num_steps: Optional[int] = None
        self.output_dir = ""
        self.last: Optional[dict] = None  # what the last stop wrote and found
        self._installed = False  # our wrapper is in the scheduler's step chain

    @property
    def active(self) -> bool:
        return self.prof is not None

    def start(self, output_dir: Optional[str] = None, num_steps: Optional[int] = None,
              activities=None, record_shapes: bool = False, with_stack: bool = False) -> dict:
        from torch.profiler import ProfilerActivity, profile

        if self.active:
            raise ProfileError("the profiler is already running; stop it first")
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool)
                                      or num_steps < 1):
            raise ProfileError(f"num_steps must be a positive integer, got {num_steps!r}")
        acts = list(activities) if activities else list(self.available)
        if not all(isinstance(a, str) for a in acts):
            raise ProfileError(f"activities must be a list of names, got {activities!r}")
        names = {a.lower() for a in acts}
        if len(names) != len(acts):
            raise ProfileError(f"activities must be distinct, got {activities!r}")
        unknown = sorted(names - set(self.available))
        if unknown:
            raise ProfileError(f"activities {unknown} are not available on this platform "
                               f"(available: {list(self.available)})")
        if "cpu" not in names:  # the step ranges and kernel launches are CPU events
            raise ProfileError(f"activities must include 'cpu' (the steps are timed there), got {activities!r}")
        output_dir = output_dir or os.environ.get(ENV_DIR) or "/tmp/portaserve-profile"
        try:
            os.makedirs(output_dir, exist_ok=True)
        except (OSError, ValueError) as e:
            raise ProfileError(f"cannot create the output directory {output_dir!r}: {e}") from None
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise ProfileError(f"the output directory {output_dir!r} is not writable")
        kinds = {"cpu": ProfilerActivity.CPU, "cuda": ProfilerActivity.CUDA}
        if hasattr(ProfilerActivity, "XPU"):
            kinds["xpu"] = ProfilerActivity.XPU
        # with_stack: Python function events too (slower steps), summarised per kind
        prof = profile(activities=[kinds[n] for n in sorted(names)], record_shapes=record_shapes,
                       with_stack=with_stack)
        prof.__enter__()
        self.prof = prof
        self.steps, self.num_steps, self.output_dir = [], num_steps, output_dir
        if not self._installed:  # else still in the chain from before, passing through
            # wrap whatever step is in place (a benchmark's step timer, or the method)
            self._outer = self.sched.__dict__.get("step")
            self._inner = self.sched.step
            self._wrapper = self._step  # one bound method, to recognise it later
            self.sched.step = self._wrapper
            self._installed = True
        logger.info("profiler started (%s, %s steps) -> %s", sorted(names), num_steps or "until stop", output_dir)
        return {"output_dir": output_dir, "num_steps": num_steps, "activities": sorted(names)}

    def _step(self):
        if not self.active:  # stopped while wrapped by a later wrapper: pass through
            return self._inner()
        t = time.perf_counter()
        try:
            # the step's index in the range's name: the summary matches ranges to steps by it
            with torch.profiler.record_function(f"{STEP_LABEL}#{len(self.steps)}"):
                out = self._inner()
        except BaseException:
            self.stop_quietly()  # keep the trace of what led here; the error goes on
            raise
        mode = self.sched.last_step.mode
        self.steps.append(("resolve" if mode == "idle" else mode, time.perf_counter() - t))
        if self.num_steps is not None and len(self.steps) >= self.num_steps:
            self.stop_quietly()  # a failed write must not fail the step (or the engine)
        return out

    def stop_quietly(self) -> None:
        """Stop if running (shutdown, a failing step, num_steps reached); errors logged."""
        if self.active:
            try:
                self.stop()
            except Exception as e:  # noqa: BLE001 - logged, and the profiler is off
                logger.error("profiler: stopping failed: %s", e)

    def stop(self) -> dict:
        if not self.active:
            raise ProfileError("the profiler is not running")
        prof, self.prof = self.prof, None
        if self.sched.__dict__.get("step") is self._wrapper:  # else wrapped again since: passes through
            if self._outer is None:
                del self.sched.step  # the bound method again
            else:
                self.sched.step = self._outer
            self._installed = False
        prof.__exit__(None, None, None)
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        base = os.path.join(self.output_dir, f"{stamp}-pid{os.getpid()}-rank{self.rank}")
        n = 1
        while os.path.exists(base + ".trace.json.gz"):  # two profiles within a millisecond
            n += 1
            base = os.path.join(self.output_dir, f"{stamp}.{n}-pid{os.getpid()}-rank{self.rank}")
        trace = base + ".trace.json.gz"
        try:
            prof.export_chrome_trace(base + ".trace.json")
            with open(base + ".trace.json", "rb") as f:
                raw = f.read()
            os.remove(base + ".trace.json")
            with gzip.open(trace, "wb", compresslevel=3) as f:
                f.write(raw)
            summary = summarize(json.loads(raw), self.steps)
            del raw
            with open(base + ".summary.txt", "w") as f:
                f.write(format_summary(summary))
        except (OSError, ValueError) as e:
            raise ProfileError(f"writing the profile to {self.output_dir!r} failed: {e}") from None
        self.last = {"trace": trace, "summary_file": base + ".summary.txt", "steps": len(self.steps),
                     "summary": summary}
        logger.info("profiler stopped after %d steps: %s", len(self.steps), trace)
        return self.last


DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _step_ranges(evs):
    """(start, end, thread, step index) of the step ranges on the CPU timeline (kineto
    repeats them on the GPU timeline as gpu_user_annotation)."""
    for e in evs:
        name = e.get("name", "")
        if e.get("cat") == "user_annotation" and name.startswith(STEP_LABEL + "#"):
            try:
                i = int(name[len(STEP_LABEL) + 1:])
            except ValueError:
                continue
            yield e["ts"], e["ts"] + e.get("dur", 0), e.get("tid"), i


def summarize(trace: dict, steps: list, top: int = 12) -> dict:
    """Per step kind: steps, wall ms, device ms, and the top kernels by device time, from
    the exported trace.  A kernel (memcpy, memset) counts in the step whose range holds
    its launch (the runtime or driver call with the same correlation id; a graph launch
    owns all its kernels), so Triton and library kernels count as well as aten's.  Where
    nothing ran on a device, the top-level CPU ops of each kind by inclusive time."""
    import bisect

    evs = [e for e in trace.get("traceEvents", ()) if e.get("ph") == "X"]
    windows = sorted((start, end, tid, i) for start, end, tid, i in _step_ranges(evs) if i < len(steps))
    if len(windows) != len(steps):  # a range the profiler lost: those steps go unattributed
        logger.warning("profiler: %d step ranges for %d steps", len(windows), len(steps))
    starts = [w[0] for w in windows]
    tids = {w[2] for w in windows}

    def step_of(ts, tid):
        j = bisect.bisect_right(starts, ts) - 1
        if j < 0 or ts > windows[j][1] or tid not in tids:
            return None
        return windows[j][3]

    launch = {}  # correlation id -> index of the step that launched it
    ops: list = []
    pyfn: list = []
    for e in evs:
        cat = e.get("cat")
        if cat in ("cuda_runtime", "cuda_driver", "xpu_runtime", "xpu_driver"):
            corr = e.get("args", {}).get("correlation")
            i = step_of(e["ts"], e.get("tid"))
            if corr is not None and i is not None:
                launch[corr] = i
        elif cat == "cpu_op":
            ops.append(e)
        elif cat == "python_function" and "portaserve/" in e.get("name", ""):
            pyfn.append(e)
    out: dict = {}
    for mode, wall in steps:
        d = out.setdefault(mode, {"steps": 0, "wall_ms": 0.0, "device_ms": 0.0, "kernels": defaultdict(float),
                                  "cpu_ops": defaultdict(float), "python": defaultdict(float)})
        d["steps"] += 1
        d["wall_ms"] += wall * 1e3
    for e in evs:
        if e.get("cat") in DEVICE_CATS:
            i = launch.get(e.get("args", {}).get("correlation"))
            if i is not None:
                d = out[steps[i][0]]
                d["kernels"][e["name"]] += e.get("dur", 0) / 1e3
                d["device_ms"] += e.get("dur", 0) / 1e3
    ops.sort(key=lambda e: e["ts"])
    end = {}  # per thread: the end of the current top-level op
    for e in ops:
        tid = e.get("tid")
        if e["ts"] < end.get(tid, -1.0):
            continue  # nested in a top-level op
        end[tid] = e["ts"] + e.get("dur", 0)
        i = step_of(e["ts"], tid)
        if i is not None:
            out[steps[i][0]]["cpu_ops"][e["name"]] += e.get("dur", 0) / 1e3
    for e in pyfn:  # inclusive time of portaserve's own functions (with_stack)
        i = step_of(e["ts"], e.get("tid"))
        if i is not None:
            name = e["name"].split("portaserve/", 1)[1]
            out[steps[i][0]]["python"][name] += e.get("dur", 0) / 1e3
    for d in out.values():
        for key in ("kernels", "cpu_ops", "python"):
            d[key] = sorted(((k, round(v, 3)) for k, v in d[key].items()), key=lambda kv: -kv[1])[:top]
        d["wall_ms"], d["device_ms"] = round(d["wall_ms"], 3), round(d["device_ms"], 3)
    return out


def format_summary(summary: dict) -> str:
    lines = []
    for mode, d in summary.items():
        n = d["steps"]
        lines.append(f"{mode}: {n} steps, wall {d['wall_ms']:.2f} ms ({d['wall_ms'] / n:.3f}/step), "
                     f"device {d['device_ms']:.2f} ms ({d['device_ms'] / n:.3f}/step)")
        for what, rows in (("kernel", d["kernels"]), ("CPU op", d["cpu_ops"][:8]), ("python", d["python"])):
            for name, ms in rows:
                lines.append(f"    {ms / n:10.3f} ms/step  {what:6s}  {name[:110]}")
    return "\n".join(lines) + "\n"


def device_gaps(trace: dict, min_gap_ms: float = 1.0) -> list:
    """Per step range of a trace, in step order: (step index, wall ms, device-busy ms,
    [(offset ms, gap ms, [(host event, ms overlapping the gap), ...]), ...]): where the
    device sat idle inside a step for at least min_gap_ms, and what the step's thread was
    doing meanwhile.  A long gap with no host event in it is Python time (a compile, a
    lock, the interpreter)."""
    import bisect

    evs = [e for e in trace.get("traceEvents", ()) if e.get("ph") == "X"]
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in evs if e.get("cat") in DEVICE_CATS)
    dev_starts = [a for a, _ in dev]
    longest = max((b - a for a, b in dev), default=0)
    host: dict = defaultdict(list)  # per thread, sorted by start
    for e in evs:
        if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver"):
            host[e.get("tid")].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    longest_host, host_starts = {}, {}
    for tid, lst in host.items():
        lst.sort()
        longest_host[tid] = max(b - a for a, b, _ in lst)
        host_starts[tid] = [a for a, _, _ in lst]
    out = []
    for t0, t1, tid, i in sorted(_step_ranges(evs), key=lambda w: w[3]):
        busy, gaps, end = 0.0, [], t0
        for a, b in dev[bisect.bisect_left(dev_starts, t0 - longest):bisect.bisect_left(dev_starts, t1)]:
            if b <= t0:
                continue
            a, b = max(a, t0), min(b, t1)
            if a - end >= min_gap_ms * 1e3:
                gaps.append((end, a))
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        if t1 - end >= min_gap_ms * 1e3:
            gaps.append((end, t1))
        rows = []
        lst, starts = host.get(tid, []), host_starts.get(tid, [])
        for a, b in gaps:
            during = defaultdict(float)
            lo = bisect.bisect_left(starts, a - longest_host.get(tid, 0))
            for ha, hb, name in lst[lo:bisect.bisect_left(starts, b)]:
                if hb > a:
                    during[name] += min(b, hb) - max(a, ha)
            top = sorted(during.items(), key=lambda kv: -kv[1])[:4]
            rows.append((round((a - t0) / 1e3, 2), round((b - a) / 1e3, 2), [(n, round(v / 1e3, 2)) for n, v in top]))
        out.append((i, round((t1 - t0) / 1e3, 2), round(busy / 1e3, 2), rows))
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m portaserve.profiler",
                                description="Device-idle gaps inside each scheduler step of a trace "
                                            "written by /stop_profile or bench offline --profile.")
    p.add_argument("trace", help="<stamp>-pid<P>-rank<R>.trace.json.gz")
    p.add_argument("--min-gap-ms", type=float, default=1.0)
    ns = p.parse_args(argv)
    opener = gzip.open if ns.trace.endswith(".gz") else open
    with opener(ns.trace, "rt") as f:
        trace = json.load(f)
    for i, wall, busy, gaps in device_gaps(trace, ns.min_gap_ms):
        print(f"step {i}: wall {wall:.2f} ms, device busy {busy:.2f} ms")
        for off, ms, host in gaps:
            what = ", ".join(f"{n} {v:.2f} ms" for n, v in host) or "no host event: Python time"
            print(f"    at +{off:.2f} ms: device idle {ms:.2f} ms; host: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
