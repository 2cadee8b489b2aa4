"""Prometheus metrics of the worker and beat; off unless METRICS_PORT is set.

The worker is one main process and its prefork children, and the children do the work. Each
child writes its counters to memory-mapped files in `PROMETHEUS_MULTIPROC_DIR`
(prometheus_client's multiprocess mode) and the main process serves their sum on one endpoint:
a scrape of one child would show its share only, and the share would vanish with the child.
The main process wipes the directory at start, before any child exists, and forgets a child's
live gauges when it exits.

The fleet gauges (accounts by status, the due backlog, the circuit breaker, the shared STS
rate, queue lengths) come from the database and Redis, read by the main process when scraped
(the database at most every `METRICS_DATABASE_INTERVAL_SECONDS`).

Every `record_*` function is a no-op until `enable_worker` or `enable_beat` ran in this process
(or in the parent it was forked from), so scripts and tests that import the worker's modules
pay nothing. Labels are bounded: outcome kinds, statuses, holds, STS results and error codes,
never an account. docs/observability.md has the design; README lists every metric.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

    from worker.verify import Applied

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


_worker: WorkerMetrics | None = None
_beat: BeatMetrics | None = None
_local = threading.local()


def prepare_multiprocess_directory(settings: Settings) -> Path:
    """Point prometheus_client at an empty directory, before it is imported (its mode is decided
    at import) and before any child is forked (children inherit the environment)."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory")
    if settings.prometheus_multiproc_dir:
        path = Path(settings.prometheus_multiproc_dir)
        path.mkdir(parents=True, exist_ok=True)
        # Files of a previous run would add its counts to this one's.
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="account-verifier-metrics-"))
        owner = os.getpid()
        atexit.register(_remove_directory, path, owner)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _remove_directory(path: Path, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


def enable_worker(settings: Settings) -> Path:
    """In the worker's main process, before the pool starts: multiprocess mode and the metrics
    every process records. Returns the multiprocess directory."""
    global _worker  # noqa: PLW0603 - one set per process tree
    path = prepare_multiprocess_directory(settings)
    _worker = WorkerMetrics()
    return path


def enable_beat() -> CollectorRegistry:
    """In beat's process: its metrics, in memory (one process: no multiprocess files; a
    PROMETHEUS_MULTIPROC_DIR meant for the worker is ignored). Returns the registry to serve."""
    global _beat  # noqa: PLW0603 - one set per process
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from prometheus_client import (  # noqa: PLC0415 - after the line above
        CollectorRegistry,
        disable_created_metrics,
    )

    # A `_created` series per counter is noise here (the worker's multiprocess mode has none).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    _beat = BeatMetrics(registry)
    return registry


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


def forget_process(pid: int) -> None:
    """A child exited: drop its live gauges (its counters stay: they still count)."""
    if _worker is None:
        return
    from prometheus_client import multiprocess  # noqa: PLC0415

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# --- recording (hot path: a few dictionary lookups and memory-mapped writes) -----------------


def record_applied(result: Applied) -> None:
    """One verification's written result (or its discarded one)."""
    m = _worker
    if m is None:
        return
    if not result.applied:
        m.child(m.discarded, "discarded", "account_changed").inc()
        return
    checked, decision = result.checked, result.decision
    outcome, attempt = checked.outcome, checked.attempt
    code = (
        "none"
        if outcome.verified
        else m.error_code(outcome.code, unclassified=outcome.unclassified)
    )
    m.child(m.verifications, "verifications", outcome.kind.value, code).inc()
    if decision.status != attempt.state.status:
        m.child(
            m.transitions, "transitions", attempt.state.status.value, decision.status.value
        ).inc()
    if decision.hold is not None:
        m.child(m.holds, "holds", decision.hold.value).inc()
    if attempt.due_at is not None:
        lag = (attempt.now - attempt.due_at).total_seconds() + time.perf_counter() - checked.started
        m.lag.observe(max(0.0, lag))


def record_skipped(reason: str, count: int = 1) -> None:
    """Accounts of a message not verified (`not_leased`, `platform_paused`)."""
    if _worker is not None and count:
        _worker.child(_worker.skipped, "skipped", reason).inc(count)


def record_deferred(reason: str, count: int) -> None:
    """Accounts given back, due at once (`window_full`, `requested_waiting`)."""
    if _worker is not None and count:
        _worker.child(_worker.deferred, "deferred", reason).inc(count)


def record_error(stage: str, count: int = 1) -> None:
    """Verifications left to their leases by an unexpected error (`sts`, `write`)."""
    if _worker is not None:
        _worker.child(_worker.errors, "errors", stage).inc(count)


def record_token_wait(seconds: float) -> None:
    """An STS call waited this long for the shared budget."""
    if _worker is not None and seconds > 0:
        _worker.token_wait.inc(seconds)


def record_rate_cut() -> None:
    """This process cut the shared STS rate."""
    if _worker is not None:
        _worker.rate_cuts.inc()


def record_circuit_trip(code: str) -> None:
    """This process opened the platform circuit breaker."""
    if _worker is not None:
        label = _worker.error_code(code, unclassified=False)
        _worker.child(_worker.circuit_trips, "trips", label).inc()


def record_dispatch(*, claimed: int, reclaimed: int, paused: bool) -> None:
    """One dispatcher run."""
    m = _worker
    if m is None:
        return
    result = "paused" if paused else ("claimed" if claimed else "empty")
    m.child(m.dispatch_runs, "dispatch", result).inc()
    if claimed:
        m.dispatch_claimed.inc(claimed)
    if reclaimed:
        m.reclaimed.inc(reclaimed)
    m.dispatch_last.set(time.time())


_task_started: dict[str, float] = {}


def task_started(task_id: str | None) -> None:
    """A Celery task began in this process."""
    if _worker is not None and task_id:
        _task_started[task_id] = time.perf_counter()


def task_finished(task_id: str | None, name: str, state: str | None) -> None:
    """A Celery task ended (names are the app's few tasks; state SUCCESS, FAILURE, ...)."""
    m = _worker
    if m is None:
        return
    started = _task_started.pop(task_id, None) if task_id else None
    # Other states (a retry, a rejection) are neither: the task runs again or never ran.
    if state == "SUCCESS":
        m.child(m.tasks_succeeded, "succeeded", name).inc()
    elif state == "FAILURE":
        m.child(m.tasks_failed, "failed", name).inc()
    if started is not None:
        m.child(m.task_runtime, "runtime", name).observe(time.perf_counter() - started)


def record_beat_tick(*, sent: bool) -> None:
    """Beat tried to send a dispatch (`sent`: the broker took it)."""
    m = _beat
    if m is None:
        return
    now = time.time()
    if sent:
        m.sent.inc()
        m.last_sent.set(now)
    else:
        m.last_tick.set(now)


# --- STS requests, seen through botocore's events -------------------------------------------

_THROTTLING = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)


