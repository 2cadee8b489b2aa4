"""The worker's engine: what it keeps out of error messages; waiting out a database away."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from worker import db
from worker.db import build_engine
from worker.settings import Settings


def test_a_database_error_does_not_carry_the_statements_parameters(database_url: str) -> None:
    """Parameters hold external IDs and role ARNs: an error message (and so a log line) shows
    the statement without them. (PostgreSQL's own text may still quote a value it could not
    parse; the worker never asks it to parse an external ID or an ARN as anything but text.)"""
    engine = build_engine(Settings(database_url=database_url))
    secret = "ext-0123456789abcdef-not-for-logs"
    try:
        with engine.connect() as connection, pytest.raises(DBAPIError) as raised:
            connection.execute(text("SELECT CAST(:value AS text), 1 / 0"), {"value": secret})
    finally:
        engine.dispose()
    assert "division by zero" in str(raised.value)
    assert secret not in str(raised.value)


class _Flaky:
    """An operation that raises the given errors in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def _server_away() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_a_database_briefly_away_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection errors are retried with backoff, and the operation's answer comes back."""
    monkeypatch.setattr(db, "DATABASE_RETRY_DELAYS", (0.0, 0.0, 0.0))
    operation = _Flaky(_server_away(), _server_away())
    assert db.with_database_retry(operation, accounts=3) == "done"
    assert operation.calls == 3


def test_a_database_away_for_too_long_fails_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the last delay the error is raised (the leases bring the accounts back)."""
    monkeypatch.setattr(db, "DATABASE_RETRY_DELAYS", (0.0, 0.0))
    operation = _Flaky(*[_server_away() for _ in range(5)])
    with pytest.raises(OperationalError):
        db.with_database_retry(operation, accounts=3)
    assert operation.calls == 3


def test_an_error_that_is_not_the_connection_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An integrity error means the statement is wrong, not the network: raised at once."""
    monkeypatch.setattr(db, "DATABASE_RETRY_DELAYS", (0.0, 0.0))
    operation = _Flaky(IntegrityError("INSERT", {}, Exception("duplicate key")))
    with pytest.raises(IntegrityError):
        db.with_database_retry(operation, accounts=3)
    assert operation.calls == 1


class _DriverError(Exception):
    """A driver error carrying a SQLSTATE, as psycopg's do."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__("driver error")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "away"),
    [
        (OperationalError("SELECT 1", {}, _DriverError(None)), True),  # could not connect
        (OperationalError("SELECT 1", {}, _DriverError("08006")), True),  # connection failure
        (OperationalError("SELECT 1", {}, _DriverError("57P01")), True),  # admin shutdown
        (OperationalError("SELECT 1", {}, _DriverError("57014")), False),  # statement timeout
        (OperationalError("SELECT 1", {}, _DriverError("55P03")), False),  # lock timeout
        (IntegrityError("INSERT", {}, _DriverError("23505")), False),  # unique violation
    ],
)
def test_only_a_database_that_is_away_is_waited_for(error: DBAPIError, away: bool) -> None:
    """Connection loss and server shutdown are retried; timeouts and refusals are not."""
    assert db.database_away(error) is away
