"""Start-up of the real processes with bad or unreachable services: `celery worker`, `celery beat`
and `reverify` stop with a line naming the variable (password masked) instead of running
broken."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.processes import (
    ROOT,
    Service,
    free_port,
    running,
    service_env,
    start_beat,
    start_worker,
)

pytestmark = pytest.mark.e2e

PASSWORD = "hunter2-Xy7"
# Nothing listens there: the worker never calls STS in these tests.
NO_STS = "http://127.0.0.1:9"


def _exit_code(service: Service, timeout: float = 60) -> int:
    return service.process.wait(timeout=timeout)


def _everything(service: Service) -> str:
    return service.output() + service.errors()


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("DATABASE_URL", f"postgresql://verifier:{PASSWORD}@db.internal:notaport/verifier"),
        ("DATABASE_URL", f"postgresql://verifier:{PASSWORD}@[::1/verifier"),
        ("REDIS_URL", f"redis://:{PASSWORD}@cache.internal:notaport/0"),
    ],
)
def test_a_malformed_url_stops_worker_beat_and_reverify(
    database_url: str, redis_url: str, tmp_path: Path, variable: str, url: str
) -> None:
    """A URL whose port or host cannot be parsed stops the worker, beat and `reverify` with
    status 2 and one message naming the variable, without its password or a traceback."""
    env = {
        **service_env(database_url=database_url, redis_url=redis_url, sts_url=NO_STS),
        variable: url,
    }
    with running(start_worker(env, tmp_path), start_beat(env, tmp_path)) as (worker, beat):
        for service in (worker, beat):
            assert _exit_code(service) == 2, _everything(service)[-2000:]
            assert f"{variable}: is not a valid URL" in service.errors()
    reverify = subprocess.run(
        [str(ROOT / "scripts" / "reverify"), "--all", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert reverify.returncode == 2, reverify.stderr
    assert f"{variable}: is not a valid URL" in reverify.stderr
    for output in (_everything(worker), _everything(beat), reverify.stdout + reverify.stderr):
        assert PASSWORD not in output
        assert "Traceback" not in output
        assert "***" in output


def test_a_worker_that_cannot_reach_its_database_exits_naming_it(
    redis_url: str, tmp_path: Path
) -> None:
    """With nothing listening at DATABASE_URL, the worker waits STARTUP_TIMEOUT_SECONDS, logs
    `startup.unreachable` naming the variable, and exits 3 without ever saying `worker.ready`."""
    unreachable = f"postgresql://verifier:{PASSWORD}@127.0.0.1:{free_port()}/verifier"
    env = service_env(
        database_url=unreachable, redis_url=redis_url, sts_url=NO_STS, STARTUP_TIMEOUT_SECONDS="2"
    )
    with running(start_worker(env, tmp_path)) as (worker,):
        assert _exit_code(worker) == 3, _everything(worker)[-2000:]
    assert worker.events("worker.ready") == []
    assert worker.events("startup.waiting"), worker.output()[-2000:]
    (line,) = worker.events("startup.unreachable")
    assert (line["level"], line["process"], line["variable"]) == (
        "critical",
        "worker",
        "DATABASE_URL",
    )
    assert line["url"].startswith("postgresql+psycopg://verifier:***@127.0.0.1:")
    assert line["waited_seconds"] >= 2
    assert PASSWORD not in _everything(worker)


def test_beat_that_cannot_reach_redis_exits_naming_it(database_url: str, tmp_path: Path) -> None:
    """With nothing listening at REDIS_URL, beat logs `startup.unreachable` naming the variable
    and exits 3 instead of ticking into the void."""
    unreachable = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    env = service_env(
        database_url=database_url,
        redis_url=unreachable,
        sts_url=NO_STS,
        STARTUP_TIMEOUT_SECONDS="1",
    )
    with running(start_beat(env, tmp_path)) as (beat,):
        assert _exit_code(beat) == 3, _everything(beat)[-2000:]
    assert beat.events("beat.started") == []
    (line,) = beat.events("startup.unreachable")
    assert (line["process"], line["variable"]) == ("beat", "REDIS_URL")
    assert line["url"].startswith("redis://:***@127.0.0.1:")
    assert PASSWORD not in _everything(beat)
