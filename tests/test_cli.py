"""The portaserve command line."""
from __future__ import annotations

import subprocess
import sys


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "portaserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_env_prints_platforms_and_op_table():
    r = run("env")
    assert r.returncode == 0, r.stderr
    assert "* cpu" in r.stdout and "available" in r.stdout
    for name in ("cuda", "rocm", "xpu", "tpu"):
        assert f"  {name}" in r.stdout and "unavailable:" in r.stdout
    for op in ("attention_decode", "attention_extend", "rmsnorm", "rotary_embedding", "top_k_top_p_min_p_sample"):
        assert op in r.stdout


def test_env_explicit_unusable_device_fails_loudly():
    r = run("env", "--device", "cuda")
    assert r.returncode != 0 and "cuda cannot be used here" in r.stderr


def test_env_bad_kernel_override():
    r = run("env", "--kernel", "attention_decode=nonexistent")
    assert r.returncode == 2 and "no such provider" in r.stderr and "Traceback" not in r.stderr


def test_generate_command():
    r = run("generate", "What is the capital of France?", "--max-new-tokens", "16",
            "--max-total-tokens", "2048")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert "KV pool: 2048 tokens" in r.stderr and "attention_decode" in r.stderr


def test_env_honours_portaserve_device(monkeypatch):
    monkeypatch.setenv("PORTASERVE_DEVICE", "cuda")  # no --device: its default, auto, defers to it
    r = run("env")
    assert r.returncode == 2 and "PORTASERVE_DEVICE=cuda cannot be used here" in r.stderr


def _config_only(tiny_models, tmp_path):
    import shutil

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    shutil.copy(tiny_models("llama3") / "config.json", cfg / "config.json")
    return cfg


def test_config_only_folder_without_a_tokenizer_says_what_to_pass(tiny_models, tmp_path):
    cfg = _config_only(tiny_models, tmp_path)
    r = run("generate", "hi", "--model-path", str(cfg), "--load-format", "dummy")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "has no tokenizer" in r.stderr and "--tokenizer-path" in r.stderr and "--skip-tokenizer-init" in r.stderr


