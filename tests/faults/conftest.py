"""Fixtures of the fault suite: the worker's environment on the test's own services and a fleet
of accounts in a scratch database. The private Redis, PostgreSQL and STS stand-in processes are
tests/conftest.py's (the metrics e2e tests use them too)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.faults.fleet import Fleet
from tests.faults.harness import StandInProcess, fault_env
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
