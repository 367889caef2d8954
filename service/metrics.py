"""Prometheus metrics of one service process, in a registry of its own (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Counters and histograms the service updates; label values never carry ids or keys."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.charges = Counter(
            "saju_charges",
            "Charge results by outcome and Toss code",
            ["outcome", "code"],
            registry=r,
        )
        self.toss_latency = Histogram(
            "saju_toss_seconds",
            "Toss API call latency",
            ["api"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.toss_429 = Counter("saju_toss_429", "Toss answers 429 by API", ["api"], registry=r)
        self.doorbell_rings = Counter("saju_doorbell_rings", "Doorbell rings received", registry=r)
        self.lease_conflicts = Counter(
            "saju_lease_conflicts", "Results refused because the lease had moved on", registry=r
        )
        self.webhooks = Counter(
            "saju_webhooks",
            "Webhooks received by event type and result",
            ["type", "result"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "saju_queue_depth",
            "Work per queue: ready to claim, leased, or leased past its expiry",
            ["queue", "state"],
            registry=r,
        )
