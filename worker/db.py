"""The database engine (one per process, never built at import), sessions, and waiting out a
database that is briefly away."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.logging import get_logger
from worker.settings import Settings, get_settings

log = get_logger("worker.db")

_lock = threading.Lock()
_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None


# libpq keepalives for a connection that must notice a server gone without closing the socket
# (a host lost, a failover) in about a minute, not after the kernel's two hours.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def build_engine(settings: Settings, *, connect_args: dict[str, Any] | None = None) -> Engine:
    """An engine for `settings.database_url`, its pool shared by the verification threads.

    No pre-ping: it would cost a round trip (and a commit) per checkout. A connection that died
    with a restarted server fails its statement instead, which invalidates the whole pool; the
    task retries, and the lease covers anything that still does not get through.
    `connect_args`: more libpq parameters (keepalives for a process that must notice a
    vanished server).
    """
    return create_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size // 2,
        pool_pre_ping=False,
        pool_recycle=1800,
        # Statement parameters hold external IDs and role ARNs: never in an error message or log.
        hide_parameters=True,
        # Identify the process in pg_stat_activity.
        # Every wait is bounded: connecting, any statement, any lock.
        connect_args={
            "application_name": "account-verifier",
            "connect_timeout": 5,
            "options": "-c statement_timeout=30000 -c lock_timeout=10000",
            **(connect_args or {}),
        },
    )


def get_engine() -> Engine:
    """The process's engine, built on first use."""
    global _engine, _sessionmaker  # noqa: PLW0603 - the process-wide singleton is the point
    if _engine is None:
        with _lock:
            if _engine is None:
                _engine = build_engine(get_settings())
                _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def session_factory() -> sessionmaker[Session]:
    """Sessions bound to the process's engine."""
    get_engine()
    assert _sessionmaker is not None  # noqa: S101 - set together with the engine
    return _sessionmaker


def dispose_engine() -> None:
    """Close every pooled connection (tests, shutdown)."""
    global _engine, _sessionmaker  # noqa: PLW0603
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None
        _sessionmaker = None


def _after_fork_in_child() -> None:
    # A forked child must not share the parent's sockets: drop them without closing them
    # (closing would send a terminate message on the parent's live connections).
    if _engine is not None:
        _engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


_T = TypeVar("_T")

# Backoff for a database that is briefly away (a restart, a failover): about 15 s in all. Longer
# outages fail the chunk, and its leases bring the accounts back.
DATABASE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# SQLSTATEs of a server going away: admin_shutdown, crash_shutdown, cannot_connect_now.
_SERVER_GOING_AWAY = frozenset({"57P01", "57P02", "57P03"})


def database_away(error: DBAPIError) -> bool:
    """Whether an error means the database is away (restart, failover, network), not refusing.

    A statement or lock timeout is the server answering, and a constraint violation is about the
    statement: retrying those on a fresh connection would not help.
    """
    if error.connection_invalidated:
        return True
    if not isinstance(error, OperationalError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None)
    # No SQLSTATE: the connection itself failed; class 08: connection exception.
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _SERVER_GOING_AWAY


def with_database_retry(operation: Callable[[], _T], **fields: object) -> _T:
    """Run a read or write of a batch, again on a fresh connection while the database is away
    (`fields` describe the batch in the log line: accounts=..., deliveries=...).

    Safe to repeat: a write whose commit did happen finds its leases gone the second time, and
    the compare-and-set applies nothing twice.
    """
    for delay in (*DATABASE_RETRY_DELAYS, None):
        try:
            return operation()
        except DBAPIError as error:
            if delay is None or not database_away(error):
                raise
            log.warning("database.reconnecting", **fields, retry_in_seconds=delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
