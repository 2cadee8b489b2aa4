"""worker.health: the checks' answers and the HTTP app (the real worker's endpoints are tested
end to end in tests/test_e2e_metrics.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from worker import health
from worker.settings import get_settings


def _call(app: Any, path: str) -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> Callable[..., None]:
        seen["status"], seen["headers"] = status, dict(headers)
        return lambda _data: None

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


def test_endpoints_answer_200_or_503_with_each_check_named() -> None:
    """/healthz and /readyz say ok or fail with their checks; /metrics is Prometheus text."""
    registry = CollectorRegistry()
    Counter("example", "An example.", registry=registry).inc()
    app = health.wsgi_app(
        registry,
        lambda: (True, {"loop": "last turn 0.5s ago"}),
        lambda: (False, {"database": "failed: OperationalError: refused", "redis": "ok"}),
    )
    status, _, body = _call(app, "/healthz")
    assert (status, json.loads(body)) == (
        "200 OK",
        {"status": "ok", "checks": {"loop": "last turn 0.5s ago"}},
    )
    status, headers, body = _call(app, "/readyz")
    assert status == "503 Service Unavailable"
    assert json.loads(body)["checks"]["database"].startswith("failed")
    assert headers["Cache-Control"] == "no-store"
    status, _, body = _call(app, "/metrics")
    assert status.startswith("200")
    assert b"example_total 1.0" in body
    assert _call(app, "/elsewhere")[0] == "404 Not Found"


def test_worker_liveness_follows_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alive while starting, while the loop turns and while reconnecting to the broker; not once
    the loop has not turned for LIVENESS_SECONDS."""
    state = health.LoopState(started=time.monotonic())
    monkeypatch.setattr(health, "loop_state", state)
    assert health.worker_liveness()[0]
    state.tick()
    assert health.worker_liveness()[0]
    state.last_tick = time.monotonic() - health.LIVENESS_SECONDS - 1
    assert not health.worker_liveness()[0]
    state.reconnecting()
    ok, checks = health.worker_liveness()
    assert ok
    assert checks["loop"].startswith("reconnecting")
    state.tick()
    assert state.reconnecting_since is None


def test_beat_is_alive_while_it_ticks_and_ready_once_a_dispatch_was_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beat: live within its start-up grace and while it ticks; ready only after a dispatch
    reached the broker, and no longer when the last one is old."""
    state = health.BeatState(started=time.monotonic())
    monkeypatch.setattr(health, "beat_state", state)
    liveness, readiness = health.beat_checks(get_settings())
    assert liveness()[0]
    assert not readiness()[0]
    health.beat_tick(sent=False)
    health.beat_tick(sent=True)
    assert liveness()[0]
    assert readiness()[0]
    long_ago = time.monotonic() - 3600
    state.started = state.last_tick = state.last_sent = long_ago
    assert not liveness()[0]
    assert not readiness()[0]
