"""Prometheus metrics (``--enable-metrics``), named like SGLang's with a ``portaserve:``
prefix.  Latencies are measured in the HTTP process, where the client sees them;
gauges of the scheduler's state are refreshed from the scheduler process on each scrape."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]
        self._m = model_name

        def c(name, doc):
            return Counter(f"portaserve:{name}", doc, lab, registry=r).labels(model_name)

        def g(name, doc):
            return Gauge(f"portaserve:{name}", doc, lab, registry=r).labels(model_name)

        def h(name, doc, buckets):
            return Histogram(f"portaserve:{name}", doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.requests_in = c("num_requests", "requests received (each of n choices counts)")
        self.finished = c("num_finished_requests", "requests finished in the scheduler (aborted ones too)")
        self.aborted = c("num_aborted_requests",
                         "requests aborted (client went away, /abort_request, refused or failed in the scheduler)")
        self.prompt_tokens = c("prompt_tokens", "prompt tokens of finished requests")
        self.generation_tokens = c("generation_tokens", "generated tokens of finished requests")
        self.cached_tokens = c("cached_tokens", "prompt tokens served from the prefix cache")
        self.ttft = h("time_to_first_token_seconds", "time to first token", _LAT)
        self.itl = h("inter_token_latency_seconds", "time between output tokens", _ITL)
        self.e2e = h("e2e_request_latency_seconds", "request latency, arrival to finish", _LAT)
        self.queue = g("num_queue_reqs", "requests waiting in the scheduler's queue")
        self.running = g("num_running_reqs", "requests running in the scheduler")
        self.usage = g("token_usage", "fraction of the KV pool held by requests in flight")
        self.kv_used = g("kv_used_tokens", "KV pool tokens in use (requests + cache)")
        self.kv_total = g("max_total_num_tokens", "KV pool size in tokens")
        self.hit_rate = g("cache_hit_rate", "cached prompt tokens / prompt tokens since start")

    def observe_itl(self, value: float, count: int) -> None:
        for _ in range(count):
            self.itl.observe(value)

    def on_finish(self, st, now: float) -> None:
        self.finished.inc()
        if (st.finished_reason or {}).get("type") == "abort":
            self.aborted.inc()
        m = st.meta
        self.prompt_tokens.inc(m.get("prompt_tokens", 0))
        self.generation_tokens.inc(m.get("completion_tokens", 0))
        self.cached_tokens.inc(m.get("cached_tokens", 0))
        self.e2e.observe(now - st.created)

    def update_from_stats(self, stats: dict) -> None:
        kv = stats["kv"]
        self.queue.set(stats["num_waiting"])
        self.running.set(stats["num_running"])
        self.usage.set(kv["usage"])
        self.kv_used.set(kv["used"])
        self.kv_total.set(kv["max_total_tokens"])
        self.hit_rate.set(stats["cache_hit_rate"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
