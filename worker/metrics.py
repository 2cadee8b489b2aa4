"""Prometheus metrics of the worker and beat, recorded in each process; off unless METRICS_PORT
is set.

The worker is one main process and its prefork children, and the children do the work. Each
child writes its counters to memory-mapped files in `PROMETHEUS_MULTIPROC_DIR`
(prometheus_client's multiprocess mode) and the main process serves their sum on one endpoint:
a scrape of one child would show its share only, and the share would vanish with the child.
The main process wipes the directory at start, before any child exists, and forgets a child's
live gauges when it exits. What a scrape reads is worker.scrape's; the metrics themselves are
declared in worker.metric_definitions.

Every `record_*` function is a no-op until `enable_worker` or `enable_beat` ran in this process
(or in the parent it was forked from), so scripts and tests that import the worker's modules
pay nothing. Labels are bounded: outcome kinds, statuses, holds, STS results and error codes,
never an account. docs/observability.md has the design; README lists every metric.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.metric_definitions import OTHER, BeatMetrics, WorkerMetrics
from worker.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from worker.verify import Applied


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
    return _answer_result(status, code)


def _answer_result(status: int | None, code: object) -> str:
    if status is None:
        return "network_error"
    if code in _THROTTLING or status == 429:
        return "throttled"
    if status < 300:
        return "ok"
    if code == "AccessDenied":
        return "access_denied"
    return "server_error" if status >= 500 else "client_error"


def record_sts_sent(operation: str) -> None:
    """An STS request made without a botocore client (AssumeRole) is being sent."""
    m = _worker
    if m is not None:
        m.child(m.sts_requests, "requests", operation).inc()


def record_sts_answer(operation: str, status: int | None, code: object, seconds: float) -> None:
    """Its answer: HTTP `status` (None: no answer, a network error) and error `code`."""
    m = _worker
    if m is not None:
        result = _answer_result(status, code)
        m.child(m.sts_duration, "sts", operation, result).observe(seconds)


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
