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
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    sig, consts, attrs = {}, [], []
    for i, (name, p) in enumerate(params.items()):
        v = bound.arguments[name]
        if "constexpr" in str(p.annotation):
            ty, spec = "constexpr", v
        else:
            ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            consts.append((i, _constexpr(spec)))
        elif spec:
            attrs.append((i, spec))
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
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
        raise RuntimeError(f"the Triton compile worker died or took over {TIMEOUT_S} s on {key}")
    res = json.loads(line)
    if res.get("key") != key:
        raise RuntimeError(f"the compile worker answered another request: {res}")
    return res


def compiled_signatures() -> int:
    """How many distinct launches were compiled for the GPU targets so far."""
    return len(_seen)


def _compile_check(fn, args, kwargs):
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
