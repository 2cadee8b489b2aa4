"""Settings come from the environment; a bad value names its variable."""

from __future__ import annotations

import pytest

from worker.permissions import DEFAULT_PROBES
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


@pytest.mark.parametrize(
    ("variable", "url", "problem"),
    [
        ("DATABASE_URL", "postgresql://app:hunter2@db:notaport/app", "notaport"),
        ("DATABASE_URL", "postgresql://app:hunter2@[::1/app", "Invalid IPv6 URL"),
        ("DATABASE_URL", "postgresql://app:hunter2@db:70000/app", "out of range"),
        ("REDIS_URL", "redis://:hunter2@cache:notaport/0", "notaport"),
        ("REDIS_URL", "redis://:hunter2@[::1/0", "Invalid IPv6 URL"),
        ("REDIS_URL", "redis://:hunter2@cache:6379/0?socket_timeout=soon", "socket_timeout"),
    ],
)
def test_a_malformed_url_names_the_variable_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str, problem: str
) -> None:
    """A URL whose port or host cannot be parsed is refused at start-up, not at first use: the
    message names the variable and what is wrong, and shows the URL without its password."""
    monkeypatch.setenv(variable, url)
    with pytest.raises(SettingsError, match=variable) as caught:
        load_settings()
    assert problem in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@[::1]:5432/app",
        "postgresql:///app?host=/var/run/postgresql",
        "postgresql://app@db/app",
    ],
)
def test_well_formed_database_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """IPv6 literals, socket directories and default ports stay valid."""
    monkeypatch.setenv("DATABASE_URL", url)
    assert load_settings().database_url.startswith("postgresql+psycopg://")


@pytest.mark.parametrize(
    "region",
    [
        "us-east-1",
        "eu-central-1",
        "ap-southeast-4",
        "il-central-1",
        "us-gov-west-1",
        "cn-north-1",
        "us-isob-east-1",
    ],
)
def test_region_names_of_every_partition_are_accepted(
    monkeypatch: pytest.MonkeyPatch, region: str
) -> None:
    """Commercial, GovCloud, China and isolated regions all have the same shape."""
    monkeypatch.setenv("AWS_REGION", region)
    monkeypatch.setenv("STS_FALLBACK_REGION", region)
    settings = load_settings()
    assert (settings.aws_region, settings.sts_fallback_region) == (region, region)


@pytest.mark.parametrize(
    ("variable", "region"),
    [
        ("AWS_REGION", "nowhere"),
        ("AWS_REGION", "US-EAST-1"),
        ("AWS_REGION", "https://sts.us-east-1.amazonaws.com"),
        ("AWS_REGION", "us-east-1 "),
        ("STS_FALLBACK_REGION", "eu-west"),
    ],
)
def test_a_region_that_is_not_a_region_name_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, region: str
) -> None:
    """A region botocore would turn into an unreachable endpoint stops start-up instead."""
    monkeypatch.setenv(variable, region)
    with pytest.raises(SettingsError, match=f"{variable}: must be an AWS region name"):
        load_settings()


def test_a_retry_schedule_with_a_non_positive_delay_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WEBHOOK_RETRY_SCHEDULE_SECONDS is a JSON list of positive seconds; the error names it."""
    monkeypatch.setenv("WEBHOOK_RETRY_SCHEDULE_SECONDS", "[5, 0]")
    with pytest.raises(SettingsError, match="WEBHOOK_RETRY_SCHEDULE_SECONDS"):
        load_settings()


def test_permission_probes_default_to_the_four(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PERMISSION_PROBES every catalogue probe runs, daily."""
    monkeypatch.delenv("PERMISSION_PROBES", raising=False)
    settings = load_settings()
    assert settings.permission_probes == DEFAULT_PROBES
    assert settings.permission_probe_interval_seconds == 86400


def test_permission_probes_can_be_chosen_or_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A comma-separated subset is taken as given; `none` turns probing off."""
    monkeypatch.setenv("PERMISSION_PROBES", "s3:ListAllMyBuckets,iam:GetAccountSummary")
    assert load_settings().permission_probes == ("iam:GetAccountSummary", "s3:ListAllMyBuckets")
    monkeypatch.setenv("PERMISSION_PROBES", "none")
    assert load_settings().permission_probes == ()


def test_an_unknown_probe_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe outside the catalogue is refused at start-up, naming PERMISSION_PROBES."""
    monkeypatch.setenv("PERMISSION_PROBES", "ec2:DescribeRegions,ec2:RunInstances")
    with pytest.raises(SettingsError, match=r"PERMISSION_PROBES: unknown probe\(s\) ec2:Run"):
        load_settings()
