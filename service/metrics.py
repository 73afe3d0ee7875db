"""Prometheus metrics: HTTP requests and latency, and jobs by status (read from the store at scrape time).

Each app gets its own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .store import JobStore

log = logging.getLogger("certiprune.metrics")


class _JobsCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("certiprune_jobs", "Jobs in the store by status.", labels=["status"])
        try:
            counts = self.store.counts_by_status()
        except Exception:  # a scrape must not fail because the database hiccuped
            log.warning("could not count jobs for /metrics", exc_info=True)
            counts = {}
        for status, n in counts.items():
            family.add_metric([status], n)
        yield family


class Metrics:
    def __init__(self, store: JobStore) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "certiprune_http_requests", "HTTP requests by method, route template and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "certiprune_http_request_duration_seconds", "HTTP request latency by route template.",
            ["method", "route"], registry=self.registry,
        )
        self.jobs_submitted = Counter("certiprune_jobs_submitted", "Jobs accepted by this API process.",
                                      registry=self.registry)
        self.registry.register(_JobsCollector(store))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
