"""The reward server's Prometheus metrics: request counts and latency per endpoint, items graded
and failed by reason, and the grading pool's own gauges and counters read at scrape time. One
registry per app, so several apps in one process (tests) keep separate counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rewards.pool import TIMEOUT, GradingPool

__all__ = ["Metrics", "PoolCollector"]


class PoolCollector:
    """Exports the grading pool's own counters at scrape time (they live in the pool)."""

    def __init__(self, get_pool: Callable[[], GradingPool | None]) -> None:
        self._get_pool = get_pool

    def collect(self) -> Any:
        pool = self._get_pool()
        if pool is None:
            return
        s = pool.stats()
        yield GaugeMetricFamily("papo_reward_workers", "grading worker processes configured", value=s["workers"])
        yield GaugeMetricFamily("papo_reward_workers_alive", "grading worker processes ready", value=s["workers_alive"])
        yield GaugeMetricFamily("papo_reward_pending_items", "items queued for grading", value=s["pending"])
        yield CounterMetricFamily(
            "papo_reward_worker_restarts",
            "grading workers replaced (after a timeout or crash)",
            value=s["worker_restarts"],
        )
        yield CounterMetricFamily("papo_reward_worker_crashes", "grading workers that died", value=s["worker_crashes"])


class Metrics:
    """The metrics of one app; ``get_pool`` returns its grading pool (None while stopped)."""

    def __init__(self, get_pool: Callable[[], GradingPool | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("papo_reward_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "papo_reward_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.items = Counter(
            "papo_reward_items", "items graded (including failed)", ["reward_fn"], registry=self.registry
        )
        self.item_errors = Counter(
            "papo_reward_item_errors",
            "items that scored 0 because grading failed, by reason",
            ["reward_fn", "error"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "papo_reward_item_timeouts",
            "items over the per-item grading timeout",
            ["reward_fn"],
            registry=self.registry,
        )
        self.registry.register(PoolCollector(get_pool))

    def observe_items(self, reward_fn: str, results: Sequence[Mapping[str, Any]]) -> None:
        self.items.labels(reward_fn).inc(len(results))
        for r in results:
            err = r.get("error")
            if err is not None:
                self.item_errors.labels(reward_fn, err).inc()
                if err == TIMEOUT:
                    self.timeouts.labels(reward_fn).inc()
