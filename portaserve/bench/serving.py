"""Online serving benchmark, compatible with SGLang's ``bench_serving``.

    portaserve bench serving --port 30000 --dataset-name random --num-prompts 32 \\
        --random-input-len 256 --random-output-len 32 --random-range-ratio 0.5 --request-rate 4

Sends requests to a running server's native ``/generate`` endpoint with streaming,
``ignore_eos`` and prompts given as token ids (random ids, like SGLang's random dataset),
so prompt and output lengths are exact.  Reports request and token throughput and
TTFT / TPOT / ITL / end-to-end latency (mean, median, p99) as a table, and appends one
JSON line to ``--output-file`` if given (SGLang's format: ``mean_ttft_ms`` etc.).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from portaserve.bench import NONNEG, POS, fraction, out_file, positive


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list = field(default_factory=list)
    error: str = ""


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="sglang", choices=["sglang", "portaserve"],
                   help="server API to drive (both mean the native /generate API)")
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--dataset-name", default="random", choices=["random", "generated-shared-prefix"])
    p.add_argument("--num-prompts", type=POS, default=100,
                   help="requests to send (random dataset; gsp uses groups x prompts per group)")
    p.add_argument("--random-input-len", type=POS, default=1024)
    p.add_argument("--random-output-len", type=POS, default=1024)
    p.add_argument("--random-range-ratio", type=fraction, default=0.0,
                   help="lengths drawn uniformly from [len * ratio, len]")
    p.add_argument("--gsp-num-groups", type=POS, default=64)
    p.add_argument("--gsp-prompts-per-group", type=POS, default=16)
    p.add_argument("--gsp-system-prompt-len", type=POS, default=2048)
    p.add_argument("--gsp-question-len", type=POS, default=128)
    p.add_argument("--gsp-output-len", type=POS, default=256)
    p.add_argument("--request-rate", type=positive, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf sends all at once")
    p.add_argument("--max-concurrency", type=POS, default=None,
                   help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-requests", type=NONNEG, default=1)
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before the run")
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--disable-stream", action="store_true", help="(TTFT then equals latency)")
    p.add_argument("--output-file", default=None, type=out_file, help="append the result as one JSON line")
    p.add_argument("--disable-tqdm", action="store_true")


def _dataset(ns, vocab: int):
    from portaserve.bench.datasets import random_dataset, shared_prefix_dataset

    if ns.dataset_name == "random":
        return random_dataset(ns.num_prompts, ns.random_input_len, ns.random_output_len,
                              ns.random_range_ratio, vocab, ns.seed)
    return shared_prefix_dataset(ns.gsp_num_groups, ns.gsp_prompts_per_group,
                                 ns.gsp_system_prompt_len, ns.gsp_question_len, ns.gsp_output_len,
                                 vocab, ns.seed)


async def _one(client, url: str, input_ids: list, output_len: int, ns) -> RequestResult:
    res = RequestResult(prompt_len=len(input_ids))
    body = {"input_ids": input_ids,
            "sampling_params": {"max_new_tokens": output_len, "temperature": 0.0,
                                "ignore_eos": not ns.disable_ignore_eos},
            "stream": not ns.disable_stream}
    t0 = time.perf_counter()
    last = t0
    try:
        if ns.disable_stream:
            r = await client.post(url + "/generate", json=body)
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return res
            res.latency = res.ttft = time.perf_counter() - t0
            res.output_len = r.json()["meta_info"]["completion_tokens"]
            res.success = True
            return res
        async with client.stream("POST", url + "/generate", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                n = chunk["meta_info"]["completion_tokens"]
                if n > res.output_len:
                    if res.output_len == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.output_len = n
        res.latency = time.perf_counter() - t0
        res.success = True
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run(ns, url: str, reqs) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers=headers) as client:
        for i in range(ns.warmup_requests):
            w = await _one(client, url, reqs[i % len(reqs)].input_ids[:32], 4, ns)
            if not w.success:
                raise RuntimeError(f"warmup request failed: {w.error}")
        if ns.flush_cache:
            await client.post(url + "/flush_cache")
        sem = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else None
        rng = np.random.default_rng(ns.seed)
        done = [0]

        async def limited(r):
            if sem is None:
                out = await _one(client, url, r.input_ids, r.output_len, ns)
            else:
                async with sem:
                    out = await _one(client, url, r.input_ids, r.output_len, ns)
            done[0] += 1
            if not ns.disable_tqdm:
                print(f"\r{done[0]}/{len(reqs)} requests done", end="", file=sys.stderr, flush=True)
            return out

        tasks = []
        t0 = time.perf_counter()
        for r in reqs:
            tasks.append(asyncio.create_task(limited(r)))
            if ns.request_rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / ns.request_rate)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if not ns.disable_tqdm:
            print(file=sys.stderr)
    return results, duration


def compute_metrics(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]
    tin = sum(r.prompt_len for r in ok)
    tout = sum(r.output_len for r in ok)

    def stats(name, xs, pcts=(99,)):
        a = np.array(xs if xs else [0.0]) * 1000
        d = {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
             f"std_{name}_ms": float(a.std())}
        for p in pcts:
            d[f"p{p}_{name}_ms"] = float(np.percentile(a, p))
        return d

    m = {"completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
         "total_input_tokens": tin, "total_output_tokens": tout,
         "request_throughput": len(ok) / duration, "input_throughput": tin / duration,
         "output_throughput": tout / duration, "total_throughput": (tin + tout) / duration,
         "concurrency": sum(e2e) / duration}
    m.update(stats("e2e_latency", e2e, (90, 99)))
    m.update(stats("ttft", ttft, (99,)))
    m.update(stats("tpot", tpot, (99,)))
    m.update(stats("itl", itl, (95, 99)))
    m["max_itl_ms"] = float(max(itl) * 1000) if itl else 0.0
    errors = sorted({r.error for r in results if not r.success})
    if errors:
        m["errors"] = errors[:5]
    return m


def format_table(m: dict, ns) -> str:
    rate = "inf" if ns.request_rate == float("inf") else ns.request_rate
    rows = [("Backend:", ns.backend), ("Dataset:", ns.dataset_name),
            ("Traffic request rate:", rate),
            ("Max request concurrency:", ns.max_concurrency or "not set"),
            ("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
            ("Input token throughput (tok/s):", f"{m['input_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{m['total_throughput']:.2f}"),
            ("Concurrency:", f"{m['concurrency']:.2f}")]
    out = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    out += [f"{k:<40} {v:<10}" for k, v in rows]

    def section(title, keys):
        out.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        out.extend(f"{label:<40} {m[key]:<10.2f}" for label, key in keys)

    section("End-to-End Latency", [("Mean E2E Latency (ms):", "mean_e2e_latency_ms"),
                                   ("Median E2E Latency (ms):", "median_e2e_latency_ms"),
                                   ("P99 E2E Latency (ms):", "p99_e2e_latency_ms")])
    section("Time to First Token", [("Mean TTFT (ms):", "mean_ttft_ms"),
                                    ("Median TTFT (ms):", "median_ttft_ms"),
                                    ("P99 TTFT (ms):", "p99_ttft_ms")])
    section("Time per Output Token (excl. 1st token)", [("Mean TPOT (ms):", "mean_tpot_ms"),
                                                        ("Median TPOT (ms):", "median_tpot_ms"),
                                                        ("P99 TPOT (ms):", "p99_tpot_ms")])
    section("Inter-Token Latency", [("Mean ITL (ms):", "mean_itl_ms"),
                                    ("Median ITL (ms):", "median_itl_ms"),
                                    ("P95 ITL (ms):", "p95_itl_ms"),
                                    ("P99 ITL (ms):", "p99_itl_ms"),
                                    ("Max ITL (ms):", "max_itl_ms")])
    out.append("=" * 50)
    return "\n".join(out)


def run(ns) -> dict:
    import httpx

    url = (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    info = httpx.get(url + "/server_info", headers=headers, timeout=60)
    info.raise_for_status()
    info = info.json()
    vocab = info["limits"]["vocab_size"]
    reqs = _dataset(ns, vocab)
    results, duration = asyncio.run(_run(ns, url, reqs))
    m = compute_metrics(results, duration)
    print(format_table(m, ns))
    if m.get("errors"):
        print("errors: " + "; ".join(m["errors"]), file=sys.stderr)
    if ns.output_file:
        rec = {**{k: v for k, v in vars(ns).items() if not callable(v) and k != "api_key"},
               **m, "server": {"platform": info.get("platform"), "device_name": info.get("device_name"),
                               "model_path": info.get("model_path"),
                               "max_total_num_tokens": info.get("max_total_num_tokens")},
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(ns.output_file, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
    return m


def run_from_cli(ns) -> int:
    try:
        m = run(ns)
    except Exception as e:  # noqa: BLE001
        print(f"portaserve bench serving: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0 if m["completed"] > 0 and m["failed"] == 0 else 1


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m portaserve.bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    return run_from_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
