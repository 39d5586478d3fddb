"""Compiles the shared Triton kernels for real GPU targets, in its own process (Triton's
JIT mode: the tests run the kernels under the interpreter, which checks no types).

Reads one JSON request per line on stdin: {"module", "name", "signature", "constexprs",
"attrs", "options"}, the launch a test just made; compiles it for each target below through
Triton's whole pipeline (TTIR, TTGIR, LLVM, then PTX + cubin or AMDGCN + hsaco) and
checks the shared memory it needs against the target's, and writes {"ok": true} or
{"ok": false, "error": ...}.  The interpreter accepts kernels a
GPU compile rejects (a variable whose type differs between the branches of an if, for
one), so this is what catches them without a GPU."""
import importlib
import json
import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

# NVIDIA Hopper (the H100/H200 the GPU leg runs on), Ampere (A100) and AMD MI300 (the ROCm
# platform's Triton target); Intel's XPU backend is not part of the PyPI wheel.
TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32), GPUTarget("hip", "gfx942", 64)]


# Shared memory (LDS on AMD) one program may use: the H100's 227 KiB, the A100's 163 KiB,
# the MI300's 64 KiB.  A kernel over it compiles but fails at launch ("out of resources").
SHARED_LIMIT = {("cuda", 90): 232448, ("cuda", 80): 166912, ("hip", "gfx942"): 65536}


def _launched_on(target, req, params) -> bool:
    """Whether the runtime makes this launch on that target: before sm_89 Triton has no
    float8_e4m3fn, so the attention kernels read e4m3 caches as bytes there
    (attention._e4m3_as_bytes; the tests run that variant too) and FP8 GEMMs are not
    offered (their provider needs sm_89); kernels launched with programmatic dependent
    launch (a PDL constexpr that is true) run on NVIDIA sm_90 and later only (pdl.py)."""
    signature = req["signature"]
    if target.backend == "cuda" and target.arch < 89 and "*fp8e4nv" in signature.values():
        return False
    pdl = any(params[i] == "PDL" and v is True for i, v in req["constexprs"])
    return not pdl or (target.backend == "cuda" and target.arch >= 90)


def _value(v):
    if isinstance(v, dict) and "tl_dtype" in v:
        return tl.dtype(v["tl_dtype"])
    return v


def compile_launch(req):
    fn = getattr(importlib.import_module(req["module"]), req["name"])
    constexprs = {(i,): _value(v) for i, v in req["constexprs"]}
    for target in TARGETS:
        if not _launched_on(target, req, fn.arg_names):
            continue
        backend = make_backend(target)
        attrs = {(i,): backend.parse_attr(spec) for i, spec in req["attrs"][target.backend]}
        src = ASTSource(fn, req["signature"], constexprs=constexprs, attrs=attrs)
        options = dict(req["options"])
        if target.backend == "hip":
            options.pop("maxnreg", None)  # NVIDIA only: attention._options drops it on ROCm
        kernel = triton.compile(src, target=target, options=options)
        limit = SHARED_LIMIT[(target.backend, target.arch)]
        if kernel.metadata.shared > limit:
            raise RuntimeError(f"{target.backend} {target.arch}: needs {kernel.metadata.shared} bytes of "
                               f"shared memory, the device has {limit}")


def main():
    # answers go to the original stdout; anything else printed (imports, Triton) to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        key = line.rstrip("\n")
        try:
            compile_launch(json.loads(key))
            out = {"ok": True}
        except Exception as e:  # the test that launched it fails with this message
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out["key"] = key
        answers.write(json.dumps(out) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
