"""SGLang's native API over raw HTTP."""
from __future__ import annotations

import json

import pytest


def _sse(resp):
    """The data payloads of an SSE response, up to [DONE] (which must be there)."""
    out = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: "), line
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            return out
        out.append(json.loads(data))
    raise AssertionError("stream ended without data: [DONE]")


def test_generate_text_and_input_ids(server):
    sp = {"max_new_tokens": 8, "temperature": 0}
    r = server.post("/generate", json={"text": "The capital of France is", "sampling_params": sp})
    assert r.status_code == 200, r.text
    out = r.json()
    m = out["meta_info"]
    assert out["text"] and len(out["output_ids"]) == m["completion_tokens"]
    assert m["prompt_tokens"] == 5 and m["finish_reason"]["type"] in ("stop", "length")
    assert {"id", "cached_tokens", "e2e_latency"} <= set(m)
    # the same prompt as token ids gives the same tokens
    scored = server.post("/generate", json={"text": "The capital of France is", "return_logprob": True,
                                            "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 0}})
    ids = [e[1] for e in scored.json()["meta_info"]["input_token_logprobs"]]
    assert len(ids) == 5
    toks = server.post("/generate", json={"input_ids": ids, "sampling_params": sp}).json()
    assert toks["output_ids"] == out["output_ids"] and toks["text"] == out["text"]


def test_generate_batch_and_n(server):
    sp = {"max_new_tokens": 4, "temperature": 0}
    r = server.post("/generate", json={"text": ["Hello", "The sky is"], "sampling_params": sp})
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == 2
    single = server.post("/generate", json={"text": "The sky is", "sampling_params": sp}).json()
    assert outs[1]["output_ids"] == single["output_ids"]
    r = server.post("/generate", json={"input_ids": [[1, 2, 3], [4, 5, 6]],
                                       "sampling_params": [sp, {**sp, "max_new_tokens": 2}]})
    outs = r.json()
    assert [o["meta_info"]["completion_tokens"] for o in outs][1] <= 2
    r = server.post("/generate", json={"text": "Hi", "sampling_params": {**sp, "n": 2}})
    assert len(r.json()) == 2


def test_generate_stream_cumulative(server):
    body = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    full = server.post("/generate", json=body).json()
    with server.post("/generate", json={**body, "stream": True}, stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(r)
    texts = [c["text"] for c in chunks]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative
    assert texts[-1] == full["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert chunks[-1]["output_ids"] == full["output_ids"]


def test_generate_logprobs(server):
    text = "The quick brown fox jumps over the lazy dog"
    r = server.post("/generate", json={
        "text": text, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
        "return_text_in_logprobs": True}).json()
    m = r["meta_info"]
    ilp, olp = m["input_token_logprobs"], m["output_token_logprobs"]
    assert len(ilp) == m["prompt_tokens"] and len(olp) == m["completion_tokens"]
    assert ilp[0][0] is None and all(e[0] <= 0 for e in ilp[1:])
    assert "".join(e[2] for e in ilp) == text
    assert [e[1] for e in olp] == r["output_ids"]
    assert "".join(e[2] for e in olp) == r["text"]
    assert len(m["output_top_logprobs"]) == 3 and len(m["output_top_logprobs"][0]) == 2
    assert m["input_top_logprobs"][0] is None and len(m["input_top_logprobs"][1]) == 2
    # prompt scoring (what sglang's select does): max_new_tokens 0 from a start offset
    s = server.post("/generate", json={
        "text": text, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 5}).json()
    sm = s["meta_info"]
    assert s["output_ids"] == [] and sm["completion_tokens"] == 0
    assert len(sm["input_token_logprobs"]) == sm["prompt_tokens"] - 5
    assert [e[0] for e in sm["input_token_logprobs"]] == pytest.approx([e[0] for e in ilp[5:]], abs=1e-4)
    assert sm["input_token_logprobs"][0][2] is None  # no text unless asked


def test_info_endpoints(server):
    info = server.get("/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"].endswith(".gguf")
    assert "tokenizer_path" in info
    # Hugging Face's model_type (clients detect the model family by it), as SGLang
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
    si = server.get("/get_server_info").json()
    assert set(server.get("/server_info").json()) == set(si)  # both routes
    assert si["platform"] == "cpu" and si["max_total_num_tokens"] == 20000
    assert si["kv"]["max_total_tokens"] == 20000
    assert "ops" in si and si["version"]
    assert server.get("/health").status_code == 200
    assert server.get("/health_generate").status_code == 200
    assert server.get("/v1/models").json()["data"][0]["id"] == si["served_model_name"]


def test_metrics(server):
    server.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    r = server.get("/metrics")
    assert r.status_code == 200
    body = r.text
    for name in ("portaserve:num_requests_total", "portaserve:prompt_tokens_total",
                 "portaserve:generation_tokens_total", "portaserve:time_to_first_token_seconds_bucket",
                 "portaserve:inter_token_latency_seconds_bucket", "portaserve:e2e_request_latency_seconds_count",
                 "portaserve:num_queue_reqs", "portaserve:num_running_reqs", "portaserve:token_usage",
                 "portaserve:cache_hit_rate"):
        assert name in body, name


def _counter(server, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(f"portaserve:{name}_total{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def test_abort_request(server):
    rid = "abort-me-1"
    before = _counter(server, "num_aborted_requests")
    r = server.abort_while_running(lambda: server.post("/generate", json={
        "text": "Count: 1, 2, 3,", "rid": rid,
        "sampling_params": {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}).json(), rid)
    m = r["meta_info"]
    assert m["finish_reason"]["type"] == "abort" and m["completion_tokens"] < 400
    server.wait_idle()
    assert _counter(server, "num_aborted_requests") == before + 1  # the metric counts it


def test_a_request_whose_client_left_counts_as_finished_and_aborted(server):
    """num_finished_requests counts every request that ended, aborted ones too: one whose
    client went away mid-stream is counted in both (it was counted as aborted only)."""
    import httpx

    server.wait_idle()
    before = {n: _counter(server, n) for n in ("num_finished_requests", "num_aborted_requests")}
    body = {"text": "Count slowly: 1, 2, 3,", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/generate", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 3:
                    break
    server.wait_idle()
    assert _counter(server, "num_finished_requests") == before["num_finished_requests"] + 1
    assert _counter(server, "num_aborted_requests") == before["num_aborted_requests"] + 1


def test_abort_request_names_all_copies(server):
    """A request with rid R and n = 2 runs as R-0 and R-1: aborting R aborts both (as
    SGLang's prefix match does), and leaves a request named R + "2" alone."""
    import threading

    other = {}
    t = threading.Thread(target=lambda: other.setdefault("r", server.post("/generate", json={
        "text": "Count: 1, 2, 3,", "rid": "grp2",
        "sampling_params": {"max_new_tokens": 24, "ignore_eos": True, "temperature": 0}}).json()))
    t.start()
    r = server.abort_while_running(lambda: server.post("/generate", json={
        "text": "Count: 1, 2, 3,", "rid": "grp",
        "sampling_params": {"n": 2, "max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}).json(),
        "grp")
    t.join(timeout=120)
    assert [x["meta_info"]["id"] for x in r] == ["grp-0", "grp-1"]
    for x in r:
        assert x["meta_info"]["finish_reason"]["type"] == "abort", x["meta_info"]
        assert x["meta_info"]["completion_tokens"] < 400
    m = other["r"]["meta_info"]
    assert m["finish_reason"]["type"] == "length" and m["completion_tokens"] == 24
    # a batch under one string rid runs as R-<i> (choice k: R-<i>-<k>); R names them all
    r = server.abort_while_running(lambda: server.post("/generate", json={
        "text": ["Count: 1, 2, 3,", "Count: 4, 5,"], "rid": "bat",
        "sampling_params": {"n": 2, "max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}).json(),
        "bat")
    assert [x["meta_info"]["id"] for x in r] == ["bat-0-0", "bat-0-1", "bat-1-0", "bat-1-1"]
    assert all(x["meta_info"]["finish_reason"]["type"] == "abort" for x in r), r
    server.wait_idle()


def test_start_stop_profile(server, tmp_path):
    """/start_profile and /stop_profile (SGLang's): bad input is a 400 naming the problem,
    and a profiled request's steps land in the trace and the per-kind summary."""
    for body, msg in [({"num_steps": -1}, "positive integer"), ({"num_step": 3}, "unknown field"),
                      ({"activities": ["tpu"]}, "not available"), ({"num_steps": "x"}, "num_steps"),
                      ({"output_dir": "x\u0000y"}, "cannot create")]:
        r = server.post("/start_profile", json=body)
        assert r.status_code == 400, r.text
        assert msg in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    r = server.post("/stop_profile")
    assert r.status_code == 400 and "not running" in r.json()["error"]["message"]
    r = server.post("/start_profile", json={"output_dir": str(tmp_path)})
    assert r.status_code == 200, r.text
    assert server.post("/start_profile").status_code == 400  # already running
    out = server.post("/generate", json={"input_ids": [3, 14, 15, 92, 65],
                                         "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                             "ignore_eos": True}})
    assert out.status_code == 200
    r = server.post("/stop_profile")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["trace"].startswith(str(tmp_path)) and (tmp_path / res["trace"].split("/")[-1]).exists()
    s = res["summary"]
    # a 5-token prompt and 4 new tokens: one prompt pass and 3 decode steps (the first
    # token comes from the prompt pass), unless a concurrent test's request shared steps
    assert s["extend"]["steps"] >= 1 and s["decode"]["steps"] >= 3

    # a profile that cannot be written: an error answer, and the server keeps serving
    assert server.post("/start_profile", json={"output_dir": "/proc"}).status_code == 200
    r = server.post("/stop_profile")
    assert r.status_code == 400 and "writing the profile" in r.json()["error"]["message"], r.text
    assert server.get("/health").status_code == 200
    assert server.post("/generate", json={"input_ids": [3, 14], "sampling_params": {"max_new_tokens": 2}}).status_code == 200
