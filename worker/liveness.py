"""The worker's liveness (`/healthz`): the process is alive and its main loop turns.

The worker's event loop touches a timestamp every few seconds (a consumer bootstep's timer,
fired by the loop itself); while the consumer is reconnecting to the broker the loop is not
running, and that counts as alive (readiness says why it cannot work). No database or Redis
call, no app import: a probe costs a thread's few microseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from celery import bootsteps

# The worker's loop touches its timestamp this often; liveness fails after LIVENESS_SECONDS
# without a touch (several missed ticks, so a busy loop is not mistaken for a dead one).
TICK_SECONDS = 2.0
LIVENESS_SECONDS = 30.0
# Starting (no turn of the loop yet) is alive for STARTUP_TIMEOUT_SECONDS (the wait for the
# database and Redis) and this much more for the broker's connection and the pool's fork.
STARTING_MARGIN_SECONDS = 60.0


@dataclass
class LoopState:
    """What the main loop last did (monotonic seconds)."""

    started: float
    last_tick: float | None = None
    reconnecting_since: float | None = None

    def tick(self) -> None:
        self.last_tick = time.monotonic()
        self.reconnecting_since = None

    def reconnecting(self) -> None:
        if self.reconnecting_since is None:
            self.reconnecting_since = time.monotonic()


loop_state = LoopState(started=time.monotonic())


class LoopHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer bootstep: while connected, the event loop itself touches `loop_state`."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._entry: Any = None

    def start(self, parent: Any) -> None:
        loop_state.tick()
        self._entry = parent.timer.call_repeatedly(TICK_SECONDS, loop_state.tick)

    def stop(self, parent: Any) -> None:
        # The connection is gone (or the worker stops): the consumer reconnects before the loop
        # runs again.
        loop_state.reconnecting()
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

    shutdown = stop


def worker_liveness(
    starting_limit: float = 30.0 + STARTING_MARGIN_SECONDS,
) -> tuple[bool, dict[str, Any]]:
    """Whether the worker's main loop turned lately, is reconnecting to the broker, or has been
    starting for less than `starting_limit` seconds."""
    now = time.monotonic()
    state = loop_state
    if state.reconnecting_since is not None:
        return True, {
            "loop": f"reconnecting to the broker for {now - state.reconnecting_since:.0f}s"
        }
    if state.last_tick is None:
        # Starting: connecting for the first time, or forking the pool. Bounded: a worker stuck
        # there is restarted.
        starting = now - state.started
        return starting < starting_limit, {"loop": f"starting for {starting:.0f}s"}
    age = now - state.last_tick
    return age < LIVENESS_SECONDS, {"loop": f"last turn {age:.1f}s ago"}
