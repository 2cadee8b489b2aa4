"""The fleet-wide stall detector, on the test session's real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from models import OutcomeKind
from worker.stall import StallWatch
from worker.sts.outcome import Outcome

WINDOW = 300
T0 = 1_800_000_000.0  # a Unix time at the start of a window (divisible by 300)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the session's Redis."""
    built = redis.Redis.from_url(redis_url)
    yield built
    built.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own, its keys deleted afterwards."""
    name = f"test-stall:{uuid.uuid4().hex}"
    yield name
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)


def _watch(client: redis.Redis, prefix: str, minimum: int = 20) -> StallWatch:
    return StallWatch(client, window_seconds=WINDOW, min_verifications=minimum, prefix=prefix)


def _transient(count: int, code: str = "EndpointConnectionError") -> list[Outcome]:
    return [Outcome(OutcomeKind.TRANSIENT, code, "could not connect") for _ in range(count)]


def _verified(count: int) -> list[Outcome]:
    return [Outcome(OutcomeKind.VERIFIED, "verified", "") for _ in range(count)]


def _stalled(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == "verification.stalled"]


def test_a_stall_seen_by_two_processes_is_logged_once(client: redis.Redis, prefix: str) -> None:
    """Two workers' chunks, all EndpointConnectionError, 25 in the window: one error line with
    the code and the count, however many chunks follow in the same window."""
    first, second = _watch(client, prefix), _watch(client, prefix)
    with capture_logs() as logs:
        first.record(_transient(15), now=T0 + 10)
        second.record(_transient(10), now=T0 + 70)
        first.record(_transient(5), now=T0 + 130)
        second.record(_transient(5), now=T0 + 200)
    (line,) = _stalled(logs)
    assert line["log_level"] == "error"
    assert line["error_code"] == "EndpointConnectionError"
    assert line["verifications"] == 25
    assert line["window_seconds"] == WINDOW


def test_a_stall_that_lasts_is_logged_again_in_the_next_window(
    client: redis.Redis, prefix: str
) -> None:
    """Once per window, not once for ever: the next window logs it again."""
    watch = _watch(client, prefix)
    with capture_logs() as logs:
        watch.record(_transient(25), now=T0 + 10)
        watch.record(_transient(25), now=T0 + WINDOW + 10)
    # The second window no longer holds the first one's outcomes.
    assert [line["verifications"] for line in _stalled(logs)] == [25, 25]


def test_too_few_verifications_are_not_a_stall(client: redis.Redis, prefix: str) -> None:
    """19 failures at a minimum of 20 may be a few accounts' bad luck."""
    watch = _watch(client, prefix)
    with capture_logs() as logs:
        watch.record(_transient(10), now=T0 + 10)
        watch.record(_transient(9), now=T0 + 20)
    assert _stalled(logs) == []


def test_one_success_in_the_window_is_not_a_stall(client: redis.Redis, prefix: str) -> None:
    """Another worker's success a minute earlier proves STS answers: no line."""
    first, second = _watch(client, prefix), _watch(client, prefix)
    with capture_logs() as logs:
        first.record(_verified(1), now=T0 + 10)
        second.record(_transient(40), now=T0 + 70)
    assert _stalled(logs) == []


def test_two_different_errors_are_not_a_stall(client: redis.Redis, prefix: str) -> None:
    """Throttling here and a timeout there are STS having a bad day, not one broken setting."""
    watch = _watch(client, prefix)
    with capture_logs() as logs:
        watch.record(_transient(15, "Throttling"), now=T0 + 10)
        watch.record(_transient(15, "ReadTimeoutError"), now=T0 + 70)
    assert _stalled(logs) == []


def test_a_failure_customers_must_fix_is_not_a_stall(client: redis.Redis, prefix: str) -> None:
    """Outcomes that are not transient break the run: STS answered."""
    watch = _watch(client, prefix)
    denied = [Outcome(OutcomeKind.CUSTOMER_MUST_FIX, "AccessDenied", "denied")]
    with capture_logs() as logs:
        watch.record(_transient(30) + denied, now=T0 + 10)
        watch.record(_transient(30), now=T0 + 20)
    assert _stalled(logs) == []


def test_successes_older_than_the_window_no_longer_count(client: redis.Redis, prefix: str) -> None:
    """The window slides: successes of ten minutes ago do not hide a stall now."""
    watch = _watch(client, prefix)
    with capture_logs() as logs:
        watch.record(_verified(100), now=T0 + 10)
        watch.record(_transient(20), now=T0 + 2 * WINDOW + 10)
    assert [line["verifications"] for line in _stalled(logs)] == [20]


def test_a_chunk_costs_one_round_trip_and_keys_expire(client: redis.Redis, prefix: str) -> None:
    """The counters are one hash per slice, with a time to live just over the window."""
    watch = _watch(client, prefix)
    watch.record(_verified(3) + _transient(2, "Throttling"), now=T0 + 10)
    keys = [key.decode() for key in client.scan_iter(f"{prefix}:*")]
    assert len(keys) == 1
    assert client.hgetall(keys[0]) == {b"total": b"5", b"transient:Throttling": b"2"}
    assert WINDOW < client.ttl(keys[0]) <= WINDOW + WINDOW // 5


def test_redis_being_away_does_not_raise(prefix: str) -> None:
    """Counting is best effort: a chunk's write must not fail because Redis is down."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    _watch(dead, prefix).record(_transient(30), now=T0 + 10)


def test_readiness_reads_the_same_condition(client: redis.Redis, prefix: str) -> None:
    """`stalled_code` (readiness) answers the code while the window is all one transient error,
    and None once too few, a success, or a second code is in it."""
    watch = _watch(client, prefix)
    watch.record(_transient(19), now=T0 + 10)
    assert watch.stalled_code(now=T0 + 20) is None
    watch.record(_transient(1), now=T0 + 30)
    assert watch.stalled_code(now=T0 + 40) == "EndpointConnectionError"
    watch.record(_transient(1, code="ServiceUnavailable"), now=T0 + 50)
    assert watch.stalled_code(now=T0 + 60) is None
    other = _watch(client, f"{prefix}:other")
    other.record(_transient(30), now=T0 + 10)
    other.record(_verified(1), now=T0 + 20)
    assert other.stalled_code(now=T0 + 30) is None
    # The window moves on: the old outcomes no longer count.
    assert watch.stalled_code(now=T0 + 2 * WINDOW) is None
