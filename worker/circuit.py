"""A circuit breaker for the platform's own AWS credentials, shared by all workers via Redis.

When STS says our credentials are missing, invalid or expired, every customer's attempt would
fail the same way: the breaker opens, no customer status changes, and verification pauses. The
dispatcher probes with GetCallerIdentity every `PLATFORM_PAUSE_SECONDS`; the first success
closes the breaker and verification resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

KEY = "verifier:platform-circuit"


@dataclass(frozen=True, slots=True)
class CircuitState:
    """Why the breaker is open and when to probe next (epoch seconds)."""

    code: str
    message: str
    opened_at: float
    probe_at: float


class PlatformCircuit:
    """Open/closed state in one Redis key; a short local cache keeps it off the hot path."""

    def __init__(self, client: redis.Redis, *, pause_seconds: float, cache_seconds: float = 1.0):
        self._redis = client
        self._pause = pause_seconds
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, bool] | None = None

    def state(self) -> CircuitState | None:
        """The open state, or None when closed."""
        raw: Any = self._redis.get(KEY)
        if raw is None:
            return None
        data = json.loads(raw)
        return CircuitState(
            code=str(data["code"]),
            message=str(data["message"]),
            opened_at=float(data["opened_at"]),
            probe_at=float(data["probe_at"]),
        )

    def is_open(self) -> bool:
        """Whether verification is paused (cached for up to `cache_seconds`)."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self._cache_seconds:
            return self._cached[1]
        is_open = bool(self._redis.exists(KEY))
        self._cached = (now, is_open)
        return is_open

    def trip(self, code: str, message: str) -> bool:
        """Open the breaker; True if this call opened it (False if it was open already)."""
        now = time.time()
        payload = json.dumps(
            {"code": code, "message": message, "opened_at": now, "probe_at": now + self._pause}
        )
        opened = bool(self._redis.set(KEY, payload, nx=True))
        self._cached = (time.monotonic(), True)
        return opened

    def probe_due(self) -> bool:
        """Whether the breaker is open and its pause is over."""
        state = self.state()
        return state is not None and state.probe_at <= time.time()

    def postpone(self, code: str, message: str) -> None:
        """A probe failed: stay open for another pause."""
        state = self.state()
        now = time.time()
        opened_at = state.opened_at if state else now
        payload = {"code": code, "message": message, "opened_at": opened_at}
        self._redis.set(KEY, json.dumps({**payload, "probe_at": now + self._pause}))

    def close(self) -> bool:
        """Close the breaker; True if it was open."""
        self._cached = (time.monotonic(), False)
        return bool(self._redis.delete(KEY))
