"""The step profiler (Engine.start_profile/stop_profile, /start_profile, `bench offline
--profile`): the trace it writes holds one range per scheduler step, and its per-kind
summary agrees with the scheduler's own counters."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from portaserve.profiler import STEP_LABEL, ProfileError


def _trace_steps(path) -> int:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return sum(1 for e in events if e.get("name", "").startswith(STEP_LABEL + "#")
               and e.get("cat") == "user_annotation")


def _run(engine, n=3, new=6):
    sps = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    return engine.generate(input_ids=[[5 + i, 17, 230 + i, 9, 41] for i in range(n)], sampling_params=sps)


def test_profile_until_stop_matches_counters(default_engine, tmp_path):
    eng = default_engine
    modes = Counter()
    sched = eng.rt.scheduler
    before = eng.get_server_info()["counters"]
    res = eng.start_profile(output_dir=str(tmp_path))
    assert res["output_dir"] == str(tmp_path) and res["activities"] == ["cpu"]
    inner = sched.step  # the profiler's wrapper: count kinds from a second wrapper outside it

    def counting():
        out = inner()
        modes[sched.last_step.mode] += 1
        return out

    sched.step = counting
    try:
        _run(eng)
    finally:
        eng._call(lambda: setattr(sched, "step", inner))
    out = eng.stop_profile()
    after = eng.get_server_info()["counters"]
    assert "step" not in vars(sched)  # the bound method again
    s = out["summary"]
    n_ext = after["forward_extend"] - before["forward_extend"]
    n_dec = after["forward_decode"] - before["forward_decode"]
    assert n_ext >= 1 and n_dec >= 5
    assert s["extend"]["steps"] + s.get("mixed", {}).get("steps", 0) == n_ext == modes["extend"] + modes["mixed"]
    assert s["decode"]["steps"] == n_dec == modes["decode"]
    assert out["steps"] == sum(modes.values()) == _trace_steps(out["trace"])
    # the top-level CPU ops under the steps: the model's projections lead, inside the wall time
    for d in s.values():
        assert d["cpu_ops"][0][0] == "aten::linear"
        assert sum(ms for _, ms in d["cpu_ops"]) <= d["wall_ms"]
    assert s["decode"]["device_ms"] == 0 and not s["decode"]["kernels"]  # nothing ran on a device
    text = open(out["summary_file"]).read()
    assert text.startswith("extend:") and "decode:" in text


def test_profile_num_steps_stops_by_itself(default_engine, tmp_path):
    eng = default_engine
    eng.start_profile(output_dir=str(tmp_path), num_steps=2)
    _run(eng, n=2, new=8)
    prof = eng.rt.profiler
    assert not prof.active and prof.last["steps"] == 2
    assert _trace_steps(prof.last["trace"]) == 2
    assert "step" not in vars(eng.rt.scheduler)
    with pytest.raises(ProfileError, match="not running"):
        eng.stop_profile()
    # the engine keeps serving
    assert len(_run(eng, n=1, new=2)[0]["output_ids"]) == 2


def test_bench_profile_window_starts_into_the_run(default_engine, tmp_path, monkeypatch):
    """`bench offline --profile --profile-after S --profile-steps N`: the window starts S
    seconds into the timed run (a running batch, past its prompt passes) from another
    thread, and covers N steps.  A run that ends first has no profile, an empty one
    included, and no timer is left behind, also when the run fails."""
    import threading
    import time

    from portaserve.bench.datasets import BenchRequest
    from portaserve.bench.offline import run_engine

    eng = default_engine
    reqs = [BenchRequest([5 + i, 17, 230 + i, 9, 41], 100) for i in range(4)]
    r = run_engine(eng, reqs, {"output_dir": str(tmp_path), "num_steps": 3, "after": 0.3, "with_stack": False})
    assert r["seconds"] > 0.6, "the run was too short to test a window in it"
    assert r["profile"]["steps"] == 3 and _trace_steps(r["profile"]["trace"]) == 3
    kinds = [k for k, _ in eng.rt.profiler.steps]
    assert kinds and set(kinds) <= {"decode", "resolve"}, kinds  # the prompt passes were over

    def timers():
        return [x for x in threading.enumerate() if isinstance(x, threading.Timer)]

    r = run_engine(eng, reqs[:1], {"output_dir": str(tmp_path / "late"), "num_steps": 3, "after": 120.0,
                                   "with_stack": False})
    assert "profile" not in r and not eng.rt.profiler.active and not timers()
    # the timer fires as the run ends: the profiler starts with no step left to record
    real = eng.generate
    monkeypatch.setattr(eng, "generate", lambda *a, **kw: (real(*a, **kw), time.sleep(1.5))[0])
    t = time.perf_counter()
    r = run_engine(eng, [BenchRequest([5, 17], 1)], {"output_dir": str(tmp_path / "end"), "num_steps": 3,
                                                      "after": 1.0, "with_stack": False})
    assert time.perf_counter() - t > 1.5
    assert "profile" not in r and not eng.rt.profiler.active and not timers()
    monkeypatch.setattr(eng, "generate", lambda *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_engine(eng, reqs[:1], {"output_dir": str(tmp_path / "fail"), "num_steps": 3, "after": 120.0,
                                   "with_stack": False})
    assert not timers()


def test_profile_bad_requests(default_engine, tmp_path):
    eng = default_engine
    for kw, msg in [({"num_steps": 0}, "positive integer"), ({"num_steps": "3"}, "positive integer"),
                    ({"activities": ["cuda"]}, "not available"), ({"activities": [1]}, "list of names"),
                    ({"output_dir": "/proc/no/such"}, "cannot create")]:
        with pytest.raises(ProfileError, match=msg):
            eng.start_profile(**kw)
        assert not eng.rt.profiler.active
    eng.start_profile(output_dir=str(tmp_path))
    try:
        with pytest.raises(ProfileError, match="already running"):
            eng.start_profile()
    finally:
        eng.stop_profile()


def test_profiler_wraps_and_restores_an_outer_step_wrapper(default_engine, tmp_path):
    from portaserve.bench.offline import StepTimer

    sched = default_engine.rt.scheduler
    timer = default_engine._call(lambda: StepTimer(sched))
    try:
        default_engine.start_profile(output_dir=str(tmp_path))
        _run(default_engine, n=1, new=3)
        default_engine.stop_profile()
        assert sched.__dict__.get("step") is timer  # restored to the timer, not the method
    finally:
        steps = default_engine._call(timer.remove)
    assert steps["decode_steps"] >= 2


def test_summary_attributes_kernels_by_launch():
    """Device work counts in the step whose range holds its launch (by correlation id),
    whatever launched it and whenever it ran; launches outside any step are left out."""
    from portaserve.profiler import summarize

    def x(name, cat, ts, dur, tid=7, corr=None):
        e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid}
        if corr is not None:
            e["args"] = {"correlation": corr}
        return e

    ev = [x(STEP_LABEL + "#0", "user_annotation", 100, 50), x(STEP_LABEL + "#1", "user_annotation", 200, 50),
          x(STEP_LABEL + "#0", "gpu_user_annotation", 112, 60, tid=0),  # the range on the GPU timeline
          x(STEP_LABEL + "#7", "user_annotation", 400, 50),  # a step the list lacks: ignored
          x("cudaLaunchKernel", "cuda_runtime", 410, 2, corr=9), x("late", "kernel", 420, 5, tid=0, corr=9),
          x("cudaLaunchKernel", "cuda_runtime", 110, 2, corr=1),
          x("cuLaunchKernelEx", "cuda_driver", 120, 2, corr=2),  # a Triton kernel
          x("cudaGraphLaunch", "cuda_runtime", 210, 5, corr=3),
          x("cudaLaunchKernel", "cuda_runtime", 170, 2, corr=4),  # between the steps
          x("cudaLaunchKernel", "cuda_runtime", 215, 2, tid=8, corr=5),  # another thread
          x("gemm", "kernel", 115, 30, tid=0, corr=1), x("_extend_kernel", "kernel", 260, 40, tid=0, corr=2),
          x("gemm", "kernel", 300, 10, tid=0, corr=3), x("norm", "kernel", 310, 5, tid=0, corr=3),
          x("stray", "kernel", 175, 9, tid=0, corr=4), x("other", "kernel", 220, 9, tid=0, corr=5),
          x("aten::linear", "cpu_op", 105, 20), x("aten::mm", "cpu_op", 106, 10), x("aten::add", "cpu_op", 205, 3)]
    s = summarize({"traceEvents": ev}, [("extend", 0.05), ("decode", 0.05)])
    assert s["extend"]["kernels"] == [("_extend_kernel", 0.04), ("gemm", 0.03)]
    assert s["extend"]["device_ms"] == 0.07
    assert s["decode"]["kernels"] == [("gemm", 0.01), ("norm", 0.005)] and s["decode"]["device_ms"] == 0.015
    assert s["extend"]["cpu_ops"] == [("aten::linear", 0.02)]  # aten::mm is nested in it
    assert s["decode"]["cpu_ops"] == [("aten::add", 0.003)]


def test_with_stack_reports_portaserve_functions(default_engine, tmp_path):
    default_engine.start_profile(output_dir=str(tmp_path), with_stack=True)
    _run(default_engine, n=1, new=3)
    s = default_engine.stop_profile()["summary"]
    names = [n for n, _ in s["extend"]["python"]]
    # (the pass itself: _run_extend calls it, and so do overlapped prompt passes on GPUs)
    assert any("_extend_forward" in n for n in names), names
    run_extend = next(ms for n, ms in s["extend"]["python"] if "_extend_forward" in n)
    assert 0 < run_extend <= s["extend"]["wall_ms"]


def test_device_gaps_finds_idle_device_inside_steps(tmp_path, capsys):
    """python -m portaserve.profiler TRACE: device-idle stretches inside each step and the
    host events of the step's thread during them (none: Python time, e.g. a compile)."""
    import gzip as gz

    from portaserve.profiler import device_gaps, main

    def x(name, cat, ts, dur, tid=7):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid}

    ev = [x(STEP_LABEL + "#0", "user_annotation", 0, 10_000),
          x(STEP_LABEL + "#0", "gpu_user_annotation", 0, 10_000, tid=0),
          x("k1", "kernel", 1_000, 2_000, tid=0), x("k2", "kernel", 2_500, 1_000, tid=0),  # overlapping
          x("k3", "kernel", 8_000, 1_500, tid=0),
          x("aten::cat", "cpu_op", 4_000, 1_000), x("aten::cat", "cpu_op", 5_000, 500, tid=9)]  # other thread
    out = device_gaps({"traceEvents": ev}, min_gap_ms=0.4)
    assert out == [(0, 10.0, 4.0, [(0.0, 1.0, []), (3.5, 4.5, [("aten::cat", 1.0)]), (9.5, 0.5, [])])]
    assert device_gaps({"traceEvents": ev}, min_gap_ms=2.0) == [(0, 10.0, 4.0, [(3.5, 4.5, [("aten::cat", 1.0)])])]
    path = tmp_path / "t.trace.json.gz"
    with gz.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    assert main([str(path), "--min-gap-ms", "2"]) == 0
    text = capsys.readouterr().out
    assert "step 0: wall 10.00 ms, device busy 4.00 ms" in text and "device idle 4.50 ms; host: aten::cat 1.00 ms" in text


