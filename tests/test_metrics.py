"""worker.metric_definitions and worker.cached_value: bounded labels, the cached fleet reads and
the README's table of metrics (the multiprocess endpoint itself is proven end to end in
tests/test_e2e_metrics.py)."""

from __future__ import annotations

import re
import threading

import pytest
import redis
from prometheus_client import CollectorRegistry

from tests.processes import ROOT
from worker import cached_value as cached_value_module
from worker.cached_value import CachedValue
from worker.fleet import BrokerState, FleetSummary, read_broker_state
from worker.metric_definitions import MAX_ERROR_CODES, OTHER, BeatMetrics, WorkerMetrics
from worker.scrape import FleetCollector
from worker.settings import Settings


def test_error_codes_are_bounded() -> None:
    """Known codes are labels; unclassified, odd-looking and codes past the cap are "other"."""
    metrics = WorkerMetrics()
    assert metrics.error_code("AccessDenied", unclassified=False) == "AccessDenied"
    assert metrics.error_code("SomethingNew", unclassified=True) == OTHER
    assert metrics.error_code("evil\x1b[2J", unclassified=False) == OTHER
    assert metrics.error_code("x" * 200, unclassified=False) == OTHER
    for n in range(MAX_ERROR_CODES * 2):
        metrics.error_code(f"Code{n}", unclassified=False)
    assert metrics.error_code("YetAnother", unclassified=False) == OTHER
    # Codes already seen keep their label.
    assert metrics.error_code("AccessDenied", unclassified=False) == "AccessDenied"


class FakeClock:
    """worker.cached_value's clock, moved by the test: the cache's periods and limits are
    checked exactly, however slowly a loaded machine runs the test's threads."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(cached_value_module, "time", fake)
    return fake


def test_cached_value_is_computed_at_most_once_per_period(clock: FakeClock) -> None:
    """Scrapes within the period reuse the value; a failure is remembered, not raised."""
    calls: list[float] = []

    def compute() -> int:
        calls.append(clock.monotonic())
        if len(calls) == 2:
            raise RuntimeError("database away\nsecond line")
        return len(calls)

    cached = CachedValue(compute, max_age=0.2)
    results = []
    for _ in range(5):
        results.append(cached.get())
        clock.advance(0.039)
    assert results == [1] * 5  # 0.156 s: still within the period
    clock.advance(0.05)
    assert cached.get() is None
    assert cached.error == "RuntimeError: database away"
    assert cached.get() is None  # the failure is kept for the period too
    clock.advance(0.25)
    assert cached.get() == 3
    assert len(calls) == 3


def _blocking(release: threading.Event, started: threading.Event, **limits: float) -> CachedValue:
    """A CachedValue whose first read gives 1 and whose next read says it has started, then
    hangs until `release`."""
    values = iter([1, 2])

    def compute() -> int:
        value = next(values)
        if value == 2:
            started.set()
            release.wait(30)
        return value

    return CachedValue(compute, max_age=0.05, **limits)


def test_cached_value_serves_the_previous_value_while_one_caller_recomputes(
    clock: FakeClock,
) -> None:
    """A slow read (a large table) holds up one scrape, not every one."""
    release, started = threading.Event(), threading.Event()
    cached = _blocking(release, started, stale_after=10)
    assert cached.get() == 1
    clock.advance(0.1)
    slow = threading.Thread(target=cached.get)
    slow.start()
    try:
        assert started.wait(10), "the second read never started"
        assert cached.get() == 1  # not blocked behind the slow read
    finally:
        release.set()
        slow.join(10)
    assert cached.get() == 2


@pytest.mark.parametrize(
    ("limits", "wait"),
    [
        pytest.param({"stale_after": 60, "timeout": 2.0}, 2.01, id="timeout"),
        pytest.param({"stale_after": 2.0}, 1.91, id="stale_after"),
    ],
)
def test_cached_value_read_that_hangs_is_served_only_so_long(
    clock: FakeClock, limits: dict[str, float], wait: float
) -> None:
    """While a read hangs (a database that stopped answering), the others get the last value
    only until the read has run for `timeout` (or, without one, until the value is older than
    `stale_after`: the fleet gauges vanish and verifier_fleet_query_up says 0); then None,
    "check timed out"."""
    release, started = threading.Event(), threading.Event()
    cached = _blocking(release, started, **limits)
    assert cached.get() == 1
    clock.advance(0.1)
    slow = threading.Thread(target=cached.get)
    slow.start()
    try:
        assert started.wait(10), "the second read never started"
        clock.advance(wait - 0.02)
        assert cached.get() == 1  # just within the limit
        clock.advance(0.02)
        assert cached.get() is None
        assert (cached.error or "").startswith("check timed out")
    finally:
        release.set()
        slow.join(10)
    assert cached.get() == 2
    assert cached.error is None


def test_fleet_reads_every_queue_celery_declares(redis_url: str) -> None:
    """The queue lengths (scripts/status, celery_queue_length) cover every queue the worker
    consumes, webhooks included."""
    from worker import celeryconfig  # noqa: PLC0415 - reads the settings

    state = read_broker_state(redis.Redis.from_url(redis_url), ceiling_per_second=10)
    assert set(state.queues) == {queue.name for queue in celeryconfig.task_queues}
    assert "verifier.webhooks" in state.queues


class _Fixed:
    """A CachedValue stand-in that always has `value`."""

    def __init__(self, value: object) -> None:
        self.value = value

    def get(self) -> object:
        return self.value


def _served_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every metric the worker and beat define or serve: exposed name -> (type, labels)."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    defined = [*vars(WorkerMetrics()).values(), *vars(BeatMetrics(CollectorRegistry())).values()]
    for metric in defined:
        if not hasattr(metric, "describe"):
            continue
        (family,) = metric.describe()
        name = family.name + ("_total" if family.type == "counter" else "")
        found[name] = (family.type, frozenset(metric._labelnames))
    broker = BrokerState(circuit=None, sts_rate_per_second=1.0, queues={"q": 0}, last_dispatch=None)
    fleet = FleetCollector(_Fixed(FleetSummary()), _Fixed(broker), Settings())  # type: ignore[arg-type]
    for family in fleet.collect():
        labels = frozenset(key for sample in family.samples for key in sample.labels)
        found[family.name] = (family.type, labels)
    return found


def _readme_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """The README's table of metrics: name -> (type, label names)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| metric | type | labels | meaning |") + 2
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        name, kind, labels = (cell.strip() for cell in line.strip("|").split("|")[:3])
        # Label names are the backquoted words outside parentheses (which list their values).
        names = re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", labels))
        found[name.strip("`")] = (kind, frozenset(names))
    return found


def test_the_readme_documents_every_metric_and_no_other() -> None:
    """The README's table lists every metric the worker and beat define or serve, with its type
    and labels, and nothing they do not."""
    served, documented = _served_metrics(), _readme_metrics()
    assert len(served) > 30
    assert sorted(set(served) - set(documented)) == [], "served but not in the README"
    assert sorted(set(documented) - set(served)) == [], "in the README but not served"
    wrong = {n: {"README": v, "code": served[n]} for n, v in documented.items() if served[n] != v}
    assert wrong == {}, "type or labels differ"
