"""The worker's and beat's Prometheus metrics: names, help, labels and buckets, and the bound on
error-code labels. worker.metrics creates them (`enable_worker`, `enable_beat`) and records."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# An error code becomes a label only if it is one the verifier knows (unknown AWS codes are
# flagged `unclassified`), looks like a code, and is among the first MAX_ERROR_CODES seen by the
# process; anything else is "other", so no answer from AWS can grow the series without bound.
MAX_ERROR_CODES = 64
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,63}")
OTHER = "other"

# Seconds: from the stand-in's zero latency to STS's timeouts (connect 3 s + read 5 s).
STS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds from due to verified: a healthy fleet is verified within a minute or two of due.
LAG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 21600)
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)


class WorkerMetrics:
    """The metrics a worker's processes record, written to the multiprocess directory."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415 - see enable_worker

        # registry=None: in multiprocess mode the values live in files, and the main process's
        # MultiProcessCollector reads them; registering them too would export them twice.
        self.verifications: Counter = Counter(
            "verifier_verifications",
            "Verifications written, by outcome kind and error code (none when verified).",
            ["outcome", "error_code"],
            registry=None,
        )
        self.discarded: Counter = Counter(
            "verifier_verifications_discarded",
            "Verification results discarded because the account changed during the attempt.",
            ["reason"],
            registry=None,
        )
        self.skipped: Counter = Counter(
            "verifier_verifications_skipped",
            "Accounts of a message not verified: not_leased (the lease was lost) or "
            "platform_paused (the circuit breaker was open at its turn).",
            ["reason"],
            registry=None,
        )
        self.deferred: Counter = Counter(
            "verifier_verifications_deferred",
            "Accounts given back, due at once, by reason: window_full (no room in the process), "
            "requested_waiting (yielding to a requested verification).",
            ["reason"],
            registry=None,
        )
        self.errors: Counter = Counter(
            "verifier_verification_errors",
            "Verifications that failed unexpectedly (left to their leases), by stage.",
            ["stage"],
            registry=None,
        )
        self.transitions: Counter = Counter(
            "verifier_status_transitions",
            "Account status changes written, by from and to status.",
            ["from_status", "to_status"],
            registry=None,
        )
        self.holds: Counter = Counter(
            "verifier_holds",
            "Verifications whose status change was held: grace (pending inside the IAM "
            "propagation window), confirming (a connected account's re-attempt), wave (the wave "
            "guard).",
            ["hold"],
            registry=None,
        )
        self.lag: Histogram = Histogram(
            "verifier_verification_lag_seconds",
            "Seconds from an account's due time to its verification being written.",
            buckets=LAG_BUCKETS,
            registry=None,
        )
        self.sts_requests: Counter = Counter(
            "verifier_sts_requests",
            "HTTP requests sent to STS (botocore's retries included), by operation.",
            ["operation"],
            registry=None,
        )
        # One histogram for the answers' count by result and their duration: its _count is the
        # answers by result, without a separate counter to write on every request.
        self.sts_duration: Histogram = Histogram(
            "verifier_sts_request_duration_seconds",
            "Seconds from sending an STS request to its answer, by operation and result: ok, "
            "access_denied, throttled, client_error, server_error, network_error (no answer).",
            ["operation", "result"],
            buckets=STS_BUCKETS,
            registry=None,
        )
        self.token_wait: Counter = Counter(
            "verifier_sts_token_wait_seconds",
            "Seconds STS calls waited for a slot of the shared STS budget.",
            registry=None,
        )
        self.rate_cuts: Counter = Counter(
            "verifier_sts_rate_cuts",
            "Times this worker cut the shared STS rate because STS throttled.",
            registry=None,
        )
        self.circuit_trips: Counter = Counter(
            "verifier_platform_circuit_trips",
            "Times this worker opened the platform circuit breaker, by error code.",
            ["error_code"],
            registry=None,
        )
        self.dispatch_runs: Counter = Counter(
            "verifier_dispatch_runs",
            "Dispatcher runs, by result: claimed, empty, paused (circuit open).",
            ["result"],
            registry=None,
        )
        self.dispatch_claimed: Counter = Counter(
            "verifier_dispatch_claimed",
            "Accounts the dispatcher claimed and sent for verification.",
            registry=None,
        )
        self.reclaimed: Counter = Counter(
            "verifier_leases_reclaimed",
            "Accounts claimed again after their lease expired without a result (a worker died "
            "or lost them; the lease brought them back).",
            registry=None,
        )
        self.dispatch_last: Gauge = Gauge(
            "verifier_dispatch_last_run_timestamp_seconds",
            "When the dispatcher last ran (Unix time).",
            registry=None,
            multiprocess_mode="max",
        )
        # celery-exporter's names (dashboards and alerts written for it work here), recorded by
        # the worker itself: no task events, no exporter process.
        self.tasks_succeeded: Counter = Counter(
            "celery_task_succeeded",
            "Celery tasks that succeeded in this worker, by task name.",
            ["name"],
            registry=None,
        )
        self.tasks_failed: Counter = Counter(
            "celery_task_failed",
            "Celery tasks that failed (raised) in this worker, by task name.",
            ["name"],
            registry=None,
        )
        self.task_runtime: Histogram = Histogram(
            "celery_task_runtime",
            "Seconds a Celery task ran, by task name (celery-exporter's name: no unit suffix).",
            ["name"],
            buckets=TASK_BUCKETS,
            registry=None,
        )
        self._codes: set[str] = set()
        self._code_lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}

    def error_code(self, code: str, *, unclassified: bool) -> str:
        """`code` as a label value, or "other" (see MAX_ERROR_CODES)."""
        if unclassified or not _CODE.fullmatch(code):
            return OTHER
        if code in self._codes:
            return code
        with self._code_lock:
            if len(self._codes) >= MAX_ERROR_CODES:
                return OTHER
            self._codes.add(code)
        return code

    def child(self, metric: Counter | Histogram, name: str, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the lookup is most of a labelled inc's cost."""
        key = (name, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class BeatMetrics:
    """Beat's own metrics: one process, kept in memory."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge  # noqa: PLC0415 - see enable_beat

        self.sent: Counter = Counter(
            "verifier_beat_dispatches_sent",
            "Dispatch messages beat sent.",
            registry=registry,
        )
        self.last_tick: Gauge = Gauge(
            "verifier_beat_last_tick_timestamp_seconds",
            "When beat last tried to send a dispatch (Unix time).",
            registry=registry,
        )
        self.last_sent: Gauge = Gauge(
            "verifier_beat_last_sent_timestamp_seconds",
            "When beat last sent a dispatch to the broker (Unix time).",
            registry=registry,
        )
