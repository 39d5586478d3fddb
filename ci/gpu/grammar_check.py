"""Constrained decoding on the GPU through the overlap scheduler: outputs parse, and
match a run without the overlap scheduler (greedy)."""
import json, sys, time
from portaserve import Engine
from portaserve.bench.grammar_overhead import SCHEMA

common = dict(model_path="/tmp/llama8b", load_format="dummy", dtype="bfloat16", device="cuda",
              tokenizer_path=sys.argv[1], context_length=4096, max_total_tokens=20000)
res = {}
for ov in (True, False):
    with Engine(disable_overlap_schedule=not ov, **common) as e:
        print("overlap", e.rt.scheduler.overlap)
        sps = [{"max_new_tokens": 120, "temperature": 1.0 if i % 2 else 0.0, "sampling_seed": i,
                "json_schema": json.dumps(SCHEMA)} for i in range(16)]
        outs = e.generate([f"Person #{i} as JSON:" for i in range(16)], sps)
        bad = 0
        for o in outs:
            try:
                d = json.loads(o["text"])
                assert set(d) == set(SCHEMA["properties"]) and 0 <= d["age"] <= 120
            except Exception as ex:
                bad += 1
                print("BAD", repr(o["text"]), o["meta_info"]["finish_reason"], ex)
        c = e.get_server_info()["counters"]
        print("overlap" if ov else "plain", "invalid:", bad, "finish:", sorted({o["meta_info"]["finish_reason"]["type"] for o in outs}),
              "jump_forward_tokens:", c["jump_forward_tokens"], "decode passes:", c["forward_decode"])
        res[ov] = [o["output_ids"] for o in outs]
print("greedy rows identical overlap vs plain:", sum(res[True][i] == res[False][i] for i in range(0, 16, 2)), "of 8")
