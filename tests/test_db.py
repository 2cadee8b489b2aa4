"""The worker's engine: what it keeps out of error messages."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

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
