"""worker.metrics: bounded labels and the cached fleet reads (the multiprocess endpoint itself is
proven end to end in tests/test_e2e_metrics.py)."""

from __future__ import annotations

import threading
import time

from worker.metrics import MAX_ERROR_CODES, OTHER, CachedValue, WorkerMetrics


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


def test_cached_value_is_computed_at_most_once_per_period() -> None:
    """Scrapes within the period reuse the value; a failure is remembered, not raised."""
    calls: list[float] = []

    def compute() -> int:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise RuntimeError("database away\nsecond line")
        return len(calls)

    cached = CachedValue(compute, max_age=0.2)
    assert [cached.get() for _ in range(5)] == [1] * 5
    time.sleep(0.25)
    assert cached.get() is None
    assert cached.error == "RuntimeError: database away"
    time.sleep(0.25)
    assert cached.get() == 3
    assert len(calls) == 3


def test_cached_value_serves_the_previous_value_while_one_caller_recomputes() -> None:
    """A slow read (a large table) holds up one scrape, not every one."""
    release = threading.Event()
    values = iter([1, 2])

    def compute() -> int:
        value = next(values)
        if value == 2:
            release.wait(5)
        return value

    cached = CachedValue(compute, max_age=0.05)
    assert cached.get() == 1
    time.sleep(0.1)
    slow = threading.Thread(target=cached.get)
    slow.start()
    time.sleep(0.05)
    assert cached.get() == 1  # not blocked behind the slow read
    release.set()
    slow.join(5)
    assert cached.get() == 2
