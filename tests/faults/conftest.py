"""Fixtures of the fault suite: a private Redis, the STS stand-in as a process, a fleet of
accounts in a scratch database (from tests/conftest.py), and a private PostgreSQL for the one
test that restarts the database server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.faults.fleet import Fleet
from tests.faults.harness import PrivatePostgres, StandInProcess, fault_env, postgres_bindir
from tests.processes import RedisServer


@pytest.fixture
def services_env(
    scratch_database: str, private_redis: RedisServer, standin: StandInProcess
) -> Callable[..., dict[str, str]]:
    """The worker's and beat's environment on this test's scratch database, private Redis and
    stand-in (the fault suite's cadences), with keyword arguments as extra settings."""

    def build(**extra: str) -> dict[str, str]:
        return fault_env(
            database_url=scratch_database, redis_url=private_redis.url, sts_url=standin.url, **extra
        )

    return build


@pytest.fixture
def fleet(scratch_sessions: sessionmaker[Session]) -> Fleet:
    """An organization in the test's scratch database, to add accounts to."""
    return Fleet(scratch_sessions)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own on a free port, running; removed afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("initdb/pg_ctl not found (PostgreSQL server binaries are needed)")
    cluster = PrivatePostgres(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
