"""How long a plain request waits while another request's large regex constraint is
checked: a 1-token /v1/completions sent 0.5 s after a /generate whose regex has N
alternatives (`wordI[a-z]{2,5}`; 20,000 are 389 KB, 50,000 are 989 KB, near the 1 MiB
limit).  Starts its own server (default model) from this checkout.  Run from the repo root:
    python ci/cpu/constraint_hold.py 20000 50000
"""
from pathlib import Path
import sys, threading, time
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "server"))

from conftest import ServerProc
plain = {"model": "default", "prompt": "Hello", "max_tokens": 1, "temperature": 0}
s = ServerProc([], Path("/tmp/constraint_hold_server.log"))
try:
    def timed(path, body):
        t = time.monotonic(); r = s.post(path, json=body, timeout=600)
        return r.status_code, time.monotonic() - t

    print("plain alone: %d in %.3f s" % timed("/v1/completions", plain))
    for n in map(int, sys.argv[1:] or ["20000"]):
        regex = "(" + "|".join(f"word{i}[a-z]{{2,5}}" for i in range(n)) + ")"
        big = {"text": "Hello", "sampling_params": {"max_new_tokens": 1, "regex": regex}}
        res = {}
        th = threading.Thread(target=lambda: res.setdefault("big", timed("/generate", big)))
        th.start(); time.sleep(0.5)
        code, t = timed("/v1/completions", plain)
        th.join()
        print(f"{n} alternatives ({len(regex)} chars): plain request during the check {code} in {t:.3f} s; "
              f"the constrained one {res['big'][0]} in {res['big'][1]:.1f} s")
finally:
    s.stop()
