"""Fixtures that start real `portaserve serve` processes on free local ports.

One server (the default model, --max-total-tokens 20000, --enable-metrics) is shared by
every test in tests/server; tests that need other flags start their own small one.
Each start costs ~15-20 s on a 2-core CPU, so there are as few as possible.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

MAX_TOTAL_TOKENS = 20000
STARTUP_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, extra_args: list[str], log_path: Path, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        cmd = [sys.executable, "-m", "portaserve.launch_server", "--port", str(self.port),
               "--log-level", "warning", *extra_args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n"
                                   + self.log_path.read_text(errors="replace")[-4000:])
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not become healthy in time:\n"
                           + self.log_path.read_text(errors="replace")[-4000:])

    def get(self, path, **kw):
        return requests.get(self.url + path, headers=self.headers(), timeout=kw.pop("timeout", 120), **kw)

    def post(self, path, **kw):
        return requests.post(self.url + path, headers=self.headers(), timeout=kw.pop("timeout", 120), **kw)

    def server_info(self) -> dict:
        r = self.get("/server_info")
        r.raise_for_status()
        return r.json()

    def abort_while_running(self, post, rid: str, timeout: float = 30.0):
        """Run post() (a request with id rid) on a thread, abort rid once the scheduler runs
        it, and return what post() returned."""
        import threading

        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", post()))
        t.start()
        deadline = time.monotonic() + timeout
        while self.server_info()["internal_states"][0]["num_running"] == 0:
            assert time.monotonic() < deadline, "the request never started running"
            time.sleep(0.1)
        assert self.post("/abort_request", json={"rid": rid}).status_code == 200
        t.join(timeout=timeout)
        assert not t.is_alive(), "the aborted request got no answer"
        return result["r"]

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Wait until nothing runs or waits in the scheduler; returns /server_info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.server_info()
            st = info["internal_states"][0]
            if st["num_running"] == 0 and st["num_waiting"] == 0:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {st}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = ServerProc(["--max-total-tokens", str(MAX_TOTAL_TOKENS), "--enable-metrics"],
                   tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def oai(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
