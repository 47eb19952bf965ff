"""Prometheus metrics of the encoder server, in a registry of its own (no hidden globals)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("turboserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.queue_requests = Gauge("turboserve_queue_requests", "requests waiting or running", registry=r)
        self.queue_tokens = Gauge("turboserve_queue_tokens", "tokens waiting or running", registry=r)
        self.batch_size = Histogram("turboserve_batch_size", "inputs per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_tokens = Histogram("turboserve_batch_tokens", "real tokens per model batch",
                                      buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=r)
        self.batch_seconds = Histogram("turboserve_batch_seconds", "model time per batch", buckets=LATENCY_BUCKETS, registry=r)
        self.model_busy = Counter("turboserve_model_busy_seconds", "model thread time in forward passes and pooling "
                                  "(its rate is the share of wall time the model is busy)", registry=r)
        self.stage_seconds = Histogram("turboserve_request_stage_seconds", "request latency by stage",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)

    def queue(self, requests: int, tokens: int) -> None:
        self.queue_requests.set(requests)
        self.queue_tokens.set(tokens)

    def batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def stages(self, **seconds: float) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(value)
