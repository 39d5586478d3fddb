"""/health latency while a 3-million-character prompt is tokenized (it is then refused:
longer than the context), and while a 48 MB /generate answer (30 prompt tokens, every
token's logprob at each position) is built.  Starts its own server (default model).  Run
from the repo root:
    python ci/cpu/health_stall.py
"""
from pathlib import Path
import sys, threading, time
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "server"))

from conftest import ServerProc
s = ServerProc(["--max-total-tokens", "20000"], Path("/tmp/health_stall_server.log"))
try:
    big = {"model": "default", "prompt": "the quick brown fox jumps over the lazy dog " * 70_000, "max_tokens": 4}
    lp = {"input_ids": list(range(100, 130)), "return_logprob": True, "logprob_start_len": 0,
          "top_logprobs_num": 49152, "sampling_params": {"max_new_tokens": 1}}
    for trial, (path, body) in enumerate([("/v1/completions", big)] * 2 + [("/generate", lp)] * 2):
        res = {}
        def post():
            t = time.monotonic(); res["r"] = s.post(path, json=body, timeout=300); res["t"] = time.monotonic() - t
        th = threading.Thread(target=post); th.start(); time.sleep(0.3)
        lat = []
        while th.is_alive():
            t = time.monotonic(); s.get("/health", timeout=60); lat.append(time.monotonic() - t); time.sleep(0.05)
        th.join()
        print(f"trial {trial} ({path}): request {res['t']:.2f} s -> {res['r'].status_code}; /health polls {len(lat)}, worst {max(lat)*1000:.0f} ms, median {sorted(lat)[len(lat)//2]*1000:.1f} ms")
finally:
    s.stop()
