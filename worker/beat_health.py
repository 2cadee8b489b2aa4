"""Beat's liveness (it tries to send a dispatch on schedule) and readiness (the broker takes it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker import metrics
from worker.liveness import LIVENESS_SECONDS
from worker.settings import Settings


@dataclass
class BeatState:
    """When beat last tried to send a dispatch, and last succeeded (monotonic seconds)."""

    started: float
    last_tick: float | None = None
    last_sent: float | None = None


beat_state = BeatState(started=time.monotonic())


def beat_tick(*, sent: bool) -> None:
    """Beat tried to send a dispatch; `sent`: the broker took it."""
    now = time.monotonic()
    if sent:
        beat_state.last_sent = now
    else:
        beat_state.last_tick = now
    metrics.record_beat_tick(sent=sent)


def _recent(at: float | None, started: float, limit: float, *, grace: bool) -> tuple[bool, str]:
    now = time.monotonic()
    if at is None:
        return grace and now - started < limit, f"none yet ({now - started:.0f}s since start)"
    return now - at < limit, f"{now - at:.1f}s ago"


def beat_checks(settings: Settings) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Beat's liveness (it tries to dispatch on schedule) and readiness (the broker takes it)."""
    limit = max(LIVENESS_SECONDS, 5 * settings.dispatch_interval_seconds)

    def liveness() -> tuple[bool, dict[str, Any]]:
        ok, detail = _recent(beat_state.last_tick, beat_state.started, limit, grace=True)
        return ok, {"dispatch_tick": detail}

    def readiness() -> tuple[bool, dict[str, Any]]:
        ok, detail = _recent(beat_state.last_sent, beat_state.started, limit, grace=False)
        return ok, {"dispatch_sent": detail}

    return liveness, readiness
