"""Per-token cost of constrained decoding: the same prompts decoded with a JSON schema
and unconstrained with the same output lengths (ignore_eos), at several batch sizes,
first token by token (jump-forward off), then with jump-forward (--jump-mode: "on", the
default, jumps whenever the grammar forces text; "whole-batch" only when every running
request jumps, the mode that pays on GPUs for single streams).  Overhead: the median of
the constrained / unconstrained time ratios of interleaved runs (with jump-forward the
constrained run also appends forced tokens without a decode step each), end to end
(prefill, grammar setup and all), and of the median decode step (the steady-state time
per output token; with the overlap scheduler a step's time is the device's step time
unless the host's share of it, masks included, is longer).

    python -m portaserve.bench.grammar_overhead --batch-size 1 16

Every server flag applies (--device, --model-path, --load-format, --dtype, ...).  Grammars
are compiled against a tokenizer, so a model built from a config with random weights needs
one (--tokenizer-path: a folder with a Hugging Face tokenizer.json and its
tokenizer_config.json; a tokenizer smaller than the model's vocabulary is fine, the
tokens it lacks are never allowed by a grammar).  On a GPU host, e.g.:

    python -m portaserve.bench.grammar_overhead --device cuda --model-path /tmp/llama8b \
        --load-format dummy --dtype bfloat16 --tokenizer-path /tmp/tok-llama3 --batch-size 1 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from portaserve.bench import POS

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 16}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                          "maxItems": 3}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}


def _timed(engine, prompts, sps, steps: list):
    """Wall seconds and output lengths of one run; appends its decode step times to steps."""
    from portaserve.bench.offline import StepTimer

    engine.flush_cache()
    timer = StepTimer(engine.rt.scheduler)
    t = time.perf_counter()
    outs = engine.generate(prompts, sps)
    dt = time.perf_counter() - t
    timer.remove()
    steps.extend(timer.decode_times)
    return dt, [o["meta_info"]["completion_tokens"] for o in outs]


def run(engine, bs: int, repeats: int = 3):
    """Constrained and unconstrained runs interleaved (c, u, c, u, ...), so load that
    drifts during the benchmark weighs on both alike.  Returns (median constrained
    seconds, median unconstrained seconds, median of the paired ratios, tokens, lengths)."""
    prompts = [f"Person #{i} as JSON:" for i in range(bs)]
    constrained = [{"max_new_tokens": 120, "temperature": 0, "json_schema": json.dumps(SCHEMA)}] * bs
    ct, ft, lens, ratios, csteps, fsteps = [], [], None, [], [], []
    for _ in range(repeats):
        t, got = _timed(engine, prompts, constrained, csteps)
        lens = lens or got  # greedy: the same every run (per-token figures if not)
        ct.append(t / sum(got))
        t, got_f = _timed(engine, prompts, [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
                                            for n in lens], fsteps)
        ft.append(t / sum(got_f))
        ratios.append(ct[-1] / ft[-1])
    tokens = sum(lens)
    step_ms = (statistics.median(csteps) * 1e3 if csteps else float("nan"),
               statistics.median(fsteps) * 1e3 if fsteps else float("nan"))
    return (statistics.median(ct) * tokens, statistics.median(ft) * tokens, statistics.median(ratios),
            tokens, lens, step_ms)


def main(argv=None, prog=None) -> int:
    import dataclasses

    from portaserve import Engine
    from portaserve.server_args import ServerArgs

    p = argparse.ArgumentParser(prog=prog or "python -m portaserve.bench.grammar_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=POS, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=POS, default=3, help="runs per figure; the median is reported")
    p.add_argument("--jump-mode", choices=["on", "whole-batch"], default="on",
                   help="the jump-forward mode of the second pass")
    ServerArgs.add_cli_args(p)
    p.set_defaults(max_total_tokens=20000)
    ns = p.parse_args(argv)
    base = ServerArgs.from_cli(ns)
    base.max_running_requests = max(base.max_running_requests, max(ns.batch_size))
    print(f"{'bs':>4} {'mode':<28} {'tokens':>7} {'seconds':>8} {'ms/token/seq':>13} {'overhead':>9}"
          f" {'decode step':>12} {'overhead':>9}")
    for jf in (False, True):
        args = dataclasses.replace(base, jump_forward=ns.jump_mode if jf else "off")
        with Engine(server_args=args) as eng:
            if jf is False:
                print(eng.rt.startup_report(), file=sys.stderr)
            for bs in ns.batch_size:  # each batch shape once through both paths (kernels, pools)
                eng.generate(["warm up"] * bs, {"max_new_tokens": 16, "json_schema": json.dumps(SCHEMA)})
                eng.generate(["warm up"] * bs, {"max_new_tokens": 16, "ignore_eos": True})
            for bs in ns.batch_size:
                ct, ft, ratio, tokens, lens, (cs, fs) = run(eng, bs, ns.repeats)
                per_c = ct / (tokens / bs) * 1e3  # ms per output token of one sequence
                per_f = ft / (tokens / bs) * 1e3
                label = "json_schema" + (f" + jump ({eng.get_server_info()['jump_forward']})" if jf else "")
                if not jf:
                    print(f"{bs:>4} {'unconstrained':<28} {tokens:>7} {ft:>8.2f} {per_f:>13.2f} {'':>9}"
                          f" {fs:>9.2f} ms {'':>9}")
                print(f"{bs:>4} {label:<28} {tokens:>7} {ct:>8.2f} {per_c:>13.2f} {ratio - 1:>+8.1%}"
                      f" {cs:>9.2f} ms {cs / fs - 1:>+8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
