"""Run the shared Triton kernels on the CPU through Triton's interpreter, unless a device
is named (PORTASERVE_TEST_DEVICE=cuda on a GPU host runs them compiled).  The variable
must be set before the kernels are decorated (imported).

Under the interpreter every launch is also compiled for real GPU targets (NVIDIA sm_90 and
sm_80, AMD gfx942) by compile_worker.py in a separate process, once per distinct
signature, specialised as Triton's JIT would on a GPU: the interpreter type-checks
nothing, and a kernel it runs can still fail to compile on a GPU.  The worker also checks
each variant's shared memory against the device's.  The interpreted tests use the CPU's
block sizes where a wrapper picks smaller ones there; test_gpu_variants.py launches the
wrappers on meta tensors at model shapes, so their GPU variants are compiled (not run)
too.  PORTASERVE_TRITON_COMPILE_CHECK=0 turns this off."""
import atexit
import inspect
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import torch

if os.environ.get("PORTASERVE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

_seen: dict = {}
_worker = None
TIMEOUT_S = 600  # one launch's compile for every target; a hung compile fails its test


def _constexpr(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    if isinstance(v, (list, tuple)):
        raise TypeError(f"tuple constexpr {v!r}: not supported by the compile check")
    return v


def _signature(fn, args, kwargs):
    """The launch as Triton's JIT specialises it on a GPU: types from the values, an int
    equal to 1 (or None) made a constant, 16-divisible pointers and ints marked so (the
    vectorised / pipelined lowerings key on it)."""
    from triton.backends.amd.compiler import HIPBackend
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    sig, consts, attrs = {}, [], {"cuda": [], "hip": []}
    for i, (name, p) in enumerate(params.items()):
        v = bound.arguments[name]
        if "constexpr" in str(p.annotation):
            sig[name] = "constexpr"
            consts.append((i, _constexpr(v)))
            continue
        # each backend's JIT marks its own properties (AMD: buffers under 2 GiB, "S")
        specs = {b: native_specialize_impl(cls, v, False, True, True)
                 for b, cls in (("cuda", CUDABackend), ("hip", HIPBackend))}
        ty = specs["cuda"][0]
        assert specs["hip"][0] == ty, specs
        sig[name] = ty
        if ty == "constexpr":
            consts.append((i, _constexpr(specs["cuda"][1])))
            continue
        for b, (_, spec) in specs.items():
            if spec:
                attrs[b].append((i, spec))
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    return {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": consts,
            "attrs": attrs, "options": options}


def _stop_worker():
    global _worker
    w, _worker = _worker, None
    if w is None:
        return
    try:
        w.stdin.close()  # its loop ends at end of input
        w.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        w.kill()
        w.wait()
    w.stdout.close()


def _ask_worker(key: str) -> dict:
    global _worker
    if _worker is None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = Path(__file__).resolve().parents[2]
        _worker = subprocess.Popen([sys.executable, "-m", "tests.triton.compile_worker"], cwd=root, env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _worker.stdin.write(key + "\n")
        _worker.stdin.flush()
        ready, _, _ = select.select([_worker.stdout], [], [], TIMEOUT_S)
        line = _worker.stdout.readline() if ready else ""
    except OSError:
        line = ""
    if not line:  # died (its stderr is above) or hung: the next launch starts a fresh one
        _worker.kill()
        _stop_worker()
        return {"ok": False, "error": f"the compile worker died or took over {TIMEOUT_S} s"}
    try:
        res = json.loads(line)
    except ValueError:
        res = {}
    if res.get("key") != key:  # out of step: start a fresh worker for the next launch
        _worker.kill()
        _stop_worker()
        raise RuntimeError(f"the compile worker answered another request: {line[:500]}")
    return res


launched: list = []  # kernel names, one per checked launch (test_gpu_variants.py reads it)


def compiled_signatures() -> int:
    """How many distinct launches were compiled for the GPU targets so far."""
    return len(_seen)


def _compile_check(fn, args, kwargs):
    launched.append(fn.__name__)
    req = _signature(fn, args, kwargs)
    key = json.dumps(req, sort_keys=True)
    if key not in _seen:
        _seen[key] = _ask_worker(key)
    res = _seen[key]
    if not res["ok"]:
        raise AssertionError(f"{fn.__name__} does not compile for a GPU target with {req}: {res['error']}")


atexit.register(_stop_worker)


if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PORTASERVE_TRITON_COMPILE_CHECK", "1") != "0":
    from triton.runtime.interpreter import InterpretedFunction

    _run = InterpretedFunction.run

    def _run_checked(self, *args, grid, warmup, **kwargs):
        _compile_check(self.fn, args, kwargs)
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in (*args, *kwargs.values())):
            return None  # a GPU variant, compiled only (test_gpu_variants.py)
        return _run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = _run_checked
