"""The services of a benchmark run, started and released in one place (`Stack`): a migrated
scratch database next to --database-url's, a Redis database of its own, the STS stand-in,
`celery worker`(s) and `celery beat` in the environment the worker would read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
import redis

from scripts.benchmarks.common import (
    CELERY,
    FAKE_KEY_ID,
    FAKE_SECRET,
    BenchError,
    no_interrupts,
    wait_for,
)
from scripts.benchmarks.procs import Child
from scripts.services import ROOT, postgres, standin
from worker.redact import libpq_url, mask_url

# Marks a Redis database as the benchmark's, so that it is never flushed while it holds
# somebody else's keys.
REDIS_MARKER: Final = "account-verifier-bench:owner"


def database_name(url: str) -> str:
    """The database part of a PostgreSQL URL."""
    return urllib.parse.urlsplit(url).path.lstrip("/")


def start_standin(
    *, median_ms: float, sigma: float, seed: int, rate_limit: float | None, log_dir: Path
) -> tuple[Child, str]:
    """`python -m sandbox.standin` on a free port; returns it and its URL."""
    args = standin.argv(median_ms=median_ms, latency_sigma=sigma, seed=seed, rate_limit=rate_limit)
    child = Child("sts-standin", args, env=os.environ, log_dir=log_dir)

    def url() -> str | None:
        child.check_alive()
        return standin.printed_url(child.stdout_path)

    return child, wait_for(url, timeout=30, what="the STS stand-in to print its URL")


class StandIn:
    """The stand-in's control endpoint."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}{path}", method=method, data=None)  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our child
            data: dict[str, Any] = json.loads(response.read())
        return data

    def stats(self) -> dict[str, Any]:
        """Counters without the per-role breakdown (which grows with the account count)."""
        return self._call("GET", "/_standin/stats?roles=0")

    def reset(self) -> None:
        """Zero the counters."""
        self._call("POST", "/_standin/reset")


def create_scratch_database(admin_url: str, prefix: str) -> str:
    """Create an empty database next to `admin_url`'s; return its libpq URL."""
    name = f"{prefix}_{datetime.now(UTC):%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
    try:
        return postgres.create_database(admin_url, name)
    except psycopg.Error as error:
        raise BenchError(
            f"cannot create a scratch database on {mask_url(admin_url)}: {error}".strip()
        ) from None


def migrate(url: str) -> None:
    """`alembic upgrade head` on `url`, as the API and the tests do."""
    from alembic import command  # noqa: PLC0415 - only the benchmarks need alembic
    from alembic.config import Config  # noqa: PLC0415

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def redis_db(url: str) -> int:
    """The database number of a redis:// URL (0 when absent)."""
    path = urllib.parse.urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def claim_redis_db(client: redis.Redis) -> None:
    """Make sure the database is empty or the benchmark's, then flush it and mark it ours."""
    size = int(client.dbsize())
    if size and not client.exists(REDIS_MARKER):
        raise BenchError(
            f"Redis database {client.connection_pool.connection_kwargs.get('db', 0)} holds "
            f"{size} keys that are not the benchmark's; pick an empty one with --redis-url"
        )
    client.flushdb()
    client.set(REDIS_MARKER, str(os.getpid()))


def consumers(client: redis.Redis, db: int) -> int:
    """Connections to our database blocked in BRPOP: one per worker process that consumes."""
    clients: list[dict[str, Any]] = client.client_list()
    return sum(1 for c in clients if str(c.get("db")) == str(db) and c.get("cmd") == "brpop")


