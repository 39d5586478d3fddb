"""One table from the JSON files ci/gpu/all.sh leaves in OUT: each figure next to its
target (docs/BENCHMARKS.md holds the references).  Missing files show as 'not run'."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/out")


def load(name):
    p = out / name
    text = p.read_text().strip() if p.exists() else ""
    if not text:  # not run, or cut off before it wrote anything
        return None
    return json.loads(text.splitlines()[-1] if p.suffix == ".jsonl" else text)


rows = []


def row(figure, value, target):
    rows.append((figure, value if value is not None else "not run", target))


ob = load("one_batch.json")
by_bs = {r["batch_size"]: r for r in ob["results"]} if ob else {}
fmt_ms = lambda r, k="decode_median_ms": f"{r[k]:.2f} ms" if r else None  # noqa: E731
row("batch-1 decode, 128 in (ms/token)", fmt_ms(by_bs.get(1)), "<= 6.0 (H100)")
dev = (ob or {}).get("device", {})
if by_bs.get(1) and dev.get("copy_bytes_per_s"):
    floor = dev["weight_bytes"] / dev["copy_bytes_per_s"] * 1e3
    row("batch-1 decode vs weights-read floor", f"{by_bs[1]['decode_median_ms'] / floor:.2f}x of {floor:.2f} ms "
        f"({dev['weight_bytes'] / 1e9:.2f} GB at a copy's {dev['copy_bytes_per_s'] / 1e12:.2f} TB/s)", "physical limit")
row("batch-128 decode step", fmt_ms(by_bs.get(128)), "<= 11 (H100)")
for bs in (1, 32):
    r = by_bs.get(bs)
    hf = r and r.get("hf_decode_ms_per_step")
    row(f"vs transformers generate, batch {bs}", f"{hf / r['decode_median_ms']:.1f}x" if hf else None, "ratio")
off = load("offline_random.json")
row("offline random 500 prompts (out tok/s)", off and f"{off['portaserve']['output_tok_s']:,.0f}", ">= 4,500 (H100)")
c = off and off["portaserve"].get("counters")
row("  its prompt passes / decode steps", c and f"{c['forward_extend']} / {c['forward_decode']}", "measured")
lof = off and off.get("portaserve --schedule-policy lof")
row("  the same, --schedule-policy lof", lof and f"{lof['output_tok_s']:,.0f} "
    f"({lof['output_tok_s'] / off['portaserve']['output_tok_s']:.2f}x fcfs)", "measured")
fp8 = load("offline_random_fp8.json")
fp8_tok = fp8 and fp8["portaserve"]["output_tok_s"]
row("  the same, --kv-cache-dtype fp8_e4m3", fp8 and f"{fp8_tok:,.0f}" + (
    f" ({fp8_tok / off['portaserve']['output_tok_s']:.2f}x bf16)" if off else ""), ">= 4,500 (H100)")
gsp = load("offline_gsp.json")
if gsp:
    on, no = gsp["portaserve"], gsp.get("portaserve --disable-radix-cache")
    row("gsp 64x16 cache hit rate", f"{on['cache_hit_rate']:.1%}", ">= 85% (ideal 88.2%)")
    row("gsp speed-up vs --disable-radix-cache", no and f"{on['output_tok_s'] / no['output_tok_s']:.2f}x", ">= 3x")
    off = gsp.get("portaserve --cascade-attention off")
    row("gsp cascade attention vs off", off and f"{on['output_tok_s'] / off['output_tok_s']:.2f}x", "(> 1x)")
else:
    row("gsp 64x16", None, "hit >= 85%, >= 3x")
sv = load("serving.jsonl")
row("online 100 prompts @1 rps median TTFT", sv and f"{sv['median_ttft_ms']:.1f} ms", "< 60 ms")
row("online median ITL", sv and f"{sv['median_itl_ms']:.2f} ms", "< 8 ms")
moe = load("moe.json")
for r in (moe or {}).get("results", []):
    row(f"Qwen3-30B-A3B shape decode, batch {r['batch_size']}", fmt_ms(r), "measured")
gemm = load("gemm.json")
if gemm:
    for kind in ("fp8", "int8", "int4"):
        rs = [r for r in gemm["rows"] if r["kind"] == kind]
        dec = [r["speedup_vs_bf16"] for r in rs if r["M"] <= 64]
        pre = [r["speedup_vs_bf16"] for r in rs if r["M"] > 64]
        if rs:
            row(f"{kind} GEMM vs bf16, decode M<=64 / prefill", f"{min(dec):.2f}-{max(dec):.2f}x / "
                f"{min(pre):.2f}-{max(pre):.2f}x", "> 1x")
tp = load("one_batch_tp2.json")
for r in (tp or {}).get("results", []):
    base = by_bs.get(r["batch_size"])
    ratio = f" ({base['decode_median_ms'] / r['decode_median_ms']:.2f}x TP=1)" if base else ""
    row(f"TP=2 decode, batch {r['batch_size']}", fmt_ms(r) + ratio, "measured")

tests = out / "tests.log"
last = tests.exists() and [ln for ln in tests.read_text().splitlines()
                           if " in " in ln and any(w in ln for w in ("passed", "failed", "error"))]
row("GPU tests (tests/triton, tests/gpu, quantization)", last[-1].strip("= ") if last else None, "all pass")

w = max(len(r[0]) for r in rows)
print(f"| {'figure':<{w}} | measured | target |\n|{'-' * (w + 2)}|---|---|")
for f, v, t in rows:
    print(f"| {f:<{w}} | {v} | {t} |")
