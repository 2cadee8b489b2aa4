"""The worker's readiness (`/readyz`): the database and Redis answer, the platform circuit breaker
is closed, and verification is not stalled.

Checked at most once a second whoever asks; a check running longer than CHECK_TIMEOUT_SECONDS
counts as failed. For a load balancer, an orchestrator's readiness and alerting: it fails
fleet-wide when a shared service is away, so never restart containers on it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import Engine, text

from worker.cached_value import CachedValue
from worker.circuit import KEY as CIRCUIT_KEY
from worker.scrape import read_process_files
from worker.settings import Settings
from worker.stall import StallWatch

READINESS_CACHE_SECONDS = 1.0
# A readiness check running longer than this counts as failed (checks that waited on a hung
# database would otherwise leave the last "ok" standing); its statement is cut off sooner.
CHECK_TIMEOUT_SECONDS = 3.0
STATEMENT_TIMEOUT = "2s"


class Progress:
    """This worker's finished verifications as its processes counted them, and since when the
    count has not moved (read from the multiprocess files)."""

    def __init__(self) -> None:
        self._count = -1.0
        self._since = time.monotonic()

    def idle_seconds(self) -> float:
        count = 0.0
        for family in read_process_files():
            if family.name in {"verifier_verifications", "verifier_verifications_discarded"}:
                count += sum(s.value for s in family.samples if s.name.endswith("_total"))
        now = time.monotonic()
        if count != self._count:
            self._count, self._since = count, now
        return now - self._since


# The longest-waiting due account that nobody holds: an index scan of `next_due_at` that stops
# at the first unleased row (the fleet's full counts are the metrics' job, on scrapes only).
OLDEST_DUE = text(
    """
SELECT extract(epoch FROM now() - min(next_due_at)) AS seconds
  FROM aws_accounts
 WHERE next_due_at <= now()
   AND (lease_expires_at IS NULL OR lease_expires_at <= now())
"""
)


class WorkerReadiness:
    """The worker's readiness checks, on a small engine and Redis client of the main process."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: redis.Redis,
        stalled: Callable[[], str | None] | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._redis = client
        self._oldest_due_seconds = 0.0
        self._progress = Progress()
        # Another detector may replace the default (both rules below).
        self._stalled = stalled or self._stalled_by_default
        self._stall_watch = StallWatch(
            client,
            window_seconds=settings.stall_window_seconds,
            min_verifications=settings.stall_min_verifications,
        )
        self._cache = CachedValue(
            self._check, READINESS_CACHE_SECONDS, timeout=CHECK_TIMEOUT_SECONDS
        )

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        ok, checks = self._cache.get() or (False, {"checks": self._cache.error})
        return ok, checks

    def _check(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        try:
            with self._engine.connect() as connection, connection.begin():
                connection.execute(text(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"))
                seconds = connection.execute(OLDEST_DUE).scalar_one()
            self._oldest_due_seconds = max(0.0, float(seconds or 0))
            checks["database"] = "ok"
        except Exception as error:  # noqa: BLE001 - the answer says what failed
            checks["database"] = _failure(error)
        try:
            circuit = self._redis.get(CIRCUIT_KEY)
            checks["redis"] = "ok"
            checks["platform"] = "ok" if circuit is None else "circuit open: " + _circuit(circuit)
        except redis.RedisError as error:
            checks["redis"] = _failure(error)
            checks["platform"] = "unknown (Redis)"
        stalled = None
        if checks["database"] == "ok" and checks["redis"] == "ok":
            try:
                stalled = self._stalled()
            except redis.RedisError as error:
                stalled = "unknown: " + _failure(error)
        checks["verification"] = stalled or "ok"
        return all(value == "ok" for value in checks.values()), checks

    def _stalled_by_default(self) -> str | None:
        """Stalled: the fleet-wide `verification.stalled` condition holds (worker.stall: every
        verification of the window transient with one code), or accounts have been overdue for
        STALL_IDLE_SECONDS while this worker finished nothing for as long (the circuit breaker
        has its own check)."""
        code = self._stall_watch.stalled_code()
        if code is not None:
            window = self._settings.stall_window_seconds
            return f"stalled: every verification of the last {window}s transient with {code}"
        limit = self._settings.stall_idle_seconds
        overdue = self._oldest_due_seconds
        idle = self._progress.idle_seconds()
        if overdue > limit and idle > limit:
            return (
                f"stalled: accounts overdue {overdue:.0f}s, nothing verified here for {idle:.0f}s"
            )
        return None


def _failure(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"failed: {type(error).__name__}: {first[:200]}"


def _circuit(raw: Any) -> str:
    try:
        return str(json.loads(raw).get("code", "?"))
    except (ValueError, AttributeError):
        return "?"
