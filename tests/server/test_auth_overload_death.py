"""A second, small server with --api-key, tiny queue limits, --served-model-name and
--chat-template: auth (401), overload (503 with Retry-After), the name and template, and,
last, the scheduler process dying (the server exits non-zero); and a SIGTERM while profiling."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
import requests

from conftest import ServerProc

KEY = "sekret-key"
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    (d / "template.jinja").write_text(TEMPLATE)
    s = ServerProc(["--max-total-tokens", "4000", "--max-running-requests", "2",
                    "--max-queued-requests", "2", "--served-model-name", "my-model",
                    "--chat-template", str(d / "template.jinja")],
                   d / "server.log", api_key=KEY)
    yield s
    s.stop()


def test_warmup_ran_before_serving(small):
    """One 16-token warm-up request ran through the scheduler before the port opened (the
    first test on this server: no other request yet), and its prompt left the cache."""
    info = requests.get(small.url + "/server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    c = info["counters"]
    assert (c["prompt_tokens"], c["generated_tokens"], c["forward_extend"]) == (16, 8, 1), c
    assert info["kv"]["free"] == info["kv"]["max_total_tokens"]


def test_api_key(small):
    url = small.url
    assert requests.get(url + "/health").status_code == 200  # open
    for path in ("/v1/models", "/get_model_info", "/server_info", "/health_generate"):
        r = requests.get(url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.post(url + "/generate", json={"text": "x"}).status_code == 401
    assert requests.post(url + "/flush_cache").status_code == 401
    assert small.get("/v1/models").status_code == 200
    r = small.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200
    openai = pytest.importorskip("openai")
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="default", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    # a browser page on another origin: its preflight is answered without the key (a
    # browser never sends one there), and the real request still needs the key
    origin = {"Origin": "http://localhost:8080"}
    r = requests.options(url + "/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] in ("*", origin["Origin"])
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = requests.get(url + "/v1/models", headers=origin)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] in ("*", origin["Origin"])
    r = requests.get(url + "/v1/models", headers={**origin, **small.headers()})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", origin["Origin"])


def test_served_model_name_and_chat_template(small):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in c.models.list().data] == ["my-model"]
    r = c.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "Hi"}],
                                  max_tokens=2, temperature=0)
    assert r.model == "my-model"
    # "[user] Hi\n[assistant]" is a handful of tokens; the model's own template adds a system prompt
    assert r.usage.prompt_tokens < 12
    ids = small.post("/generate", json={"text": "[user] Hi\n[assistant]", "return_logprob": True,
                                        "logprob_start_len": 0,
                                        "sampling_params": {"max_new_tokens": 0}}).json()
    assert ids["meta_info"]["prompt_tokens"] == r.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="SmolLM2-135M-Instruct-typo", messages=[{"role": "user", "content": "x"}])


def test_overload_503_then_accepted_finish(small):
    hdr = {"Authorization": f"Bearer {KEY}"}
    body = {"text": "Count: 1, 2, 3,", "stream": True,
            "sampling_params": {"max_new_tokens": 16, "ignore_eos": True, "temperature": 0}}

    async def consume(resp):
        last = None
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                last = json.loads(line[6:])
            if line == "data: [DONE]":
                return last
        raise AssertionError("no [DONE]")

    async def main():
        async with httpx.AsyncClient(timeout=300, headers=hdr) as client:
            # 2 running + 2 queued fill the server: their headers come back once submitted
            streams = []
            for _ in range(4):
                req = client.build_request("POST", small.url + "/generate", json=body)
                resp = await client.send(req, stream=True)
                assert resp.status_code == 200
                streams.append(resp)
            t0 = time.monotonic()
            over = await client.post(small.url + "/generate",
                                     json={"text": "x", "sampling_params": {"max_new_tokens": 2}})
            elapsed = time.monotonic() - t0
            over_oai = await client.post(small.url + "/v1/completions",
                                         json={"prompt": "x", "max_tokens": 2})
            finals = await asyncio.gather(*[consume(s) for s in streams])
            for s in streams:
                await s.aclose()
            return over, elapsed, over_oai, finals

    over, elapsed, over_oai, finals = asyncio.run(main())
    assert over.status_code == 503, over.text
    assert over.headers.get("retry-after")
    assert elapsed < 3.0
    err = over.json()["error"]
    assert err["code"] == "overloaded" and "max-queued-requests" in err["message"]
    assert over_oai.status_code == 503
    for f in finals:
        assert f["meta_info"]["finish_reason"]["type"] == "length"
        assert f["meta_info"]["completion_tokens"] == 16
    # capacity is back
    assert small.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_scheduler_death_makes_server_exit_nonzero(small):
    info = small.server_info()
    sched_pid = info["http"]["scheduler_pid"]
    hdr = {"Authorization": f"Bearer {KEY}"}
    body = {"text": "Count: 1, 2, 3,", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    health: list = []

    def poll_health():
        while len(health) < 2000:
            try:
                health.append(requests.get(small.url + "/health", timeout=2).status_code)
            except requests.RequestException:
                health.append("down")
                return
            time.sleep(0.02)

    with httpx.Client(timeout=60, headers=hdr) as client:
        with client.stream("POST", small.url + "/generate", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    break  # the request is running
            t0 = time.monotonic()
            os.kill(sched_pid, signal.SIGKILL)
            poller = threading.Thread(target=poll_health)
            poller.start()
            rest = []
            try:
                for line in lines:
                    rest.append(line)
            except httpx.HTTPError:
                pass  # the server may close the connection
            assert time.monotonic() - t0 < 10, "the in-flight stream hung"
    # the in-flight request is told (an error event), or at worst its connection closes
    errors = [ln for ln in rest if '"error"' in ln]
    assert errors or "data: [DONE]" not in rest, rest[-3:]
    try:
        code = small.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 15 s of its scheduler dying")
    assert code != 0
    assert time.monotonic() - t0 < 15
    poller.join(timeout=10)
    assert 503 in health, health[:5] + health[-5:]  # unhealthy before it went away
    assert health[-1] == "down"


def test_sigterm_with_the_profiler_running_writes_its_trace(tmp_path):
    """`kill -TERM` of a server whose profiler runs: the scheduler process, finding its
    HTTP parent gone, stops the profiler and writes the trace. (Left running, torch's
    profiler state crashed the process at exit with SIGSEGV and wrote nothing.)"""
    s = ServerProc(["--max-total-tokens", "2000", "--skip-server-warmup"], tmp_path / "server.log")
    try:
        sched_pid = s.server_info()["http"]["scheduler_pid"]
        assert s.post("/start_profile", json={"output_dir": str(tmp_path / "prof")}).status_code == 200
    finally:
        s.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(sched_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the scheduler process outlived its HTTP parent by 30 s")
    assert list((tmp_path / "prof").glob("*.trace.json.gz")), (tmp_path / "server.log").read_text()[-3000:]
    assert "Segfault" not in (tmp_path / "server.log").read_text()
