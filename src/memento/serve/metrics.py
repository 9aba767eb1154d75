"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Gauges and engine counters are read from the engine thread's latest snapshot at scrape time;
latency histograms are observed by the engine thread as tokens come out.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "memento:"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Running/waiting sequences, KV tokens in use vs budget, evictions, preemptions, steps."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        gauges = {
            "num_requests_running": ("Sequences (one per choice) in the running batch.", len(s["running"])),
            "num_requests_waiting": ("Sequences waiting to join the batch.", s["waiting"]),
            "kv_cache_tokens": ("KV tokens cached over all running sequences.", s["kv"]),
            "kv_cache_peak_tokens": (
                "Most KV tokens cached at once since start (prefill included).",
                s["peak"],
            ),
        }
        if s.get("budget"):
            gauges["kv_cache_budget_tokens"] = ("The KV-token budget (--kv-budget-tokens).", s["budget"])
            gauges["kv_cache_usage_perc"] = ("KV tokens in use / budget (0..1).", s["kv"] / s["budget"])
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family
        counters = {
            "evictions": ("Blocks evicted from the KV cache (prompt-resident blocks included).", s["ev"]),
            "preemptions": ("Sequences preempted to stay within the KV budget.", s["pre"]),
            "engine_steps": ("Decode steps of the engine.", s["steps"]),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family


class Metrics:
    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Request arrival to its first generated token.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between two tokens of one choice.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Request arrival to its last token.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            PREFIX + "request_success", "Finished choices by finish reason.", ["finished_reason"], registry=r
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of accepted requests.", registry=r
        )
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        r.register(_EngineCollector(snapshot))
