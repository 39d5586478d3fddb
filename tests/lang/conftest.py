"""One `portaserve serve` (default model) shared by every test in tests/lang.

Own small fixture rather than tests/server's: the two suites run in one pytest session
and each keeps its server's flags to itself."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path, *extra, timeout: float = 300.0):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "portaserve.launch_server", "--port", str(port),
                             "--log-level", "warning", *extra],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"server exited with {proc.returncode}:\n"
                               + open(log_path, errors="replace").read()[-4000:])
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc, log)
    raise RuntimeError("server did not become healthy in time")


def stop_server(proc, log) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    proc, url, log = start_server(tmp_path_factory.mktemp("lang") / "server.log",
                                  "--max-total-tokens", "20000")
    yield url
    stop_server(proc, log)


@pytest.fixture(scope="module")
def backend(server_url):
    import portaserve.lang as pl

    return pl.RuntimeEndpoint(server_url)
