"""The one settings object, read from the environment and validated at start-up."""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import redis.connection
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from worker.permissions import DEFAULT_PROBES, parse_probe_names
from worker.redact import mask_url

_DAY = 24 * 3600
#: The most permission-probe threads a worker process may need (see `_consistent`).
MAX_PROBE_THREADS = 1000
_ACCOUNT_ID = re.compile(r"\d{12}", re.ASCII)

# An AWS region's name: us-east-1, eu-central-1, ap-southeast-4, us-gov-west-1, cn-north-1,
# us-isob-east-1. botocore accepts any string and builds an endpoint host from it, so a typo
# (or an upper-case name, or a URL) would only show as every STS call failing to connect.
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")


def _default_beat_file() -> str:
    return str(Path(tempfile.gettempdir()) / f"account-verifier-beat-{os.getuid()}")


class SettingsError(Exception):
    """A setting from the environment is missing or invalid; the message names the variable."""


class Settings(BaseSettings):
    """Every knob of the worker. Field names are the environment variables, upper-cased."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- services -------------------------------------------------------------------------------
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/verifier"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # How long the worker (and beat, for Redis) waits at start-up for a database or Redis that is
    # still starting before it exits, naming the variable: running without them helps nobody.
    startup_timeout_seconds: float = Field(default=30.0, ge=0, le=600)

    # --- logs -----------------------------------------------------------------------------------
    # "auto": console lines on a terminal, JSON lines otherwise.
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # --- AWS ------------------------------------------------------------------------------------
    # botocore reads credentials, AWS_PROFILE and AWS_ENDPOINT_URL_STS itself; the region is read
    # here so that a missing one has a default rather than a NoRegionError at the first attempt.
    aws_region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    # Tried once when STS answers RegionDisabledException in aws_region.
    sts_fallback_region: str = "us-east-1"
    sts_connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    sts_read_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # botocore's own retries ("standard" mode). Kept small: the worker reschedules by itself.
    sts_max_attempts: int = Field(default=2, ge=1, le=5)
    # Shown to customers in AccessDenied messages: the principal their role must trust.
    platform_principal_arn: str | None = None
    # AWS accounts of the platform's besides the one its own credentials belong to (which
    # GetCallerIdentity names): no customer may connect any of them. Comma-separated.
    platform_account_ids: Annotated[tuple[str, ...], NoDecode] = ()
    # First part of the RoleSessionName the customer sees in CloudTrail.
    session_name_prefix: str = Field(default="verifier", pattern=r"^[\w+=,.@-]{1,20}$")

    # --- scheduling (all in seconds) ------------------------------------------------------------
    dispatch_interval_seconds: float = Field(default=2.0, gt=0, le=3600)
    # Beat also LISTENs for rows that became due (inserted or edited) and dispatches at once.
    dispatch_on_notify: bool = True
    dispatch_batch_size: int = Field(default=500, ge=1, le=10_000)
    # Claims stop while the verification queue holds this many messages: a backlog waits in the
    # database, where no lease can expire while it waits.
    dispatch_max_queued: int = Field(default=2000, ge=1)
    # Longer than the verification task's hard time limit and than an account's STS attempts can
    # take (timeouts x attempts), so a live verification keeps its lease; one that overran it
    # would have its result discarded by the compare-and-set on the lease, never applied twice.
    lease_seconds: int = Field(default=300, ge=5, le=_DAY)
    # pending: retried quickly while IAM propagates, failed only once the grace window is over.
    pending_retry_seconds: int = Field(default=30, ge=1)
    pending_grace_seconds: int = Field(default=900, ge=0)
    connected_interval_seconds: int = Field(default=6 * 3600, ge=60)
    # Fraction of an interval added or removed at random, to spread load.
    jitter_ratio: float = Field(default=0.1, ge=0, lt=1)
    confirm_delay_seconds: int = Field(default=30, ge=1)
    failed_backoff_initial_seconds: int = Field(default=300, ge=1)
    failed_backoff_max_seconds: int = Field(default=_DAY, ge=1)
    transient_retry_initial_seconds: int = Field(default=30, ge=1)
    transient_retry_max_seconds: int = Field(default=900, ge=1)
    external_id_check_interval_seconds: int = Field(default=_DAY, ge=60)
    # Permission probes (worker/permissions.py, docs/permissions.md): comma-separated names from
    # the catalogue, or "none". Run on an account's first success, then at most once per interval.
    permission_probes: Annotated[tuple[str, ...], NoDecode] = DEFAULT_PROBES
    permission_probe_interval_seconds: int = Field(default=_DAY, ge=60)
    # Circuit breaker for the platform's own credentials.
    platform_pause_seconds: int = Field(default=60, ge=1)
    # Wave guard: at most this many connected -> failed with one error code per window.
    wave_threshold: int = Field(default=20, ge=1)
    wave_window_seconds: int = Field(default=600, ge=1)
    # Stall: at least this many verifications across all workers in the window, every one of them
    # transient with the same error code, is the platform failing (a wrong region, no route to
    # STS), not bad luck: logged once per window as `verification.stalled`.
    stall_min_verifications: int = Field(default=20, ge=1)
    stall_window_seconds: int = Field(default=300, ge=5, le=_DAY)
    # Global STS request budget shared by every worker through Redis (AWS quota: 600/s).
    # 500 leaves a sixth of the quota to anything else using the platform's account and region.
    sts_rate_limit_per_second: float = Field(default=500.0, gt=0, le=600)
    # Share of that budget requested verifications may take ahead of the scheduled sweep's
    # calls (worker/ratelimit.py): a customer waiting for a verdict does not queue behind it.
    sts_requested_share: float = Field(default=0.1, gt=0, le=0.5)
    verify_time_limit_seconds: int = Field(default=60, ge=2)

    # --- worker process -------------------------------------------------------------------------
    # A verification spends almost all its time waiting on STS. Each worker process (one per core
    # by default: 0) verifies a chunk of accounts at a time on WORKER_CONCURRENCY threads that
    # share one STS client and one connection pool; processes get past one interpreter's lock.
    worker_processes: int = Field(default=0, ge=0, le=64)
    worker_concurrency: int = Field(default=32, ge=1, le=500)
    # Connections per worker process. A verification holds one for two short transactions
    # (milliseconds) against a hundred milliseconds of waiting on STS, so a few serve many
    # threads; it keeps processes x connections under PostgreSQL's max_connections.
    database_pool_size: int = Field(default=8, ge=1, le=200)
    # Accounts per verification message: fewer broker messages and task overheads per account.
    dispatch_chunk_size: int = Field(default=25, ge=1, le=500)
    # A message redelivered more often than this (its worker died each time) is dropped.
    max_redeliveries: int = Field(default=3, ge=0)
    beat_schedule_file: str = Field(default_factory=_default_beat_file)

    # --- webhooks (docs/webhooks.md) ------------------------------------------------------------
    # Encrypts the endpoints' signing secrets at rest: a Fernet key (`scripts/webhooks new-key`).
    # Without it no endpoint can be created and no delivery signed.
    webhook_secret_key: SecretStr | None = None
    # Earlier keys, comma-separated: secrets stored under them still decrypt (rotating an
    # endpoint's secret stores the new one under WEBHOOK_SECRET_KEY). See docs/webhooks.md.
    webhook_previous_secret_keys: SecretStr | None = None
    # Off in production: endpoints on loopback, private, link-local, ... addresses (and plain
    # http://) are refused. On for tests and the local demo, whose receiver is on 127.0.0.1.
    webhook_allow_private_networks: bool = False
    # Delay before each retry after a failed attempt (Standard Webhooks' example schedule); a
    # delivery failing once more after the last one is given up.
    webhook_retry_schedule_seconds: tuple[float, ...] = (
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        50400,
        72000,
        86400,
    )
    webhook_connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    webhook_read_timeout_seconds: float = Field(default=15.0, gt=0, le=60)
    # The hard limit of one attempt, from resolving the name to reading the answer: the
    # timeouts above bound each wait, not a server that trickles its answer a byte at a time.
    webhook_attempt_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    # Beat's claim of due deliveries (retries); new events are claimed when their transaction
    # commits, by each worker process's listener, without waiting for it.
    webhook_dispatch_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    webhook_batch_size: int = Field(default=200, ge=1, le=10_000)
    # Deliveries in flight to one endpoint, across the fleet: one slow or hanging endpoint holds
    # at most this many of the delivery threads. It also bounds one endpoint's rate (this many
    # divided by its answer time, plus the record and the next claim): a burst of one
    # organization's events drains at that rate.
    webhook_per_endpoint_limit: int = Field(default=16, ge=1, le=1000)
    # Delivery threads per worker process (they wait on the network, not the CPU).
    webhook_concurrency: int = Field(default=64, ge=1, le=500)
    # Enabled endpoints an organization may have: each adds one INSERT per event to the
    # verification's transaction (the outbox), so the fan-out is bounded.
    webhook_max_endpoints_per_organization: int = Field(default=20, ge=1, le=1000)
    # An endpoint none of whose deliveries succeeded for this long is disabled.
    webhook_disable_after_seconds: int = Field(default=5 * _DAY, ge=1)
    # How long the previous secret keeps signing after a rotation.
    webhook_rotation_grace_seconds: int = Field(default=_DAY, ge=0)

    # --- metrics and health (docs/observability.md) ---------------------------------------------
    # Off unless set: the port of the small HTTP server for /metrics, /healthz and /readyz, run by
    # the worker's main process (one endpoint for all its prefork processes) and by beat. 0: any
    # free port (logged in `metrics.serving`).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_address: str = "0.0.0.0"  # noqa: S104 - scraped from outside the container
    # Where the prefork processes write their metrics (wiped by the main process at start); unset:
    # a fresh directory of the worker's own, removed at exit. One directory per worker.
    prometheus_multiproc_dir: str | None = None
    # The fleet gauges (accounts by status, the due backlog) are read from the database at most
    # this often, and only when scraped.
    metrics_database_interval_seconds: float = Field(default=10.0, ge=1, le=3600)
    # Readiness also says "stalled" (besides `verification.stalled`) when accounts have been
    # overdue this long while this worker finished no verification for as long.
    stall_idle_seconds: int = Field(default=600, ge=5)

    @field_validator("database_url")
    @classmethod
    def _use_psycopg3(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise ValueError("must be a URL such as postgresql://user@host:5432/dbname")
        if scheme in {"postgres", "postgresql", "postgresql+psycopg"}:
            return _parsed_database_url(f"postgresql+psycopg://{rest}")
        raise ValueError(
            f"scheme {scheme!r} is not supported; use postgres:// or postgresql:// (psycopg 3)"
        )

    @field_validator("webhook_retry_schedule_seconds")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every delay must be positive (seconds), e.g. [5, 300, 1800]")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        _check_host_and_port(value)
        try:
            # redis-py's own parser: its messages name the option, never the URL.
            redis.connection.parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as error:
            raise ValueError(f"is not a valid Redis URL: {error}") from None
        return value

    @field_validator("aws_region", "sts_fallback_region")
    @classmethod
    def _region_name(cls, value: str) -> str:
        if not _REGION.fullmatch(value):
            raise ValueError("must be an AWS region name such as us-east-1 or eu-west-1")
        return value

    @field_validator("platform_account_ids", mode="before")
    @classmethod
    def _account_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple):
            bad = [str(item) for item in value if not _ACCOUNT_ID.fullmatch(str(item))]
            if bad:
                raise ValueError(
                    f"must be 12-digit AWS account IDs separated by commas (not {bad[0]!r})"
                )
        return value

    @field_validator("permission_probes", mode="before")
    @classmethod
    def _known_probes(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            value = ",".join(str(item) for item in value) or "none"
        return parse_probe_names(value) if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.lease_seconds <= self.verify_time_limit_seconds:
            raise ValueError(
                "LEASE_SECONDS must be longer than VERIFY_TIME_LIMIT_SECONDS, or a slow but live "
                "verification could lose its lease to another worker"
            )
        if self.failed_backoff_max_seconds < self.failed_backoff_initial_seconds:
            raise ValueError(
                "FAILED_BACKOFF_MAX_SECONDS must be at least FAILED_BACKOFF_INITIAL_SECONDS"
            )
        if self.transient_retry_max_seconds < self.transient_retry_initial_seconds:
            raise ValueError(
                "TRANSIENT_RETRY_MAX_SECONDS must be at least TRANSIENT_RETRY_INITIAL_SECONDS"
            )
        if self.worker_concurrency * len(self.permission_probes) > MAX_PROBE_THREADS:
            # A thread per probe of every verification thread, so none waits for another's
            # probes and times out (worker.sts.probes.PermissionProber).
            raise ValueError(
                f"WORKER_CONCURRENCY x the number of PERMISSION_PROBES must be at most "
                f"{MAX_PROBE_THREADS} (probe threads per process)"
            )
        return self

    @property
    def database_url_masked(self) -> str:
        """The database URL as it may be logged."""
        return mask_url(self.database_url)

    @property
    def redis_url_masked(self) -> str:
        """The Redis URL as it may be logged."""
        return mask_url(self.redis_url)


def _check_host_and_port(url: str) -> None:
    """Refuse a URL whose host or port cannot be parsed (found otherwise only at first use)."""
    try:
        port = urlsplit(url).port  # parses the host too
    except ValueError as error:
        # urllib's messages ("Port could not be cast to integer value as 'x'", "Invalid IPv6
        # URL") name the part, never the password.
        raise ValueError(f"is not a valid URL: {error}") from None
    if port == 0:
        raise ValueError("is not a valid URL: port 0")


def _parsed_database_url(url: str) -> str:
    """`url`, once SQLAlchemy and urllib can parse all of it (host and port included)."""
    _check_host_and_port(url)
    try:
        make_url(url)
    except (ArgumentError, ValueError):
        # SQLAlchemy's message quotes the whole URL, password included: not shown.
        raise ValueError("is not a valid database URL") from None
    return url


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = item["loc"]
        name = str(location[0]).upper() if location else "settings"
        value = item.get("input")
        shown = ""
        if location and isinstance(value, str):
            shown = f" (got {mask_url(value)!r})"
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}: {message}{shown}" if location else message)
    return "invalid settings: " + "; ".join(lines)


def load_settings() -> Settings:
    """Read and validate the settings; raise `SettingsError` naming each bad variable."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()


def get_settings_or_exit() -> Settings:
    """For entry points: print the problem and exit with status 2 instead of a traceback."""
    try:
        return get_settings()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201 - before logging exists
        raise SystemExit(2) from None
