"""Models and migrations agree, and the migrations run both ways."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from models import Base
from tests.conftest import alembic_config, create_scratch_database, drop_scratch_database


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database of its own, so downgrading does not disturb the session's."""
    url = create_scratch_database("verifier_migrations")
    yield url
    drop_scratch_database(url)


def _sqlalchemy_url(url: str) -> str:
    return f"postgresql+psycopg://{url.partition('://')[2]}"


def test_upgrade_builds_a_schema_the_models_agree_with(empty_database: str) -> None:
    """After `upgrade head`, autogenerate finds no difference between models and database."""
    command.upgrade(alembic_config(empty_database), "head")
    engine = create_engine(_sqlalchemy_url(empty_database))
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            ),
            Base.metadata,
        )
    engine.dispose()
    assert diff == []


def test_downgrade_to_base_and_upgrade_again(empty_database: str) -> None:
    """Downgrading removes every table; upgrading again rebuilds them."""
    config = alembic_config(empty_database)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    engine = create_engine(_sqlalchemy_url(empty_database))
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    command.upgrade(config, "head")
    with engine.connect() as conn:
        assert {"organizations", "aws_accounts", "audit_events"} <= set(
            inspect(conn).get_table_names()
        )
    engine.dispose()