class _FakeSched:
    """A scheduler stand-in: step() runs fn and reports a decode step."""

    def __init__(self, fn=lambda: []):
        from portaserve.core.scheduler import StepStats

        self.fn, self.last_step = fn, StepStats("decode")

    def step(self):
        return self.fn()


def test_failures_never_escape_the_step(tmp_path):
    """A profile that cannot be written (auto-stop inside a step) is logged, not raised
    into the scheduler; a step that raises stops the profiler and unwraps the step."""
    from portaserve.profiler import StepProfiler

    s = _FakeSched()
    p = StepProfiler(s)
    p.start(output_dir="/proc", num_steps=2)  # exists, but no file can be written there
    assert s.step() == [] and s.step() == []  # the second step stops: the write fails quietly
    assert not p.active and p.last is None and "step" not in vars(s)

    def boom():
        raise RuntimeError("kernel fault")

    s2 = _FakeSched(boom)
    p2 = StepProfiler(s2)
    p2.start(output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="kernel fault"):
        s2.step()
    assert not p2.active and "step" not in vars(s2) and p2.last["steps"] == 0
    for bad, msg in [("x\x00y", "cannot create"), (str(tmp_path / "f" / "\x00"), "cannot create")]:
        with pytest.raises(ProfileError, match=msg):
            p2.start(output_dir=bad)
    for acts, msg in [(["cpu", "cpu"], "distinct"), ([], None)]:
        if msg:
            with pytest.raises(ProfileError, match=msg):
                p2.start(output_dir=str(tmp_path), activities=acts)
    assert not p2.active


def test_auto_stop_keeps_a_wrapper_installed_after_start(tmp_path):
    from portaserve.profiler import StepProfiler

    s = _FakeSched()
    p = StepProfiler(s)
    p.start(output_dir=str(tmp_path), num_steps=2)
    calls = []
    inner = s.step

    def timer():
        calls.append(1)
        return inner()

    s.step = timer  # a later wrapper (a benchmark's step timer) around the profiler's
    for _ in range(4):
        s.step()
    assert not p.active and p.last["steps"] == 2 and len(calls) == 4 and s.step is timer
    # two profiles within a second get their own files
    p.start(output_dir=str(tmp_path), num_steps=1)
    s.step()
    assert len(list(tmp_path.glob("*.trace.json.gz"))) == 2
