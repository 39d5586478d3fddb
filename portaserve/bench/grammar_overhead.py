"""Per-token cost of constrained decoding: the same prompts decoded with a JSON schema
and unconstrained with the same output lengths (ignore_eos), at several batch sizes.

    python -m portaserve.bench.grammar_overhead --batch-size 1 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 16}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                          "maxItems": 3}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}


def run(engine, bs: int, constrained: bool, lengths=None, repeats: int = 3):
    prompts = [f"Person #{i} as JSON:" for i in range(bs)]
    times, outs = [], None
    for _ in range(repeats):
        if constrained:
            sps = [{"max_new_tokens": 120, "temperature": 0, "json_schema": json.dumps(SCHEMA)}] * bs
        else:
            sps = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in lengths]
        engine.flush_cache()
        t = time.perf_counter()
        outs = engine.generate(prompts, sps)
        times.append(time.perf_counter() - t)
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return statistics.median(times), tokens, [o["meta_info"]["completion_tokens"] for o in outs]


def main(argv=None) -> int:
    from portaserve import Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    p.add_argument("--model-path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-total-tokens", type=int, default=20000)
    ns = p.parse_args(argv)
    print(f"{'bs':>4} {'mode':<28} {'tokens':>7} {'seconds':>8} {'ms/token/seq':>13} {'overhead':>9}")
    for jf in (False, True):
        with Engine(ns.model_path, device=ns.device, max_total_tokens=ns.max_total_tokens,
                    disable_jump_forward=not jf) as eng:
            eng.generate("warm up", {"max_new_tokens": 4, "json_schema": json.dumps(SCHEMA)})
            for bs in ns.batch_size:
                ct, ctok, lens = run(eng, bs, True)
                ft, ftok, _ = run(eng, bs, False, lens)
                steps_c = ct / (ctok / bs) * 1e3
                steps_f = ft / (ftok / bs) * 1e3
                label = "json_schema" + (" + jump-forward" if jf else "")
                if not jf:
                    print(f"{bs:>4} {'unconstrained':<28} {ftok:>7} {ft:>8.2f} {steps_f:>13.2f} {'':>9}")
                print(f"{bs:>4} {label:<28} {ctok:>7} {ct:>8.2f} {steps_c:>13.2f} {ct / ft - 1:>+8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
