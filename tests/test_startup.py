"""Start-up checks against real services: a reachable PostgreSQL and Redis pass, an unreachable
one is named after the wait, one that is still starting is waited for, a refusal fails at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from tests.processes import RedisServer, free_port, redis_server_binary
from worker import startup
from worker.settings import Settings, load_settings


def _settings(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_reachable_services_pass_without_a_word(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test session's database and Redis answer at the first try: nothing is logged."""
    settings = load_settings()
    with capture_logs() as logs:
        startup.wait_for_services([startup.database(settings), startup.broker(settings)], timeout=5)
    assert logs == []


def test_an_unreachable_database_is_named_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the port: retried for the timeout, then an error naming
    DATABASE_URL with its password masked."""
    url = f"postgresql://verifier:hunter2@127.0.0.1:{free_port()}/verifier"
    settings = _settings(monkeypatch, DATABASE_URL=url)
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(startup.ServiceUnreachableError) as caught:
        startup.wait_for_services([startup.database(settings)], timeout=1.5)
    assert time.monotonic() - started >= 1.5
    message = str(caught.value)
    assert "DATABASE_URL=postgresql+psycopg://verifier:***@127.0.0.1:" in message
    assert "hunter2" not in message
    waiting = [line for line in logs if line["event"] == "startup.waiting"]
    assert waiting, logs
    assert {line["variable"] for line in waiting} == {"DATABASE_URL"}
    assert all("hunter2" not in str(line) for line in logs)


def test_a_redis_that_refuses_the_password_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A Redis that answers "wrong password" will not change its mind: no waiting."""
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("verifier-startup", enabled=True, passwords=["+right"], commands=["+@all"])
    wrong = redis_url.replace("redis://", "redis://verifier-startup:hunter2@", 1)
    settings = _settings(monkeypatch, REDIS_URL=wrong)
    started = time.monotonic()
    try:
        with capture_logs() as logs, pytest.raises(startup.ServiceUnreachableError) as caught:
            startup.wait_for_services([startup.broker(settings)], timeout=30)
    finally:
        admin.acl_deluser("verifier-startup")
        admin.close()
    assert time.monotonic() - started < 10
    assert "REDIS_URL=redis://verifier-startup:***@" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert [line for line in logs if line["event"] == "startup.waiting"] == []


def test_a_redis_that_is_still_starting_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Redis comes up a second after the check began: the check waits for it and passes."""
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary")
    server = RedisServer(tmp_path / "redis")
    settings = _settings(monkeypatch, REDIS_URL=server.url)
    starter = threading.Timer(1.0, server.start)
    starter.start()
    try:
        with capture_logs() as logs:
            startup.wait_for_services([startup.broker(settings)], timeout=30)
    finally:
        starter.join()
        server.stop()
    waiting = [line for line in logs if line["event"] == "startup.waiting"]
    assert waiting, "the check passed before Redis started"
    assert {line["variable"] for line in waiting} == {"REDIS_URL"}


def test_require_services_exits_with_status_3(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that cannot reach Redis logs `startup.unreachable` at critical and exits 3."""
    settings = _settings(
        monkeypatch,
        REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        STARTUP_TIMEOUT_SECONDS="0",
    )
    with capture_logs() as logs, pytest.raises(SystemExit) as caught:
        startup.require_services(settings, process="beat", database_needed=False)
    assert caught.value.code == startup.EXIT_UNREACHABLE
    (line,) = [line for line in logs if line["event"] == "startup.unreachable"]
    assert line["log_level"] == "critical"
    assert line["variable"] == "REDIS_URL"
    assert "hunter2" not in line["url"]
    assert "***" in line["url"]
