"""Run the shared Triton kernels on the CPU through Triton's interpreter, unless a device
is named (PORTASERVE_TEST_DEVICE=cuda on a GPU host runs them compiled).  The variable
must be set before the kernels are decorated (imported).

Under the interpreter every launch is also compiled for real GPU targets (NVIDIA sm_90 and
sm_80, AMD gfx942) by compile_worker.py in a separate process, once per distinct signature: the
interpreter does not type-check a kernel, and a kernel it runs can still fail to compile
on a GPU.  It compiles the launches as the tests make them: where a wrapper picks smaller
blocks on the CPU (the attention kernels' BLOCK_N, for the interpreter's speed) the GPU's
own block sizes are not compiled here, so this finds type and lowering errors, not a
variant that overflows a GPU's shared memory.  PORTASERVE_TRITON_COMPILE_CHECK=0 turns
it off."""
import atexit
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if os.environ.get("PORTASERVE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}
_seen: dict = {}
_worker = None


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton signature type for {type(v).__name__}")


def _constexpr(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl_dtype": next(n for n in dir(tl) if getattr(tl, n) is v)}
    return v


def _stop_worker():
    _worker.stdin.close()  # its loop ends at end of input
    try:
        _worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _worker.kill()
        _worker.wait()
    _worker.stdout.close()


def compiled_signatures() -> int:
    """How many distinct launches were compiled for the GPU targets so far."""
    return len(_seen)


def _compile_check(fn, args, kwargs):
    global _worker
    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    sig, consts = {}, []
    for i, (name, p) in enumerate(params.items()):
        v = bound.arguments[name]
        if "constexpr" in str(p.annotation) or v is None:
            sig[name] = "constexpr"
            consts.append((i, _constexpr(v)))
        else:
            sig[name] = _arg_type(v)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    req = {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": consts,
           "options": options}
    key = json.dumps(req, sort_keys=True)
    if key not in _seen:
        if _worker is None:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            root = Path(__file__).resolve().parents[2]
            _worker = subprocess.Popen([sys.executable, "-m", "tests.triton.compile_worker"], cwd=root, env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            atexit.register(_stop_worker)
        _worker.stdin.write(key + "\n")
        _worker.stdin.flush()
        line = _worker.stdout.readline()
        if not line:
            raise RuntimeError("the Triton compile worker died (see its stderr above)")
        _seen[key] = json.loads(line)
    res = _seen[key]
    if not res["ok"]:
        raise AssertionError(f"{fn.__name__} does not compile for a GPU target with {req}: {res['error']}")


if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PORTASERVE_TRITON_COMPILE_CHECK", "1") != "0":
    from triton.runtime.interpreter import InterpretedFunction

    _run = InterpretedFunction.run

    def _run_checked(self, *args, grid, warmup, **kwargs):
        _compile_check(self.fn, args, kwargs)
        return _run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = _run_checked
