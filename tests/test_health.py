"""worker.health and its checks (worker.liveness, worker.readiness, worker.beat_health): the
checks' answers and the HTTP app (the real worker's endpoints are tested end to end in
tests/test_e2e_metrics.py)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from tests.factories import make_account, make_organization
from worker import health
from worker.beat_health import BeatState, beat_checks, beat_tick
from worker.db import build_engine
from worker.liveness import LIVENESS_SECONDS, LoopState, worker_liveness
from worker.readiness import OLDEST_DUE, READINESS_CACHE_SECONDS, WorkerReadiness
from worker.settings import Settings, get_settings


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
    state = LoopState(started=time.monotonic())
    monkeypatch.setattr("worker.liveness.loop_state", state)
    assert worker_liveness()[0]
    state.tick()
    assert worker_liveness()[0]
    state.last_tick = time.monotonic() - LIVENESS_SECONDS - 1
    assert not worker_liveness()[0]
    state.reconnecting()
    ok, checks = worker_liveness()
    assert ok
    assert checks["loop"].startswith("reconnecting")
    state.tick()
    assert state.reconnecting_since is None


def test_worker_stuck_starting_is_not_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting (no turn of the loop yet) is alive only for the start-up limit: a worker that
    never gets its loop going is restarted."""
    state = LoopState(started=time.monotonic() - 100)
    monkeypatch.setattr("worker.liveness.loop_state", state)
    assert worker_liveness(starting_limit=120)[0]
    ok, checks = worker_liveness(starting_limit=90)
    assert not ok
    assert checks["loop"].startswith("starting for")


@pytest.fixture
def make_readiness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Settings], WorkerReadiness]]:
    """WorkerReadiness on its own engine (disposed afterwards), the multiprocess directory an
    empty one (this worker verified nothing)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    engines: list[Engine] = []

    def make(settings: Settings) -> WorkerReadiness:
        engines.append(build_engine(settings))
        return WorkerReadiness(settings, engines[-1], redis.Redis.from_url(settings.redis_url))

    yield make
    for built in engines:
        built.dispose()


def test_readiness_fails_within_its_statement_timeout_while_the_database_hangs(
    engine: Engine, make_readiness: Callable[[Settings], WorkerReadiness]
) -> None:
    """A database that does not answer (here: the accounts table locked by another session)
    fails the database check after the check's 2 s statement timeout, not the engine's lock
    timeout of 10 s, and readiness says so."""
    readiness = make_readiness(get_settings())
    assert readiness()[1]["database"] == "ok"
    with engine.connect() as locker, locker.begin():
        locker.execute(text("LOCK TABLE aws_accounts IN ACCESS EXCLUSIVE MODE"))
        time.sleep(READINESS_CACHE_SECONDS + 0.1)
        ok, checks = readiness()
    assert not ok
    assert "statement timeout" in checks["database"], checks


def test_readiness_stall_rule_reads_the_oldest_unleased_due_account(
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    make_readiness: Callable[[Settings], WorkerReadiness],
) -> None:
    """Stalled: an account nobody holds has been due longer than STALL_IDLE_SECONDS while this
    worker verified nothing for as long; an older account under a live lease does not count."""
    now = datetime.now(UTC)
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        make_account(session, organization=organization, next_due_at=now - timedelta(hours=2))
        make_account(
            session,
            organization=organization,
            next_due_at=now - timedelta(hours=3),
            lease_id=uuid.uuid4(),
            lease_expires_at=now + timedelta(minutes=10),
        )
    settings = Settings(database_url=scratch_database, stall_idle_seconds=5)
    readiness = make_readiness(settings)
    assert readiness()[1]["verification"] == "ok"
    time.sleep(settings.stall_idle_seconds + 0.5)
    ok, checks = readiness()
    assert not ok
    found = re.fullmatch(
        r"stalled: accounts overdue (\d+)s, nothing verified here for \d+s", checks["verification"]
    )
    assert found, checks
    assert 7200 <= int(found.group(1)) < 7200 + 120


def test_readiness_query_is_an_index_scan_that_stops_early(
    scratch_database: str, scratch_sessions: sessionmaker[Session]
) -> None:
    """Every worker runs the readiness query every second: it reads the `next_due_at` index from
    its oldest end and stops at the first unleased row, never the fleet."""
    with scratch_sessions.begin() as session:
        session.connection().exec_driver_sql(
            """
INSERT INTO organizations (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'o');
INSERT INTO aws_accounts (id, organization_id, alias, aws_account_id, role_arn, external_id,
                          status, next_due_at)
SELECT gen_random_uuid(), '00000000-0000-0000-0000-000000000001', 'a', lpad(g::text, 12, '0'),
       'arn:aws:iam::' || lpad(g::text, 12, '0') || ':role/r', 'ext-' || g, 'connected',
       now() + (g - 100) * interval '1 minute'
  FROM generate_series(1, 20000) AS g;
ANALYZE aws_accounts;
"""
        )
    with scratch_sessions() as session:
        plan = "\n".join(
            row[0]
            for row in session.execute(text("EXPLAIN (ANALYZE, COSTS OFF) " + str(OLDEST_DUE)))
        )
    assert "Index Scan using ix_aws_accounts_next_due_at" in plan, plan
    assert "Seq Scan" not in plan, plan
    rows = [
        int(n)
        for n in re.findall(r"Index Scan using ix_aws_accounts_next_due_at.*rows=(\d+)", plan)
    ]
    assert rows == [1], plan


def test_beat_is_alive_while_it_ticks_and_ready_once_a_dispatch_was_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beat: live within its start-up grace and while it ticks; ready only after a dispatch
    reached the broker, and no longer when the last one is old."""
    state = BeatState(started=time.monotonic())
    monkeypatch.setattr("worker.beat_health.beat_state", state)
    liveness, readiness = beat_checks(get_settings())
    assert liveness()[0]
    assert not readiness()[0]
    beat_tick(sent=False)
    beat_tick(sent=True)
    assert liveness()[0]
    assert readiness()[0]
    long_ago = time.monotonic() - 3600
    state.started = state.last_tick = state.last_sent = long_ago
    assert not liveness()[0]
    assert not readiness()[0]
