"""Settings come from the environment; a bad value names its variable."""

from __future__ import annotations

import pytest

from worker.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    "given",
    [
        "postgres://u:p@db:5432/app",
        "postgresql://u:p@db:5432/app",
        "postgresql+psycopg://u:p@db:5432/app",
    ],
)
def test_database_url_uses_psycopg3(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    """postgres:// and postgresql:// URLs are driven by psycopg 3."""
    monkeypatch.setenv("DATABASE_URL", given)
    assert load_settings().database_url == "postgresql+psycopg://u:p@db:5432/app"


def test_bad_database_url_names_the_variable_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A MySQL URL is refused with DATABASE_URL in the message and no password."""
    monkeypatch.setenv("DATABASE_URL", "mysql://admin:hunter2@db/app")
    with pytest.raises(SettingsError, match="DATABASE_URL") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_bad_number_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-numeric interval names DISPATCH_INTERVAL_SECONDS."""
    monkeypatch.setenv("DISPATCH_INTERVAL_SECONDS", "soon")
    with pytest.raises(SettingsError, match="DISPATCH_INTERVAL_SECONDS"):
        load_settings()


def test_bad_log_format_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOG_FORMAT accepts only auto, json and console."""
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(SettingsError, match="LOG_FORMAT"):
        load_settings()


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    """`LOG_LEVEL=debug` is accepted."""
    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


def test_bad_redis_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """REDIS_URL must be a redis URL."""
    monkeypatch.setenv("REDIS_URL", "amqp://guest@localhost//")
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings()


def test_lease_must_outlast_the_task_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease shorter than the task's time limit is refused at start-up."""
    monkeypatch.setenv("LEASE_SECONDS", "30")
    monkeypatch.setenv("VERIFY_TIME_LIMIT_SECONDS", "60")
    with pytest.raises(SettingsError, match="LEASE_SECONDS must be longer"):
        load_settings()


def test_aws_region_is_read_from_the_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_REGION sets the STS region."""
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert load_settings().aws_region == "eu-west-1"
