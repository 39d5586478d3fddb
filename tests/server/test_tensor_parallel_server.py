"""`portaserve serve --tp 2` spread over two "nodes" (two processes on this host, meeting
at --dist-init-addr, the way a two-machine deployment would): HTTP answers must equal
the single-rank engine's greedy tokens, and the second node exits with the server."""
from __future__ import annotations

import subprocess
import sys
import time

from conftest import ServerProc, free_port

from tests.conftest import make_tiny_checkpoint, random_prompts


def _quiet(fn, *a, **k):
    try:
        fn(*a, **k)
    except Exception:
        pass  # the server goes away mid-request on purpose


def test_serve_tp2_two_nodes(tmp_path):
    from portaserve import Engine

    path = make_tiny_checkpoint(tmp_path, "llama3")
    prompts = random_prompts(4, 512, 5, 30, seed=11)
    sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=2000) as eng:
        ref = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]

    common = ["--model-path", str(path), "--device", "cpu", "--skip-tokenizer-init",
              "--max-total-tokens", "2000", "--tp", "2", "--nnodes", "2",
              "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    node1_log = open(tmp_path / "node1.log", "wb")
    node1 = subprocess.Popen([sys.executable, "-m", "portaserve.cli", "serve", *common,
                              "--node-rank", "1"], stdout=node1_log, stderr=subprocess.STDOUT)
    server = None
    try:
        server = ServerProc([*common, "--node-rank", "0"], tmp_path / "node0.log")
        assert server.server_info()["tp_size"] == 2
        for p, want in zip(prompts, ref):
            r = server.post("/generate", json={"input_ids": p, "sampling_params": sp})
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == want
        # a batch in flight together takes the same path through both ranks' schedulers
        r = server.post("/generate", json={"input_ids": prompts, "sampling_params": sp})
        assert [o["output_ids"] for o in r.json()] == ref
        # stop while a long request is decoding: the ranks must stop together, not leave
        # node 1 inside a forward pass that node 0 never joins
        import threading

        long_sp = {"max_new_tokens": 900, "temperature": 0, "ignore_eos": True}
        t = threading.Thread(target=lambda: _quiet(server.post, "/generate",
                                                   json={"input_ids": prompts[0], "sampling_params": long_sp}),
                             daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while server.server_info()["internal_states"][0]["num_running"] == 0:
            assert time.monotonic() < deadline, "the long request never started"
            time.sleep(0.1)
    finally:
        if server is not None:
            server.stop()
        try:
            node1.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node1.kill()
            raise AssertionError("node 1 did not exit after the server stopped:\n"
                                 + (tmp_path / "node1.log").read_text(errors="replace")[-3000:])
