"""What a scrape of the worker's main process reads: every process's metric files, and the
fleet's gauges.

The fleet gauges (accounts by status, the due backlog, the circuit breaker, the shared STS
rate, queue lengths) come from the database and Redis, read by the main process when scraped
(the database at most every `METRICS_DATABASE_INTERVAL_SECONDS`, through a CachedValue).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from worker.cached_value import CachedValue
from worker.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric


def read_process_files() -> list[Metric]:
    """Every process's metric files, read again if one is caught half-created (a process's first
    value of a kind creates its file, and an empty file cannot be read yet)."""
    from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

    files = MultiProcessCollector(None)  # type: ignore[no-untyped-call]
    for attempt in range(3):
        try:
            return list(files.collect())  # type: ignore[no-untyped-call]
        except (struct.error, ValueError):
            if attempt == 2:
                raise
            time.sleep(0.01)
    return []


def worker_registry(*collectors: Any) -> CollectorRegistry:
    """The registry the worker's main process serves: every process's files, and `collectors`."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    class ProcessFiles:
        """The processes' files (read_process_files)."""

        def collect(self) -> Iterable[Metric]:
            return read_process_files()

    registry = CollectorRegistry()
    registry.register(ProcessFiles())
    for collector in collectors:
        registry.register(collector)
    return registry


# --- the main process's gauges: the fleet, from the database and Redis -----------------------


class FleetCollector:
    """Gauges of the whole fleet, read by the main process when scraped."""

    def __init__(self, fleet: CachedValue, broker: CachedValue, settings: Settings) -> None:
        self._fleet = fleet
        self._broker = broker
        self._settings = settings

    def describe(self) -> list[Metric]:
        # Nothing up front: the registry must not run the queries when the collector registers.
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

        summary = self._fleet.get()
        yield GaugeMetricFamily(
            "verifier_fleet_query_up",
            "Whether the last read of the accounts table worked (the gauges below need it).",
            value=0 if summary is None else 1,
        )
        if summary is not None:
            by_status = GaugeMetricFamily(
                "verifier_accounts", "Accounts by status.", labels=["status"]
            )
            for status in ("pending", "connected", "failed"):
                by_status.add_metric([status], summary.by_status.get(status, 0))
            yield by_status
            for name, doc, value in (
                ("verifier_accounts_due", "Accounts due now and not leased.", summary.due),
                (
                    "verifier_oldest_due_age_seconds",
                    "Seconds the longest-waiting due account has been due (0: none due).",
                    summary.oldest_due_seconds,
                ),
                ("verifier_accounts_leased", "Accounts under a live lease.", summary.leased),
                (
                    "verifier_leases_expired",
                    "Accounts whose lease expired without a result (not yet claimed again).",
                    summary.lease_expired,
                ),
            ):
                yield GaugeMetricFamily(name, doc, value=value)
        state = self._broker.get()
        yield GaugeMetricFamily(
            "verifier_redis_up", "Whether the last read of Redis worked.", value=int(bool(state))
        )
        if state is None:
            return
        yield GaugeMetricFamily(
            "verifier_platform_circuit_open",
            "1 while the platform circuit breaker is open (verification paused).",
            value=0 if state.circuit is None else 1,
        )
        yield GaugeMetricFamily(
            "verifier_verification_stalled",
            "1 while every verification of the last STALL_WINDOW_SECONDS was transient with one "
            "error code (the condition `verification.stalled` logs).",
            value=0 if state.stalled_code is None else 1,
        )
        yield GaugeMetricFamily(
            "verifier_sts_rate_per_second",
            "The shared STS budget's rate now (its ceiling unless STS throttled).",
            value=state.sts_rate_per_second,
        )
        yield GaugeMetricFamily(
            "verifier_sts_rate_ceiling_per_second",
            "STS_RATE_LIMIT_PER_SECOND: the shared budget's ceiling.",
            value=self._settings.sts_rate_limit_per_second,
        )
        queues = GaugeMetricFamily(
            "celery_queue_length", "Messages waiting in each queue.", labels=["queue_name"]
        )
        for queue, length in state.queues.items():
            queues.add_metric([queue], length)
        yield queues
