"""SGLang launch flags: --schedule-conservativeness changes admission, --dp-size is refused
with a message, the flags reach the server (tests/server/test_flags_server.py streams)."""
from __future__ import annotations

import pytest

from tests.conftest import random_prompts


def _admitted(path, conservativeness: float) -> int:
    from portaserve.core.request_builder import build_req
    from portaserve.runtime import build_runtime
    from portaserve.server_args import ServerArgs

    rt = build_runtime(ServerArgs(model_path=str(path), skip_tokenizer_init=True, grammar_backend="none",
                                  max_total_tokens=400, max_running_requests=16,
                                  schedule_conservativeness=conservativeness))
    sched = rt.scheduler
    for i, p in enumerate(random_prompts(8, 512, 10, 10, seed=1)):
        sched.add_request(build_req(rt.limits(), None, None, p, {"max_new_tokens": 100, "ignore_eos": True,
                                                                 "temperature": 0}, rid=str(i)))
    sched.step()
    return len(sched.running)


def test_schedule_conservativeness_reserves_more_or_less(tiny_models):
    """8 requests of 10 prompt tokens and 100 to generate, a 400-token pool: admission keeps
    ratio x 100 tokens free per running request, the ratio being 0.7 x conservativeness
    (at most 1): 0.2 -> 24 tokens each, all 8 fit; 1 -> 80, 5 fit; 2 -> 110, 3 fit."""
    path = tiny_models("llama3")
    counts = [_admitted(path, c) for c in (0.2, 1.0, 2.0)]
    assert counts == [8, 5, 3], counts


def test_dp_size_is_refused_with_a_message():
    from portaserve.server_args import ServerArgs

    with pytest.raises(ValueError, match="data parallelism is not supported; run 2 servers"):
        ServerArgs(dp_size=2).validate()
    for bad, words in (({"stream_interval": 0}, "--stream-interval"),
                       ({"schedule_conservativeness": 0}, "--schedule-conservativeness")):
        with pytest.raises(ValueError, match=words):
            ServerArgs(**bad).validate()
