"""The database engine (one per process, never built at import) and sessions."""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from worker.settings import Settings, get_settings

_lock = threading.Lock()
_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None


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