def standin_aws_env(sts_url: str) -> dict[str, str]:
    """AWS_* for a client of the stand-in at `sts_url`, with the fake platform credentials."""
    return {
        "AWS_ENDPOINT_URL_STS": sts_url,
        # The stand-in answers the permission probes' services too.
        "AWS_ENDPOINT_URL": sts_url,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def settings_from(env: Mapping[str, str]) -> Any:
    """The worker's settings object as the worker builds it from `env`."""
    from worker.settings import Settings, SettingsError, load_settings  # noqa: PLC0415

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        settings: Settings = load_settings()
    except SettingsError as error:
        raise BenchError(f"the worker would refuse this environment: {error}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return settings


class Stack:
    """One run's services, from its Redis database and scratch database to `celery beat`, and
    their release: children stopped (last started first), the scratch database dropped (or
    named, when kept), the Redis database flushed, and the processes' logs removed after a run
    that succeeded."""

    def __init__(self, database_url: str, redis_url: str, *, keep: bool, log_prefix: str) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.keep = keep
        self.log_dir = Path(tempfile.mkdtemp(prefix=log_prefix))
        self.children: list[Child] = []
        self.scratch: str | None = None
        self.admin: psycopg.Connection[Any] | None = None
        self.broker = redis.Redis.from_url(redis_url, socket_timeout=10)
        self.broker_db = redis_db(redis_url)

    def prepare(
        self,
        *,
        database_prefix: str,
        median_ms: float,
        sigma: float,
        seed: int,
        rate_limit: float | None,
    ) -> tuple[Child, str]:
        """The Redis database claimed, the scratch database migrated, the stand-in started;
        returns the stand-in and its URL."""
        try:
            claim_redis_db(self.broker)
        except redis.RedisError as error:
            raise BenchError(f"Redis at {mask_url(self.redis_url)}: {error}") from None
        print(f"scratch database on {mask_url(self.database_url)} ...", file=sys.stderr)
        self.scratch = create_scratch_database(self.database_url, database_prefix)
        migrate(self.scratch)
        self.admin = psycopg.connect(libpq_url(self.database_url), autocommit=True)
        standin, sts_url = start_standin(
            median_ms=median_ms, sigma=sigma, seed=seed, rate_limit=rate_limit, log_dir=self.log_dir
        )
        self.children.append(standin)
        return standin, sts_url

    def worker_environment(
        self,
        sts_url: str,
        *,
        extra: Mapping[str, str],
        concurrency: int | None = None,
        dispatch_interval: float | None = None,
    ) -> tuple[dict[str, str], Any]:
        """The environment of this run's worker and beat, and the settings the worker will read
        from it (BenchError if it would refuse them)."""
        from worker.settings import Settings  # noqa: PLC0415

        assert self.scratch is not None  # noqa: S101 - set by prepare()
        # Ours minus every worker setting, plus the run's.
        setting_names = {name.upper() for name in Settings.model_fields} | {"AWS_DEFAULT_REGION"}
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("AWS_") and key not in setting_names
        }
        env.update(
            DATABASE_URL=self.scratch,
            REDIS_URL=self.redis_url,
            **standin_aws_env(sts_url),
            LOG_LEVEL="WARNING",
            LOG_FORMAT="json",
            # Not a tuning knob: beat's schedule file must not be shared with another beat.
            BEAT_SCHEDULE_FILE=str(self.log_dir / "beat-schedule"),
        )
        if concurrency is not None:
            env["WORKER_CONCURRENCY"] = str(concurrency)
        if dispatch_interval is not None:
            env["DISPATCH_INTERVAL_SECONDS"] = str(dispatch_interval)
        env.update(extra)
        return env, settings_from(env)

    def start_celery(
        self,
        env: Mapping[str, str],
        worker_names: Sequence[str],
        *,
        what: str,
        ready: Callable[[], bool] | None = None,
    ) -> tuple[list[Child], Child]:
        """`celery -A worker worker` (one per name) and `celery -A worker beat`; returns once
        every worker consumes and `ready` (if any) says so.

        With one worker its command line is exactly the operators' one; several get distinct
        --hostname values, nothing else.
        """
        workers = []
        for i, name in enumerate(worker_names):
            args = [CELERY, "-A", "worker", "worker"]
            if len(worker_names) > 1:
                args += ["--hostname", f"bench{i + 1}@%h"]
            workers.append(Child(name, args, env=env, log_dir=self.log_dir))
            self.children.append(workers[-1])
        beat = Child("beat", [CELERY, "-A", "worker", "beat"], env=env, log_dir=self.log_dir)
        self.children.append(beat)

        def consuming() -> bool:
            for child in (*workers, beat):
                child.check_alive()
            return consumers(self.broker, self.broker_db) >= len(workers) and (
                ready is None or ready()
            )

        wait_for(consuming, timeout=120, what=what)
        return workers, beat

    def release(self, *, remove_logs: bool) -> None:
        """Release everything (see the class); Ctrl-C and SIGTERM wait until it is done."""
        with no_interrupts():
            for child in reversed(self.children):
                child.stop()
            if self.admin is not None:
                self.admin.close()
            scratch = self.scratch
            if scratch is not None and not self.keep:
                from worker.db import dispose_engine  # noqa: PLC0415

                dispose_engine()
                try:
                    postgres.drop_database(self.database_url, scratch)
                except psycopg.Error as error:
                    print(f"could not drop {database_name(scratch)}: {error}", file=sys.stderr)
            elif scratch is not None:
                print(f"kept the scratch database: {mask_url(scratch)}", file=sys.stderr)
            with contextlib.suppress(redis.RedisError):
                self.broker.flushdb()
            self.broker.close()
            if remove_logs:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            else:
                print(f"logs of the processes kept in {self.log_dir}", file=sys.stderr)
