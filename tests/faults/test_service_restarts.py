"""Redis and PostgreSQL restarted mid-sweep: the worker and beat ride it out, no manual restart.

Both servers are private to the test (a redis-server and a PostgreSQL cluster on free ports), so
restarting them disturbs no one else using the machine's services.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from tests.conftest import alembic_config
from tests.faults.fleet import Fleet
from tests.faults.harness import PrivatePostgres, StandInProcess, fault_env, log_events, running
from tests.faults.invariants import check_invariants, wait_for
from tests.processes import RedisServer, start_beat, start_worker, wait_until

pytestmark = pytest.mark.faults


@pytest.mark.timeout(150)
def test_redis_restarted_mid_sweep(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    private_redis: RedisServer,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """Redis goes away for 2 s and comes back empty (queued messages, the circuit breaker, the
    rate limiter and kombu's bindings all lost): the worker and beat reconnect by themselves,
    lost messages' leases expire, and every account is verified."""
    standin.configure(median_ms=150)
    fleet.add_mix(copies=3)
    total = len(fleet.accounts)
    env = services_env(WORKER_CONCURRENCY="2")
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_until(
            lambda: 3 <= fleet.settled_count() <= total - 8,
            timeout=60,
            interval=0.05,
            what="a sweep under way",
        )
        private_redis.restart(down_seconds=2)
        wait_for(fleet, timeout=60, what="every account to settle after the Redis restart")
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=True)


@pytest.fixture
def private_database(private_postgres: PrivatePostgres) -> Iterator[tuple[str, Fleet]]:
    """A migrated database on the private cluster, and a fleet in it."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(private_postgres.url(), autocommit=True) as conn:
        conn.execute('CREATE DATABASE "verifier"')
    url = private_postgres.url("verifier")
    command.upgrade(alembic_config(url), "head")
    # Pre-ping: the test's own pooled connections die with the server too.
    engine = create_engine(
        f"postgresql+psycopg://{url.partition('://')[2]}",
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5},
    )
    try:
        yield url, Fleet(sessionmaker(engine, expire_on_commit=False))
    finally:
        engine.dispose()


@pytest.mark.timeout(150)
def test_postgres_restarted_mid_sweep(
    private_postgres: PrivatePostgres,
    private_database: tuple[str, Fleet],
    private_redis: RedisServer,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """PostgreSQL shuts down (every connection cut) for 3 s mid-sweep and comes back: claims,
    verifications and applies fail meanwhile, the worker reconnects by itself, and every
    account is verified, each change recorded once."""
    database_url, fleet = private_database
    standin.configure(median_ms=150)
    fleet.add_mix(copies=3)
    total = len(fleet.accounts)
    env = fault_env(
        database_url=database_url,
        redis_url=private_redis.url,
        sts_url=standin.url,
        WORKER_CONCURRENCY="2",
    )
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_until(
            lambda: 3 <= fleet.settled_count() <= total - 8,
            timeout=60,
            interval=0.05,
            what="a sweep under way",
        )
        private_postgres.restart(down_seconds=3)
        wait_for(fleet, timeout=60, what="every account to settle after the PostgreSQL restart")
        # A commit whose answer was lost with the connection leaves its event unlogged.
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=False)


@pytest.mark.timeout(150)
def test_beats_listener_comes_back_after_a_postgres_restart(
    private_postgres: PrivatePostgres,
    private_database: tuple[str, Fleet],
    private_redis: RedisServer,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """PostgreSQL shuts down for 3 s and comes back: beat's listener reconnects by itself, and
    accounts inserted afterwards are verified although beat's periodic dispatch is an hour
    away."""
    database_url, fleet = private_database
    env = fault_env(
        database_url=database_url,
        redis_url=private_redis.url,
        sts_url=standin.url,
        DISPATCH_INTERVAL_SECONDS="3600",
    )
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_until(lambda: log_events(beat, "listener.listening"), timeout=60, what="listening")
        wait_until(lambda: log_events(worker, "worker.ready"), timeout=60, what="worker ready")
        private_postgres.restart(down_seconds=3)

        def reconnected() -> bool:
            return any(e.get("reconnected") for e in log_events(beat, "listener.listening"))

        wait_until(reconnected, timeout=60, what="the listener to reconnect")
        assert log_events(beat, "listener.disconnected")
        # Roles that connect at the first attempt: nothing here may need a retry by the clock.
        for n in range(3):
            fleet.add(f"ok-after-restart-{n}")
        wait_for(fleet, timeout=60, what="the accounts inserted after the restart to settle")
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=False)
