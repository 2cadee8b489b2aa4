"""A value recomputed at most every so often, never handed out old: the scrape's fleet reads and
the readiness checks (worker.scrape, worker.readiness, worker.health)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


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