def instrument_sts_client(client: Any) -> None:
    """Count and time every HTTP request of an STS client, botocore's retries included."""
    if _worker is None:
        return
    client.meta.events.register("before-send.sts", _before_send)
    client.meta.events.register("needs-retry.sts", _after_attempt)


def _operation(event_name: str) -> str:
    # "before-send.sts.AssumeRole": the operation is the event name's last part.
    name = event_name.rpartition(".")[2]
    return name if name in {"AssumeRole", "GetCallerIdentity"} else OTHER


def _before_send(event_name: str = "", **_: Any) -> None:
    # Returns None, always: botocore would send any other value as the answer. Counted here, as
    # sent: an answer botocore cannot parse never reaches the retry handler below.
    m = _worker
    if m is None:
        return
    _local.started = time.perf_counter()
    m.child(m.sts_requests, "requests", _operation(event_name)).inc()


def _result(response: Any, caught_exception: Any) -> str:
    if caught_exception is not None or not isinstance(response, tuple):
        return "network_error"
    http, parsed = response
    status = int(getattr(http, "status_code", 0) or 0)
    code = parsed.get("Error", {}).get("Code") if isinstance(parsed, dict) else None
    if code in _THROTTLING or status == 429:
        return "throttled"
    if status < 300:
        return "ok"
    if code == "AccessDenied":
        return "access_denied"
    return "server_error" if status >= 500 else "client_error"


def _after_attempt(
    event_name: str = "", response: Any = None, caught_exception: Any = None, **_: Any
) -> None:
    # Returns None, always: botocore takes any other value as its retry decision.
    m = _worker
    if m is None:
        return
    started = getattr(_local, "started", None)
    _local.started = None
    name = _operation(event_name)
    elapsed = 0.0 if started is None else time.perf_counter() - started
    m.child(m.sts_duration, "sts", name, _result(response, caught_exception)).observe(elapsed)


# --- the main process's gauges: the fleet, from the database and Redis -----------------------


class CachedValue:
    """A value recomputed at most every `max_age` seconds, by one caller at a time.

    The other callers get the previous value meanwhile, but never an old one: once it is older
    than `stale_after` (3 x `max_age` unless given), or the computation under way has run for
    longer than `timeout`, they get None and `error` says why. A read that hangs (a database
    that stopped answering without closing its sockets) must not leave its last "ok" standing.
    The first value is waited for, at most as long.
    """

    def __init__(
        self,
        compute: Callable[[], Any],
        max_age: float,
        *,
        stale_after: float | None = None,
        timeout: float | None = None,
    ) -> None:
        self._compute = compute
        self._max_age = max_age
        self._stale_after = 3 * max_age if stale_after is None else stale_after
        self._timeout = timeout
        self._lock = threading.Lock()
        self._value: Any = None
        self._at = -float("inf")
        self._running_since: float | None = None
        self.error: str | None = None

    def get(self) -> Any:
        if time.monotonic() - self._at < self._max_age:
            return self._value
        if self._lock.acquire(blocking=False):
            try:
                self._refresh()
            finally:
                self._lock.release()
            return self._value
        return self._while_running()

    def _refresh(self) -> None:
        if time.monotonic() - self._at < self._max_age:
            return  # another caller refreshed it between the check and the lock
        self._running_since = time.monotonic()
        try:
            self._value = self._compute()
            self.error = None
        except Exception as error:  # noqa: BLE001 - a scrape shows what it can
            self._value = None
            self.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        finally:
            self._running_since = None
        self._at = time.monotonic()

    def _while_running(self) -> Any:
        # Another caller is computing: the previous value while it is recent and the computation
        # has not run too long; the first value is waited for.
        limit = self._stale_after if self._timeout is None else self._timeout
        started = self._running_since
        if self._value is None and self.error is None:
            waited = 0.0 if started is None else time.monotonic() - started
            if self._lock.acquire(timeout=max(0.0, limit - waited)):
                self._lock.release()
                return self._value
        now = time.monotonic()
        if started is not None and self._timeout is not None and now - started > self._timeout:
            self.error = f"check timed out: running for {now - started:.0f}s"
            return None
        if now - self._at > self._stale_after:
            self.error = f"check timed out: last value {now - self._at:.0f}s old"
            return None
        return self._value


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
