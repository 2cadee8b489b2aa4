"""Fleet-wide stall: every verification for minutes transient, with one and the same error.

One transient answer is bad luck, and each is logged at info at most. All of them, across every
worker, for minutes, with the same code (`EndpointConnectionError` for a region that does not
exist or a proxy that is gone) is the platform failing while every account quietly keeps its
status. The workers count their outcomes in Redis, shared by every process: per time slice (a
fifth of the window), a hash of the total and of the transient outcomes by error code. When the
slices of the last window hold at least `STALL_MIN_VERIFICATIONS` outcomes and every one is
transient with the same code, `verification.stalled` is logged at error, by one process per
window (the first to set that window's key).

Cheap on the hot path: one pipelined round trip per chunk written (not per verification); the
slices are read in that same round trip, and only for a chunk that was itself all transient with
one code (a chunk with anything else proves the fleet is not stalled right now).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import redis

from models import OutcomeKind
from worker.logging import get_logger
from worker.sts.outcome import Outcome

log = get_logger("worker.stall")

_SLICES = 5
_TOTAL = "total"
_TRANSIENT = "transient:"


class StallWatch:
    """One process's handle on the shared outcome counters."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        window_seconds: int,
        min_verifications: int,
        prefix: str = "verifier:stall",
    ) -> None:
        self._redis = client
        self.window_seconds = window_seconds
        self.min_verifications = min_verifications
        self._prefix = prefix
        self._slice_seconds = max(1, window_seconds // _SLICES)
        self._slices = max(1, window_seconds // self._slice_seconds)

    def _slice_key(self, index: int) -> str:
        return f"{self._prefix}:outcomes:{index}"

    def record(self, outcomes: Sequence[Outcome], *, now: float | None = None) -> None:
        """Count a chunk's outcomes (at `now`, Unix time); log `verification.stalled` when every
        verification of the window was transient with one code. Never raises for Redis: the
        chunk's results matter more than the count (`ratelimit.unavailable` reports Redis)."""
        if not outcomes:
            return
        try:
            self._record(outcomes, time.time() if now is None else now)
        except redis.RedisError:
            return

    def stalled_code(self, *, now: float | None = None) -> str | None:
        """The error code every verification of the last window had, when there were at least
        `min_verifications` and all were transient with that one code; None otherwise (readiness
        asks this, in one round trip)."""
        current = int((time.time() if now is None else now) // self._slice_seconds)
        pipe = self._redis.pipeline(transaction=False)
        for index in range(current - self._slices + 1, current + 1):
            pipe.hgetall(self._slice_key(index))
        slices: list[dict[bytes, bytes]] = pipe.execute()
        codes: Counter[str] = Counter()
        for counts in slices:
            for name, value in counts.items():
                if name.startswith(_TRANSIENT.encode()):
                    codes[name.decode()[len(_TRANSIENT) :]] += int(value)
        total = sum(int(counts.get(_TOTAL.encode(), 0)) for counts in slices)
        if total < self.min_verifications or len(codes) != 1:
            return None
        ((code, same),) = codes.items()
        return code if same == total else None

    def _record(self, outcomes: Sequence[Outcome], now: float) -> None:
        current = int(now // self._slice_seconds)
        key = self._slice_key(current)
        transient = Counter(o.code for o in outcomes if o.kind is OutcomeKind.TRANSIENT)
        uniform = len(transient) == 1 and sum(transient.values()) == len(outcomes)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(key, _TOTAL, len(outcomes))
        for code, count in transient.items():
            pipe.hincrby(key, f"{_TRANSIENT}{code}", count)
        # Kept one slice longer than the window, so the window's oldest slice is still there.
        pipe.expire(key, (self._slices + 1) * self._slice_seconds)
        if uniform:
            for index in range(current - self._slices + 1, current + 1):
                pipe.hgetall(self._slice_key(index))
        replies = pipe.execute()
        if not uniform:
            return
        (code,) = transient
        slices: list[dict[bytes, bytes]] = replies[-self._slices :]
        total = sum(int(counts.get(_TOTAL.encode(), 0)) for counts in slices)
        same = sum(int(counts.get(f"{_TRANSIENT}{code}".encode(), 0)) for counts in slices)
        if total < self.min_verifications or same != total:
            return
        # One line per window for the whole fleet: whoever sets this window's key logs it.
        interval = int(now // self.window_seconds)
        if self._redis.set(
            f"{self._prefix}:logged:{interval}", code, nx=True, ex=2 * self.window_seconds
        ):
            log.error(
                "verification.stalled",
                error_code=code,
                verifications=total,
                window_seconds=self.window_seconds,
                action=(
                    "every verification of the window was transient with this error: the "
                    "platform cannot reach STS (check AWS_REGION, AWS_ENDPOINT_URL_STS, proxies, "
                    "network); no account status changes while it lasts"
                ),
            )
