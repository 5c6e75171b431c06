"""Prometheus metrics of one server (its own registry, so several apps in one process never collide): requests
by route and status, tokens, running and waiting sequences, latency histograms, and MoE expert load per layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineLoad(Collector):
    """Running and waiting sequences, read from the engines when scraped."""

    def __init__(self, loads: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.loads = loads

    def collect(self):
        running = GaugeMetricFamily("stagelm_running_sequences", "Sequences in the decode batch", labels=["model"])
        waiting = GaugeMetricFamily("stagelm_queue_depth", "Sequences waiting to join the batch", labels=["model"])
        for name, n_running, n_waiting in self.loads():
            running.add_metric([name], n_running)
            waiting.add_metric([name], n_waiting)
        yield running
        yield waiting


class ServerMetrics:
    def __init__(self, loads: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stagelm_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "stagelm_http_request_duration_seconds",
            "Time from request to response headers, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter("stagelm_rejected_requests", "Requests refused with 429", ["model"], registry=r)
        self.prompt_tokens = Counter("stagelm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("stagelm_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "stagelm_time_to_first_token_seconds",
            "Time from accepting a request to its first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_latency = Histogram(
            "stagelm_generation_duration_seconds",
            "Time from accepting a request to its last token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.expert_tokens = Counter(
            "stagelm_expert_tokens",
            "Tokens routed to each expert of each MoE layer (prompt and generated)",
            ["model", "layer", "expert"],
            registry=r,
        )
        self.router_entropy = Histogram(
            "stagelm_router_entropy_nats",
            "Mean router entropy of a sequence, per MoE layer",
            ["model", "layer"],
            buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0),
            registry=r,
        )
        r.register(_EngineLoad(loads))

    def record_routing(self, model: str, routing: dict[str, dict] | None) -> None:
        for layer, stats in (routing or {}).items():
            for expert, tokens in enumerate(stats["expert_tokens"]):
                if tokens:
                    self.expert_tokens.labels(model, layer, str(expert)).inc(tokens)
            self.router_entropy.labels(model, layer).observe(stats["router_entropy"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