def test_bench_offline_and_one_batch_commands(tiny_models, tmp_path):
    """`portaserve bench offline` and `bench one-batch` run the benchmarks on random weights
    from a config-only folder (--load-format dummy), as the GPU leg does on the 8B shape."""
    import json

    cfg = _config_only(tiny_models, tmp_path)
    out = tmp_path / "offline.json"
    r = run("bench", "offline", "--model-path", str(cfg), "--load-format", "dummy", "--dataset", "random",
            "--num-prompts", "6", "--random-input-len", "40", "--random-output-len", "8",
            "--max-total-tokens", "2048", "--output-file", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["portaserve"]
    assert res["output_tokens"] > 0 and res["output_tok_s"] > 0
    out = tmp_path / "one_batch.json"
    r = run("bench", "one-batch", "--model-path", str(cfg), "--load-format", "dummy", "--batch-size", "1", "2",
            "--input-len", "16", "--output-len", "4", "--max-total-tokens", "2048", "--output-file", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [x["batch_size"] for x in rows] == [1, 2] and all(x["decode_median_ms"] > 0 for x in rows)
    r = run("bench", "one-batch", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: portaserve bench one-batch")


def test_bench_schedule_command(tmp_path):
    """`portaserve bench schedule` replays a dataset through the scheduler with no model
    (its counts are checked against the engine in test_schedule_policy.py)."""
    import json

    out = tmp_path / "schedule.json"
    r = run("bench", "schedule", "--dataset", "random", "--num-prompts", "50", "--random-input-len", "300",
            "--random-output-len", "200", "--max-total-tokens", "3000", "--schedule-policy", "fcfs", "lof",
            "--output-file", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) == {"fcfs", "lof"} and all(v["decode_steps"] > 0 for v in res.values())
    assert res["lof"]["decode_steps"] < res["fcfs"]["decode_steps"]  # the long outputs no longer run last
    assert "tail steps" in r.stdout and "lof" in r.stdout


def test_bad_flags_are_one_line_errors_before_the_model_loads():
    """Found by probing: each of these was a traceback (some after the model had loaded),
    or was accepted and broke every request later."""
    for args, words in [(("serve", "--port", "70000"), "not a TCP port"),
                        (("serve", "--context-length", "0"), "--context-length must be >= 1"),
                        (("serve", "--max-prefill-tokens", "-1"), "--max-prefill-tokens must be >= 1"),
                        (("generate", "hi", "--temperature", "nan"), "temperature"),
                        (("generate", "hi", "--max-new-tokens", "-1"), "max_new_tokens"),
                        (("bench", "one-batch", "--batch-size", "-1"), "--batch-size: must be at least 1"),
                        (("serve", "--host", "bogus.invalid"), "cannot be resolved"),
                        (("serve", "--device", "foo"), "--device 'foo': unknown device"),
                        # the benchmarks' options and inputs (a second probe): each was a traceback,
                        # ran anyway, or failed only after the whole run
                        (("bench", "one-batch", "--model-path", "/nonexistent"), "bench one-batch: error: model path"),
                        (("bench", "offline", "--num-prompts", "-1"), "--num-prompts: must be at least 1"),
                        (("bench", "grammar", "--repeats", "0"), "--repeats: must be at least 1"),
                        (("bench", "lang-tree", "--width", "0"), "--width: must be at least 1"),
                        (("bench", "sampling", "--top-p", "2"), "--top-p: must be between 0 and 1"),
                        (("bench", "cascade", "--device", "foo"), "bench cascade: error: unknown device 'foo'"),
                        (("bench", "serving", "--request-rate", "0"), "--request-rate: must be greater than 0"),
                        (("bench", "serving", "--random-range-ratio", "nan"), "--random-range-ratio: must be at least"),
                        (("bench", "serving", "--output-file", "/nonexistent-dir/x.jsonl"), "--output-file:"),
                        (("bench", "schedule", "--max-total-tokens", "500", "--schedule-policy", "sjf"),
                         "--schedule-policy: invalid choice: 'sjf'"),
                        (("bench", "schedule", "--max-total-tokens", "100"), "request 0 does not fit"),
                        (("bench", "schedule", "--max-total-tokens", "5000", "--page-size", "0"),
                         "--page-size must be >= 1"),
                        # 35 + 1 tokens in 40 slots of pages of 16 (32 usable): the replay looped forever
                        (("bench", "schedule", "--dataset", "random", "--num-prompts", "1", "--random-input-len",
                          "35", "--random-output-len", "1", "--random-range-ratio", "1", "--page-size", "16",
                          "--max-total-tokens", "40"), "KV cache holds 32 tokens"),
                        (("bench", "schedule", "--max-total-tokens", "5000", "--vocab-size", "1"),
                         "--vocab-size 1: at least 128"),
                        (("bench", "schedule", "--max-total-tokens", "5000", "--min-input-len", "50",
                          "--max-input-len", "10"), "--min-input-len (50) is greater than --max-input-len (10)"),
                        (("bench", "schedule", "--max-total-tokens", "5000", "--context-length", "100000000"),
                         "the request table would take"),
                        (("bench", "offline", "--compare-schedule-policy", "fcfs"), "the main run's policy already")]:
        r = run(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr[-1000:])
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1000:])
        if args[:2] != ("bench", "schedule"):  # loads no model; its refusals may name the pool
            assert "KV pool" not in r.stderr  # refused before loading anything


def test_generate_takes_chat_template_and_reports_a_missing_tokenizer_path():
    r = run("generate", "Hi", "--max-new-tokens", "1", "--max-total-tokens", "2048",
            "--chat-template", "{% for m in messages %}QQQ {{ m.content }}{% endfor %}")
    assert r.returncode == 0, r.stderr[-2000:]
    default = run("generate", "Hi", "--max-new-tokens", "1", "--max-total-tokens", "2048")
    n = [int(x.stderr.rsplit("[", 1)[1].split()[0]) for x in (r, default)]  # "[N prompt tokens, ..."
    assert n[0] < 6 < n[1], n  # "QQQ Hi", not the model's own template (which was used regardless)
    r = run("generate", "Hi", "--chat-template", "/nonexistent.jinja")
    assert r.returncode == 2 and "neither a file nor a Jinja template" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "Hi", "--tokenizer-path", "/nonexistent/tokenizer")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/nonexistent/tokenizer" in r.stderr
