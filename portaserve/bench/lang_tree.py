"""Tree-of-thought through portaserve.lang vs the same calls one by one (OpenAI client).

    python -m portaserve.bench.lang_tree [--width 4] [--tokens 16] [--matrix]

Starts two servers with the default model on free ports, one with the radix cache and one
with ``--disable-radix-cache``, and runs the same program on them:

  root: system + question -> plan; fork W -> step 1 each; fork W of each -> step 2 each;
  join; "which is best?" -> answer            (1 + W + W*W + 1 generations, depth 2)

* lang:     ``portaserve.lang`` against the radix-cache server (forks run concurrently,
            each fork prefills the shared prefix once, branches hit the cache);
* openai:   the same chat turns made one by one with ``openai.OpenAI().chat.completions``
            against the ``--disable-radix-cache`` server (every call re-prefills).
``--matrix`` adds the two crossed runs (lang without cache, openai with cache) to
separate the effect of the cache from that of concurrency.

Every generation is greedy with ``ignore_eos`` and ``--tokens`` new tokens, so both sides
generate exactly as many tokens.  Prefill tokens computed are the server's own counters
(/server_info ``counters.extend_tokens``) before and after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import requests

from portaserve.bench import POS

SYSTEM = (
    "You are a careful problem solver. For every problem you first restate what is asked, "
    "list the facts you are given, and name the unknowns. Then you propose a plan of at "
    "most three steps, carry each step out while showing the arithmetic, and check the "
    "result against the facts. You never skip a step and you never guess. When several "
    "approaches are possible you explore them one at a time, say which assumptions each "
    "relies on, and compare them by how simple and how reliable they are. Answers are "
    "short, written in plain English, and end with a single line that states the result. "
    "If the problem is ambiguous you say so and choose the most common reading. ") * 2
QUESTION = ("A train leaves at 9:40 and travels 210 km at 84 km/h, then waits 12 minutes "
            "and travels another 95 km at 76 km/h. When does it arrive?")


def step1_prompt(i):
    return f"Explore approach {i + 1} in one short step."


def step2_prompt(i, j):
    return f"Refine approach {i + 1}, variant {j + 1}: give the next step."


FINAL = "Which approach is best? Answer with its number."


# ---- the two clients ---------------------------------------------------------------------
def run_lang(url: str, width: int, tokens: int) -> int:
    import portaserve.lang as pl

    fixed = dict(max_tokens=tokens, temperature=0, ignore_eos=True)

    @pl.function
    def tree(s):
        s += pl.system(SYSTEM)
        s += pl.user(QUESTION)
        s += pl.assistant(pl.gen("plan", **fixed))
        level1 = s.fork(width)
        for i, a in enumerate(level1):
            a += pl.user(step1_prompt(i))
            a += pl.assistant(pl.gen("step1", **fixed))
        for i, a in enumerate(level1):
            leaves = a.fork(width)
            for j, b in enumerate(leaves):
                b += pl.user(step2_prompt(i, j))
                b += pl.assistant(pl.gen("step2", **fixed))
            leaves.join()
        level1.join()
        s += pl.user(FINAL)
        s += pl.assistant(pl.gen("answer", **fixed))

    state = tree.run(backend=pl.RuntimeEndpoint(url))
    assert len(state["step1"]) == width and all(len(x) == width for x in state["step2"])
    return 2 + width + width * width  # gen calls


def run_openai(url: str, width: int, tokens: int) -> int:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    calls = 0

    def chat(messages):
        nonlocal calls
        calls += 1
        r = client.chat.completions.create(model="default", messages=messages, max_tokens=tokens,
                                           temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    root = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    root.append({"role": "assistant", "content": chat(root)})
    level1 = []
    for i in range(width):
        m = root + [{"role": "user", "content": step1_prompt(i)}]
        level1.append(m + [{"role": "assistant", "content": chat(m)}])
    for i, a in enumerate(level1):
        for j in range(width):
            m = a + [{"role": "user", "content": step2_prompt(i, j)}]
            chat(m)
    m = root + [{"role": "user", "content": FINAL}]
    chat(m)
    return calls


# ---- servers and measurement ----------------------------------------------------------
def start_server(extra: list, log_path: str, timeout: float = 600.0):
    from portaserve.tp import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "portaserve.launch_server", "--port", str(port),
                             "--log-level", "warning", *extra], stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"server not healthy in {timeout} s; see {log_path}")


def counters(url: str) -> dict:
    return requests.get(url + "/server_info", timeout=60).json()["counters"]


def measure(name, fn, url, width, tokens) -> dict:
    requests.post(url + "/flush_cache", timeout=60)
    before = counters(url)
    t0 = time.perf_counter()
    calls = fn(url, width, tokens)
    wall = time.perf_counter() - t0
    after = counters(url)
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}
    return {"run": name, "wall_s": round(wall, 2), "gen_calls": calls,
            "prefill_tokens_computed": d["extend_tokens"], "prompt_tokens": d["prompt_tokens"],
            "cached_tokens": d["cached_tokens"], "generated_tokens": d["generated_tokens"]}


def warmup(url: str) -> None:
    requests.post(url + "/generate", json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0}}, timeout=300).raise_for_status()


def main(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.lang_tree", description=__doc__.splitlines()[0])
    p.add_argument("--width", type=POS, default=4, help="forks per node (depth is 2)")
    p.add_argument("--tokens", type=POS, default=16, help="new tokens per generation")
    p.add_argument("--matrix", action="store_true",
                   help="also run lang without the cache and openai with it")
    p.add_argument("--max-total-tokens", type=POS, default=20000)
    p.add_argument("--output-file", default=None, help="append the results as JSON lines")
    a = p.parse_args(argv)

    logs = tempfile.mkdtemp(prefix="lang_tree_")
    common = ["--max-total-tokens", str(a.max_total_tokens)]
    servers = []
    try:
        servers.append(start_server(common, os.path.join(logs, "radix.log")))
        servers.append(start_server(common + ["--disable-radix-cache"],
                                    os.path.join(logs, "noradix.log")))
        (_, radix), (_, noradix) = servers
        warmup(radix)
        warmup(noradix)
        plan = [("lang (radix cache)", run_lang, radix),
                ("openai one-by-one (--disable-radix-cache)", run_openai, noradix)]
        if a.matrix:
            plan += [("lang (--disable-radix-cache)", run_lang, noradix),
                     ("openai one-by-one (radix cache)", run_openai, radix)]
        rows = [measure(name, fn, url, a.width, a.tokens) for name, fn, url in plan]
    finally:
        for proc, _ in servers:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"tree of thought: width {a.width}, depth 2, {a.tokens} tokens per generation; "
          f"{platform.machine()} CPU x{os.cpu_count()}; {time.strftime('%Y-%m-%d')}")
    print(f"{'run':45s} {'wall s':>8s} {'calls':>6s} {'prefill computed':>17s} "
          f"{'prompt':>7s} {'cached':>7s} {'generated':>10s}")
    for r in rows:
        print(f"{r['run']:45s} {r['wall_s']:8.2f} {r['gen_calls']:6d} "
              f"{r['prefill_tokens_computed']:17d} {r['prompt_tokens']:7d} "
              f"{r['cached_tokens']:7d} {r['generated_tokens']:10d}")
    if a.output_file:
        with open(a.output_file, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "width": a.width, "tokens": a.tokens}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
