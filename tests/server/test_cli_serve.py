"""The `serve` command line, its startup failures, and `bench serving` against the server."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import free_port

FLAGS = ["--model-path", "--tokenizer-path", "--host", "--port", "--device", "--dtype",
         "--tp-size", "--tp", "--context-length", "--mem-fraction-static", "--max-total-tokens",
         "--max-running-requests", "--max-queued-requests", "--chunked-prefill-size",
         "--schedule-policy", "--disable-radix-cache", "--api-key", "--served-model-name",
         "--chat-template", "--enable-metrics", "--log-level", "--kernel", "--skip-server-warmup"]


def _run(args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_help_lists_sglang_flags():
    for cmd in (["portaserve.cli", "serve", "--help"], ["portaserve.launch_server", "--help"]):
        r = _run(cmd)
        assert r.returncode == 0, r.stderr
        for f in FLAGS:
            assert f in r.stdout, f
        assert "127.0.0.1" in r.stdout and "30000" in r.stdout


def test_serve_rejects_bad_flags_fast():
    t0 = time.monotonic()
    r = _run(["portaserve.cli", "serve", "--tp", "2", "--nnodes", "2"])
    assert r.returncode != 0 and "needs --dist-init-addr" in r.stderr
    r = _run(["portaserve.cli", "serve", "--schedule-policy", "nope"])
    assert r.returncode != 0 and "invalid choice" in r.stderr
    assert time.monotonic() - t0 < 60


def test_serve_reports_startup_failure():
    r = _run(["portaserve.launch_server", "--model-path", "/nonexistent/model", "--port",
              str(free_port())], timeout=180)
    assert r.returncode != 0
    assert "does not exist" in r.stderr


def test_bench_serving(server, tmp_path):
    from portaserve.bench.datasets import random_dataset

    out = tmp_path / "bench.jsonl"
    r = _run(["portaserve.cli", "bench", "serving", "--base-url", server.url, "--dataset-name", "random",
              "--num-prompts", "4", "--random-input-len", "32", "--random-output-len", "4",
              "--random-range-ratio", "0.5", "--seed", "3", "--output-file", str(out),
              "--disable-tqdm"], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Serving Benchmark Result" in r.stdout and "Mean TTFT (ms):" in r.stdout
    rec = json.loads(out.read_text().splitlines()[-1])
    vocab = server.server_info()["limits"]["vocab_size"]
    ds = random_dataset(4, 32, 4, 0.5, vocab, 3)
    assert rec["completed"] == 4 and rec["failed"] == 0
    assert rec["total_input_tokens"] == sum(len(d.input_ids) for d in ds)
    assert rec["total_output_tokens"] == sum(d.output_len for d in ds)  # exact: ignore_eos
    for k in ("request_throughput", "input_throughput", "output_throughput", "mean_ttft_ms",
              "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
              "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms"):
        assert rec[k] >= 0, k
    r = _run(["portaserve.cli", "bench", "serving", "--base-url", server.url,
              "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2",
              "--gsp-prompts-per-group", "2", "--gsp-system-prompt-len", "64", "--gsp-question-len", "8",
              "--gsp-output-len", "2", "--max-concurrency", "2", "--disable-tqdm"], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Successful requests:                     4" in r.stdout


def test_warmup_request_fits_the_limits(monkeypatch):
    """The warm-up request is sized to what the server accepts (a tiny --context-length or
    KV pool must not stop it from starting); where nothing fits it is skipped, and a
    failure is a RuntimeError that says what failed (serve() prints it, no traceback)."""
    import asyncio
    import types

    from portaserve.core.request_builder import Limits
    from portaserve.server import app, common

    sent = []

    class Client:
        tokenizer, dead = None, None

        def __init__(self, **lim):
            self.limits = Limits(**{"context_len": 4096, "vocab_size": 32000, "pool_tokens": 4096, **lim})

        def submit(self, reqs):
            sent.append(reqs[0])
            return [types.SimpleNamespace(error=None)]

        async def call(self, cmd, timeout=30):
            return True

    async def done(client, states, request=None):
        return None

    monkeypatch.setattr(common, "wait_all", done)
    for lim, want in [({}, (16, 8)), ({"context_len": 20}, (16, 4)), ({"pool_tokens": 10}, (9, 1)),
                      ({"context_len": 2, "vocab_size": 2}, (1, 1))]:
        sent.clear()
        asyncio.run(app._warmup(Client(**lim)))
        r = sent[0]
        assert (len(r.input_ids), r.sampling.max_new_tokens) == want, lim
    sent.clear()
    asyncio.run(app._warmup(Client(context_len=1)))  # nothing fits: skipped
    assert not sent

    async def dead(client, states, request=None):
        raise common.dead_error("the scheduler crashed: out of memory")

    monkeypatch.setattr(common, "wait_all", dead)
    try:
        asyncio.run(app._warmup(Client()))
    except RuntimeError as e:
        assert "warm-up request failed" in str(e) and "out of memory" in str(e)
    else:
        raise AssertionError("a failed warm-up must raise")
