"""SGLang launch flags on a real server: --stream-interval batches streamed tokens,
--log-requests logs each request, --enable-cache-report is accepted."""
from __future__ import annotations

import json

import pytest

from conftest import ServerProc


@pytest.fixture(scope="module")
def flags_server(tmp_path_factory):
    s = ServerProc(["--max-total-tokens", "4096", "--stream-interval", "4", "--log-requests",
                    "--enable-cache-report", "--schedule-conservativeness", "1.5", "--log-level", "info"],
                   tmp_path_factory.mktemp("flags") / "server.log")
    yield s
    s.stop()


def test_stream_interval_sends_tokens_four_at_a_time(flags_server):
    body = {"text": "Once upon a time", "rid": "interval-1",
            "sampling_params": {"max_new_tokens": 17, "temperature": 0, "ignore_eos": True}}
    whole = flags_server.post("/generate", json=body | {"rid": "interval-0"}).json()
    r = flags_server.post("/generate", json=body | {"stream": True}, stream=True)
    counts, text = [], ""
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("data: ") and line != "data: [DONE]":
            ev = json.loads(line[6:])
            counts.append(ev["meta_info"]["completion_tokens"])
            text = ev["text"]  # cumulative
    steps = [b - a for a, b in zip([0] + counts, counts)]
    # the first token at once, then four at a time, the end at once
    assert steps[0] == 1 and all(s == 4 for s in steps[1:-1]) and 1 <= steps[-1] <= 4, steps
    assert counts[-1] == 17 and text == whole["text"]


def test_log_requests_and_flags_reported(flags_server):
    flags_server.post("/generate", json={"text": "Hello", "rid": "logged-1",
                                         "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    args = flags_server.server_info()
    assert args["stream_interval"] == 4 and args["schedule_conservativeness"] == 1.5
    log = flags_server.log_path.read_text(errors="replace")
    assert "request logged-1: " in log and "prompt tokens, sampling {\"max_new_tokens\": 3, \"temperature\": 0" in log, log[-2000:]
    assert "request logged-1 finished:" in log and '"type": "length"' in log
    # cached tokens are reported without the flag as with it
    r = flags_server.post("/v1/completions", json={"model": "default", "prompt": "Hello there", "max_tokens": 1})
    assert "cached_tokens" in r.json()["usage"]["prompt_tokens_details"]
